// The LSTM sequence recurrence of dist_rnn.models.kernels.plain.lstm as two
// compiled CPU ops: DistRnnLstmForward and DistRnnLstmBackward.
//
// Same layouts and semantics as the graph kernel: time-major input
// projection proj (T, B, 4U) = x @ W + b with gate order i, f, c, o and the
// c-gate columns doubled (tanh(a) = 2 sigmoid(2a) - 1, so one sigmoid gives
// every gate), recurrent kernel (U, 4U) likewise doubled, and a recurrent
// dropout mask (B, U) multiplying h before the recurrent matmul; an empty
// mask (0 elements) means no dropout.
//
// Per step one GEMM (h @ U) on TensorFlow's intra-op thread pool, then the
// gates and the state update in one pass. The backward pass runs the reverse
// loop (one GEMM dz @ U^T per step) and computes the recurrent-kernel
// gradient with one GEMM over all T * B rows.

#define EIGEN_USE_THREADS

#include <cmath>
#include <cstring>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "unsupported/Eigen/CXX11/Tensor"

namespace dist_rnn {

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

template <typename T>
using Matrix = Eigen::TensorMap<Eigen::Tensor<T, 2, Eigen::RowMajor>, Eigen::Aligned>;
template <typename T>
using ConstMatrix = Eigen::TensorMap<Eigen::Tensor<const T, 2, Eigen::RowMajor>, Eigen::Aligned>;
template <typename T>
using UnalignedConstMatrix = Eigen::TensorMap<Eigen::Tensor<const T, 2, Eigen::RowMajor>>;
template <typename T>
using UnalignedMatrix = Eigen::TensorMap<Eigen::Tensor<T, 2, Eigen::RowMajor>>;

// a @ b: contract the columns of a with the rows of b.
const Eigen::array<Eigen::IndexPair<int>, 1> kRowsByCols = {Eigen::IndexPair<int>(1, 0)};
// a @ b^T: contract the columns of a with the columns of b.
const Eigen::array<Eigen::IndexPair<int>, 1> kRowsByRows = {Eigen::IndexPair<int>(1, 1)};
// a^T @ b: contract the rows of a with the rows of b.
const Eigen::array<Eigen::IndexPair<int>, 1> kColsByCols = {Eigen::IndexPair<int>(0, 0)};

// Runs fn(begin, end) over [0, rows) in shards on the op's thread pool.
template <typename Fn>
void ParallelRows(const Eigen::ThreadPoolDevice& device, int64_t rows, double cost_per_row, Fn fn) {
  device.parallelFor(rows, Eigen::TensorOpCost(0, 0, cost_per_row),
                     [&fn](Eigen::Index begin, Eigen::Index end) { fn(begin, end); });
}

Status LstmForwardShape(InferenceContext* c) {
  ShapeHandle proj, h0, c0, rkernel;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 3, &proj));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &h0));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 2, &c0));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 2, &rkernel));
  DimensionHandle steps = c->Dim(proj, 0), batch = c->Dim(proj, 1), units = c->Dim(rkernel, 0);
  ShapeHandle seq = c->MakeShape({steps, batch, units});
  ShapeHandle state = c->MakeShape({batch, units});
  c->set_output(0, seq);
  c->set_output(1, state);
  c->set_output(2, state);
  c->set_output(3, seq);
  c->set_output(4, proj);
  return absl::OkStatus();
}

Status LstmBackwardShape(InferenceContext* c) {
  // Inputs: d_h_seq, d_h_last, d_c_last, h0, c0, rkernel, mask, h_seq, c_seq, gates.
  c->set_output(0, c->input(9));
  c->set_output(1, c->input(3));
  c->set_output(2, c->input(4));
  c->set_output(3, c->input(5));
  return absl::OkStatus();
}

