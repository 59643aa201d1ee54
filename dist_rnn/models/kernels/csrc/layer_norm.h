// Layer normalization over one run of units, forward and backward, for the layer-norm recurrence ops
// (ln_lstm_ops.cc, ln_gru_ops.cc): the mean and the biased variance over the run, eps added to the
// variance, as dist_rnn.models.kernels.layer_norm computes them in the graph.

#ifndef DIST_RNN_CSRC_LAYER_NORM_H_
#define DIST_RNN_CSRC_LAYER_NORM_H_

#include <cmath>

#include "op_common.h"

namespace dist_rnn {
namespace ops {

// In place: x becomes (x - mean) * rstd over its elements; returns rstd = 1 / sqrt(biased var + eps).
template <typename T>
T Normalize(Vec<T> x, T eps) {
  const T mean = x.mean();
  x -= mean;
  const T rstd = T(1) / std::sqrt(x.square().mean() + eps);
  x *= rstd;
  return rstd;
}

// In place: dxhat becomes the gradient at the layer norm's input, given d(loss)/d(xhat).
template <typename T>
void NormalizeBackward(Vec<T> dxhat, ConstVec<T> xhat, T rstd) {
  const T mean_d = dxhat.mean();
  const T mean_dx = (dxhat * xhat).mean();
  dxhat = rstd * (dxhat - mean_d - xhat * mean_dx);
}

}  // namespace ops
}  // namespace dist_rnn

#endif  // DIST_RNN_CSRC_LAYER_NORM_H_
