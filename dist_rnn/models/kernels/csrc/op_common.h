// Names every recurrence op source uses: TensorFlow's op-kernel and
// shape-inference types, Eigen array maps over one row of units, and the
// "gemm" attribute reader. Each source includes this header and keeps its
// own helpers in an anonymous namespace, so that the sources can be linked
// into one library without clashing.

#ifndef DIST_RNN_CSRC_OP_COMMON_H_
#define DIST_RNN_CSRC_OP_COMMON_H_

#include <cstring>
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

// Base of the ops with a "gemm" attribute ('auto' or 'eigen'), read once at construction.
class GemmOpKernel : public OpKernel {
 public:
  explicit GemmOpKernel(OpKernelConstruction* ctx) : OpKernel(ctx), allow_onednn_(AllowOneDnn(ctx)) {}

 protected:
  // Whether this op's float32 GEMMs may run on oneDNN.
  bool allow_onednn() const { return allow_onednn_; }

 private:
  const bool allow_onednn_;
};

// Registers the CPU kernels op_class<float> and op_class<double> of the op named op_name.
#define DIST_RNN_REGISTER_CPU_KERNELS(op_name, op_class)                                                   \
  REGISTER_KERNEL_BUILDER(Name(op_name).Device(DEVICE_CPU).TypeConstraint<float>("T"), op_class<float>);   \
  REGISTER_KERNEL_BUILDER(Name(op_name).Device(DEVICE_CPU).TypeConstraint<double>("T"), op_class<double>)

// The recurrent-kernel gradient of a recurrence whose step multiplies (h_{t-1} * mask) by the kernel:
// d_kernel (width, gates) = sum over t of (masked h_{t-1})^T @ dz_t, as one GEMM over all T * B rows.
// h_{t-1} is h0 (B, width) at t = 0 and h_seq[t - 1] after; mask (B, width) or nullptr; dz (T, B, gates);
// rows is scratch for the (T * B, width) left operand. steps == 0 gives zeros.
template <typename T>
void RecurrentKernelGradient(const Gemm<T>& gemm, int64_t steps, int64_t batch, int64_t width, int64_t gates,
                             const T* h0, const T* h_seq, const T* mask, const T* dz, T* rows, T* d_kernel) {
  const int64_t state_size = batch * width;
  if (steps == 0) {
    std::memset(d_kernel, 0, width * gates * sizeof(T));
    return;
  }
  std::memcpy(rows, h0, state_size * sizeof(T));
  std::memcpy(rows + state_size, h_seq, (steps - 1) * state_size * sizeof(T));
  if (mask != nullptr) {
    for (int64_t t = 0; t < steps; ++t) Vec<T>(rows + t * state_size, state_size) *= ConstVec<T>(mask, state_size);
  }
  gemm(true, width, gates, steps * batch, rows, width, dz, gates, d_kernel, gates);
}

}  // namespace ops
}  // namespace dist_rnn

#endif  // DIST_RNN_CSRC_OP_COMMON_H_