REGISTER_OP("DistRnnLstmForward")
    .Input("proj: T")
    .Input("h0: T")
    .Input("c0: T")
    .Input("rkernel: T")
    .Input("mask: T")
    .Output("h_seq: T")
    .Output("h_last: T")
    .Output("c_last: T")
    .Output("c_seq: T")
    .Output("gates: T")
    .Attr("T: {float, double}")
    .SetShapeFn(LstmForwardShape)
    .Doc("LSTM recurrence over a time-major input projection; gates are the sigmoid outputs.");

REGISTER_OP("DistRnnLstmBackward")
    .Input("d_h_seq: T")
    .Input("d_h_last: T")
    .Input("d_c_last: T")
    .Input("h0: T")
    .Input("c0: T")
    .Input("rkernel: T")
    .Input("mask: T")
    .Input("h_seq: T")
    .Input("c_seq: T")
    .Input("gates: T")
    .Output("d_proj: T")
    .Output("d_h0: T")
    .Output("d_c0: T")
    .Output("d_rkernel: T")
    .Attr("T: {float, double}")
    .SetShapeFn(LstmBackwardShape)
    .Doc("Gradients of DistRnnLstmForward with respect to proj, h0, c0 and rkernel.");

// Checks proj (T, B, 4U), h0/c0 (B, U), rkernel (U, 4U), mask (B, U) or empty.
Status CheckLstmShapes(const Tensor& proj, const Tensor& h0, const Tensor& c0, const Tensor& rkernel,
                       const Tensor& mask) {
  if (proj.dims() != 3) return InvalidArgument("proj must be (T, B, 4U), got ", proj.shape().DebugString());
  if (rkernel.dims() != 2 || rkernel.dim_size(1) != 4 * rkernel.dim_size(0))
    return InvalidArgument("rkernel must be (U, 4U), got ", rkernel.shape().DebugString());
  const int64_t batch = proj.dim_size(1), units = rkernel.dim_size(0);
  if (proj.dim_size(2) != 4 * units) return InvalidArgument("proj's last dimension must be 4U = ", 4 * units);
  const TensorShape state({batch, units});
  if (h0.shape() != state || c0.shape() != state)
    return InvalidArgument("h0 and c0 must be ", state.DebugString());
  if (mask.NumElements() != 0 && mask.shape() != state)
    return InvalidArgument("mask must be empty or ", state.DebugString());
  return absl::OkStatus();
}

template <typename T>
class LstmForwardOp : public OpKernel {
 public:
  explicit LstmForwardOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& proj = ctx->input(0);
    const Tensor& h0 = ctx->input(1);
    const Tensor& c0 = ctx->input(2);
    const Tensor& rkernel = ctx->input(3);
    const Tensor& mask = ctx->input(4);
    OP_REQUIRES_OK(ctx, CheckLstmShapes(proj, h0, c0, rkernel, mask));
    const int64_t steps = proj.dim_size(0), batch = proj.dim_size(1), units = rkernel.dim_size(0);
    const int64_t gates = 4 * units, state_size = batch * units;

