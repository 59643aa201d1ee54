// Names every recurrence op source uses: TensorFlow's op-kernel and
// shape-inference types, Eigen array maps over one row of units, and the
// "gemm" attribute reader. Each source includes this header and keeps its
// own helpers in an anonymous namespace, so that the sources can be linked
// into one library without clashing.

#ifndef DIST_RNN_CSRC_OP_COMMON_H_
#define DIST_RNN_CSRC_OP_COMMON_H_

#include <string>

#include "Eigen/Core"
#include "gemm.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace dist_rnn {
namespace ops {

using ::tensorflow::DEVICE_CPU;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Status;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::errors::InvalidArgument;
using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;
using cpu::Gemm;
using cpu::ParallelRows;

// A run of values (one batch row's units or gates) as an Eigen array, for vectorized elementwise math.
template <typename T>
using Vec = Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>>;
template <typename T>
using ConstVec = Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>;

// Reads an op's "gemm" attribute: true unless it is 'eigen' (true too when the op has none).
inline bool AllowOneDnn(OpKernelConstruction* ctx) {
  std::string gemm;
  return !ctx->GetAttr("gemm", &gemm).ok() || gemm != "eigen";
}

}  // namespace ops
}  // namespace dist_rnn

#endif  // DIST_RNN_CSRC_OP_COMMON_H_
