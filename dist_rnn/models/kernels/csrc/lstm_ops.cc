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
// Forward, per step: one GEMM h @ U into the step's gate buffer, then one
// pass over the batch rows that adds the projection, applies the sigmoid and
// updates c and h (and the masked h for the next GEMM). Backward, per step in
// reverse: one pass that turns dh and dc into the gate gradients dz, then one
// GEMM dz @ U^T (against U^T transposed once per call). The recurrent-kernel
// gradient is one GEMM over all T * B rows. No allocation inside the loops.
//
// The GEMMs (gemm.h) run oneDNN's sgemm through TensorFlow's own MatMul entry
// point when the installed TensorFlow exports it, else Eigen's matrix product.

#include <cstring>

#include "op_common.h"

namespace dist_rnn {
namespace {

using namespace ::dist_rnn::ops;  // NOLINT(build/namespaces): the shared op vocabulary

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
    .Attr("gemm: {'auto', 'eigen'} = 'auto'")
    .SetShapeFn(LstmForwardShape)
    .Doc("LSTM recurrence over a time-major input projection; gates are the sigmoid outputs. "
         "gemm='eigen' forces Eigen's matrix product instead of oneDNN's (for tests).");

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
    .Attr("gemm: {'auto', 'eigen'} = 'auto'")
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
class LstmForwardOp : public GemmOpKernel {
 public:
  using GemmOpKernel::GemmOpKernel;

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
    const bool has_mask = mask.NumElements() > 0;
    Tensor masked;  // the masked h fed to the next step's GEMM
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(proj.dtype(), has_mask ? h0.shape() : TensorShape({0}), &masked));

    const Gemm<T> gemm(ctx, allow_onednn());
    const T* m = has_mask ? mask.flat<T>().data() : nullptr;
    const T* p = proj.flat<T>().data();
    const T* u = rkernel.flat<T>().data();
    T* hs = h_seq->flat<T>().data();
    T* cs = c_seq->flat<T>().data();
    T* ys = y_seq->flat<T>().data();
    T* hm = has_mask ? masked.flat<T>().data() : nullptr;
    const T* h_prev = h0.flat<T>().data();
    const T* c_prev = c0.flat<T>().data();
    if (has_mask && steps > 0) {
      Vec<T>(hm, state_size) = ConstVec<T>(h_prev, state_size) * ConstVec<T>(m, state_size);
    }