    Tensor *h_seq, *h_last, *c_last, *c_seq, *y_seq;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({steps, batch, units}), &h_seq));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, h0.shape(), &h_last));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, c0.shape(), &c_last));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, TensorShape({steps, batch, units}), &c_seq));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(4, proj.shape(), &y_seq));
    Tensor masked;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(proj.dtype(), h0.shape(), &masked));

    const auto& device = ctx->eigen_device<Eigen::ThreadPoolDevice>();
    const bool has_mask = mask.NumElements() > 0;
    const T* m = has_mask ? mask.flat<T>().data() : nullptr;
    const T* p = proj.flat<T>().data();
    T* hs = h_seq->flat<T>().data();
    T* cs = c_seq->flat<T>().data();
    T* ys = y_seq->flat<T>().data();
    T* hm = masked.flat<T>().data();
    ConstMatrix<T> u(rkernel.flat<T>().data(), units, gates);
    const T* h_prev = h0.flat<T>().data();
    const T* c_prev = c0.flat<T>().data();

    for (int64_t t = 0; t < steps; ++t) {
      const T* h_in = h_prev;
      if (has_mask) {
        for (int64_t i = 0; i < state_size; ++i) hm[i] = h_prev[i] * m[i];
        h_in = hm;
      }
      T* y = ys + t * batch * gates;
      UnalignedMatrix<T> y_t(y, batch, gates);
      UnalignedConstMatrix<T> p_t(p + t * batch * gates, batch, gates);
      UnalignedConstMatrix<T> h_t(h_in, batch, units);
      y_t.device(device) = h_t.contract(u, kRowsByCols);
      y_t.device(device) = (y_t + p_t).sigmoid();
      T* h = hs + t * state_size;
      T* c = cs + t * state_size;
      const T* cp = c_prev;
      ParallelRows(device, batch, 30.0 * units, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          const T* yb = y + b * gates;
          for (int64_t j = 0; j < units; ++j) {
            const int64_t k = b * units + j;
            const T c_new = cp[k] * yb[units + j] + yb[j] * (T(2) * yb[2 * units + j] - T(1));
            c[k] = c_new;
            h[k] = std::tanh(c_new) * yb[3 * units + j];
          }
        }
      });
      h_prev = h;
      c_prev = c;
    }
    std::memcpy(h_last->flat<T>().data(), h_prev, state_size * sizeof(T));
    std::memcpy(c_last->flat<T>().data(), c_prev, state_size * sizeof(T));
  }
};

template <typename T>
class LstmBackwardOp : public OpKernel {
 public:
  explicit LstmBackwardOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& d_h_seq = ctx->input(0);
    const Tensor& d_h_last = ctx->input(1);
    const Tensor& d_c_last = ctx->input(2);
    const Tensor& h0 = ctx->input(3);
    const Tensor& c0 = ctx->input(4);
    const Tensor& rkernel = ctx->input(5);
    const Tensor& mask = ctx->input(6);
    const Tensor& h_seq = ctx->input(7);
    const Tensor& c_seq = ctx->input(8);
    const Tensor& y_seq = ctx->input(9);
    OP_REQUIRES_OK(ctx, CheckLstmShapes(y_seq, h0, c0, rkernel, mask));
    const int64_t steps = y_seq.dim_size(0), batch = y_seq.dim_size(1), units = rkernel.dim_size(0);
    const int64_t gates = 4 * units, state_size = batch * units;
    const TensorShape seq({steps, batch, units});
    OP_REQUIRES(ctx, d_h_seq.shape() == seq && h_seq.shape() == seq && c_seq.shape() == seq,
                InvalidArgument("d_h_seq, h_seq and c_seq must be ", seq.DebugString()));
    OP_REQUIRES(ctx, d_h_last.shape() == h0.shape() && d_c_last.shape() == h0.shape(),
                InvalidArgument("d_h_last and d_c_last must be ", h0.shape().DebugString()));

    Tensor *d_proj, *d_h0, *d_c0, *d_rkernel;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, y_seq.shape(), &d_proj));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, h0.shape(), &d_h0));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, c0.shape(), &d_c0));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, rkernel.shape(), &d_rkernel));
    Tensor dh_carry_t, h_prev_t;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(y_seq.dtype(), h0.shape(), &dh_carry_t));
    // The (masked) h fed to the recurrent matmul at every step, for the weight gradient.
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(y_seq.dtype(), seq, &h_prev_t));

    const auto& device = ctx->eigen_device<Eigen::ThreadPoolDevice>();
    const bool has_mask = mask.NumElements() > 0;
    const T* m = has_mask ? mask.flat<T>().data() : nullptr;
    const T* dhs = d_h_seq.flat<T>().data();
    const T* hs = h_seq.flat<T>().data();
    const T* cs = c_seq.flat<T>().data();
    const T* ys = y_seq.flat<T>().data();
    T* dz_all = d_proj->flat<T>().data();
    T* dh_carry = d_h0->flat<T>().data();  // d_h0/d_c0 double as the carries
    T* dc_carry = d_c0->flat<T>().data();
    T* dh_rec = dh_carry_t.flat<T>().data();
    std::memcpy(dh_carry, d_h_last.flat<T>().data(), state_size * sizeof(T));
    std::memcpy(dc_carry, d_c_last.flat<T>().data(), state_size * sizeof(T));
    ConstMatrix<T> u(rkernel.flat<T>().data(), units, gates);

    for (int64_t t = steps - 1; t >= 0; --t) {
      const T* y = ys + t * batch * gates;
      const T* c = cs + t * state_size;
      const T* cp = t > 0 ? cs + (t - 1) * state_size : c0.flat<T>().data();
      const T* dho = dhs + t * state_size;
      T* dz = dz_all + t * batch * gates;
      ParallelRows(device, batch, 40.0 * units, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          const T* yb = y + b * gates;
          T* dzb = dz + b * gates;
          for (int64_t j = 0; j < units; ++j) {
            const int64_t k = b * units + j;
            const T yi = yb[j], yf = yb[units + j], yc = yb[2 * units + j], yo = yb[3 * units + j];
            const T tanh_c = std::tanh(c[k]);
            const T dh = dho[k] + dh_carry[k];
            const T dc = dh * (yo * (T(1) - tanh_c * tanh_c)) + dc_carry[k];
            dzb[j] = dc * (T(2) * yc - T(1)) * (yi * (T(1) - yi));
            dzb[units + j] = dc * cp[k] * (yf * (T(1) - yf));
            dzb[2 * units + j] = dc * (T(2) * yi) * (yc * (T(1) - yc));
            dzb[3 * units + j] = dh * tanh_c * (yo * (T(1) - yo));
            dc_carry[k] = dc * yf;
          }
        }
      });
      UnalignedConstMatrix<T> dz_t(dz, batch, gates);
      UnalignedMatrix<T> dh_rec_t(dh_rec, batch, units);
      dh_rec_t.device(device) = dz_t.contract(u, kRowsByRows);
      for (int64_t i = 0; i < state_size; ++i) dh_carry[i] = has_mask ? dh_rec[i] * m[i] : dh_rec[i];
    }

    // Weight gradient: (masked h_{t-1})^T @ dz over all T * B rows in one GEMM.
    T* hp = h_prev_t.flat<T>().data();
    if (steps > 0) {
      std::memcpy(hp, h0.flat<T>().data(), state_size * sizeof(T));
      std::memcpy(hp + state_size, hs, (steps - 1) * state_size * sizeof(T));
      if (has_mask) {
        for (int64_t t = 0; t < steps; ++t)
          for (int64_t i = 0; i < state_size; ++i) hp[t * state_size + i] *= m[i];
      }
    }
    UnalignedConstMatrix<T> h_rows(hp, steps * batch, units);
    UnalignedConstMatrix<T> dz_rows(dz_all, steps * batch, gates);
    UnalignedMatrix<T> d_u(d_rkernel->flat<T>().data(), units, gates);
    if (steps > 0) {
      d_u.device(device) = h_rows.contract(dz_rows, kColsByCols);
    } else {
      d_u.setZero();
    }
  }
};

#define REGISTER_LSTM_KERNELS(T)                                                                   \
  REGISTER_KERNEL_BUILDER(                                                                         \
      Name("DistRnnLstmForward").Device(DEVICE_CPU).TypeConstraint<T>("T"), LstmForwardOp<T>);    \
  REGISTER_KERNEL_BUILDER(                                                                         \
      Name("DistRnnLstmBackward").Device(DEVICE_CPU).TypeConstraint<T>("T"), LstmBackwardOp<T>);

REGISTER_LSTM_KERNELS(float);
REGISTER_LSTM_KERNELS(double);

}  // namespace dist_rnn