    for (int64_t t = 0; t < steps; ++t) {
      T* y = ys + t * batch * gates;
      const T* p_t = p + t * batch * gates;
      gemm(false, batch, gates, units, has_mask ? hm : h_prev, units, u, gates, y, gates);
      T* h = hs + t * state_size;
      T* c = cs + t * state_size;
      const T* cp = c_prev;
      ParallelRows(ctx, batch, 60.0 * gates, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          Vec<T> yb(y + b * gates, gates);
          yb = (yb + ConstVec<T>(p_t + b * gates, gates)).logistic();
          const auto i = yb.segment(0, units), f = yb.segment(units, units);
          const auto g = yb.segment(2 * units, units), o = yb.segment(3 * units, units);
          Vec<T> cb(c + b * units, units), hb(h + b * units, units);
          cb = ConstVec<T>(cp + b * units, units) * f + i * (T(2) * g - T(1));
          hb = cb.tanh() * o;
          if (has_mask) Vec<T>(hm + b * units, units) = hb * ConstVec<T>(m + b * units, units);
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
class LstmBackwardOp : public GemmOpKernel {
 public:
  using GemmOpKernel::GemmOpKernel;

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
    Tensor u_transposed_t, tanh_c_t, h_prev_t;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(y_seq.dtype(), TensorShape({gates, units}), &u_transposed_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(y_seq.dtype(), h0.shape(), &tanh_c_t));
    // The (masked) h fed to the recurrent matmul at every step, for the weight gradient.
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(y_seq.dtype(), seq, &h_prev_t));

    const Gemm<T> gemm(ctx, allow_onednn());
    const bool has_mask = mask.NumElements() > 0;
    const T* m = has_mask ? mask.flat<T>().data() : nullptr;
    const T* dhs = d_h_seq.flat<T>().data();
    const T* hs = h_seq.flat<T>().data();
    const T* cs = c_seq.flat<T>().data();
    const T* ys = y_seq.flat<T>().data();
    T* dz_all = d_proj->flat<T>().data();
    T* dh_carry = d_h0->flat<T>().data();  // d_h0/d_c0 double as the carries
    T* dc_carry = d_c0->flat<T>().data();
    T* tanh_cs = tanh_c_t.flat<T>().data();
    std::memcpy(dh_carry, d_h_last.flat<T>().data(), state_size * sizeof(T));
    std::memcpy(dc_carry, d_c_last.flat<T>().data(), state_size * sizeof(T));
    // dz @ U^T runs faster against U^T laid out in memory than with a transposed operand.
    T* ut = u_transposed_t.flat<T>().data();
    Eigen::Map<Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>(ut, gates, units) =
        Eigen::Map<const Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>(
            rkernel.flat<T>().data(), units, gates).transpose();

    for (int64_t t = steps - 1; t >= 0; --t) {
      const T* y = ys + t * batch * gates;
      const T* c = cs + t * state_size;
      const T* cp = t > 0 ? cs + (t - 1) * state_size : c0.flat<T>().data();
      const T* dho = dhs + t * state_size;
      T* dz = dz_all + t * batch * gates;
      ParallelRows(ctx, batch, 40.0 * gates, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          const int64_t k = b * units;
          ConstVec<T> yb(y + b * gates, gates);
          const auto i = yb.segment(0, units), f = yb.segment(units, units);
          const auto g = yb.segment(2 * units, units), o = yb.segment(3 * units, units);
          Vec<T> dzb(dz + b * gates, gates), dcb(dc_carry + k, units), dhb(dh_carry + k, units);
          Vec<T> tanh_c(tanh_cs + k, units);
          tanh_c = ConstVec<T>(c + k, units).tanh();
          dhb += ConstVec<T>(dho + k, units);  // dh of this step: from above and from step t + 1
          dcb += dhb * o * (T(1) - tanh_c.square());
          dzb.segment(0, units) = dcb * (T(2) * g - T(1)) * i * (T(1) - i);
          dzb.segment(units, units) = dcb * ConstVec<T>(cp + k, units) * f * (T(1) - f);
          dzb.segment(2 * units, units) = dcb * (T(2) * i) * g * (T(1) - g);
          dzb.segment(3 * units, units) = dhb * tanh_c * o * (T(1) - o);
          dcb *= f;
        }
      });
      gemm(false, batch, units, gates, dz, gates, ut, units, dh_carry, units);
      if (has_mask) Vec<T>(dh_carry, state_size) *= ConstVec<T>(m, state_size);
    }

    // Weight gradient: (masked h_{t-1})^T @ dz over all T * B rows in one GEMM.
    RecurrentKernelGradient(gemm, steps, batch, units, gates, h0.flat<T>().data(), hs, m, dz_all,
                            h_prev_t.flat<T>().data(), d_rkernel->flat<T>().data());
  }
};

REGISTER_OP("DistRnnGemmBackend")
    .Output("backend: string")
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->Scalar());
      return absl::OkStatus();
    })
    .Doc("Which GEMM the float32 ops use with gemm='auto': 'onednn' or 'eigen'.");

class GemmBackendOp : public OpKernel {
 public:
  explicit GemmBackendOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    Tensor* out;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({}), &out));
    out->scalar<::tensorflow::tstring>()() = Gemm<float>(ctx, true).onednn() ? "onednn" : "eigen";
  }
};

REGISTER_KERNEL_BUILDER(Name("DistRnnGemmBackend").Device(DEVICE_CPU), GemmBackendOp);

DIST_RNN_REGISTER_CPU_KERNELS("DistRnnLstmForward", LstmForwardOp);
DIST_RNN_REGISTER_CPU_KERNELS("DistRnnLstmBackward", LstmBackwardOp);

}  // namespace
}  // namespace dist_rnn
