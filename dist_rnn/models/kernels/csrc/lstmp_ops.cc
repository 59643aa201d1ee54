// The projected LSTM recurrence (LSTMP) of dist_rnn.models.kernels.projected.lstmp
// as two compiled CPU ops: DistRnnLstmpForward and DistRnnLstmpBackward.
//
// Same layouts and semantics as the graph kernel: time-major input projection
// proj (T, B, 4U) = x @ W + b with gate order i, f, c, o and the c-gate
// columns doubled (tanh(a) = 2 sigmoid(2a) - 1, so one sigmoid gives every
// gate), recurrent kernel (P, 4U) likewise doubled, projection pkernel (U, P)
// with m_t = sigmoid(o) tanh(c_t) and h_t = m_t @ pkernel, and a recurrent
// dropout mask (B, P) multiplying h before the recurrent matmul; an empty
// mask (0 elements) means no dropout.
//
// Forward, per step: one GEMM h @ U into the step's gate buffer, one pass
// over the batch rows that adds the projection, applies the sigmoid and
// updates c and m, then one GEMM m @ P into h. Backward, per step in reverse:
// one GEMM dm = dh @ P^T, one pass that turns dm and dc into the gate
// gradients dz, then one GEMM dz @ U^T (P^T and U^T transposed once per
// call). The gradients of U and P are one GEMM each over all T * B rows. No
// allocation inside the loops.

#include <cstring>

#include "op_common.h"

namespace dist_rnn {
namespace {

using namespace ::dist_rnn::ops;  // NOLINT(build/namespaces): the shared op vocabulary

// Writes the (cols, rows) transpose of the row-major (rows, cols) matrix src into dst.
template <typename T>
void Transpose(const T* src, int64_t rows, int64_t cols, T* dst) {
  using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  Eigen::Map<Matrix>(dst, cols, rows) = Eigen::Map<const Matrix>(src, rows, cols).transpose();
}

Status LstmpForwardShape(InferenceContext* c) {
  ShapeHandle proj, h0, c0, rkernel, pkernel;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 3, &proj));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &h0));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 2, &c0));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 2, &rkernel));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(4), 2, &pkernel));
  DimensionHandle steps = c->Dim(proj, 0), batch = c->Dim(proj, 1);
  DimensionHandle units = c->Dim(pkernel, 0), projection = c->Dim(pkernel, 1);
  ShapeHandle h_seq = c->MakeShape({steps, batch, projection});
  ShapeHandle unit_seq = c->MakeShape({steps, batch, units});
  c->set_output(0, h_seq);
  c->set_output(1, c->MakeShape({batch, projection}));
  c->set_output(2, c->MakeShape({batch, units}));
  c->set_output(3, unit_seq);
  c->set_output(4, proj);
  c->set_output(5, unit_seq);
  return absl::OkStatus();
}

Status LstmpBackwardShape(InferenceContext* c) {
  // Inputs: d_h_seq, d_h_last, d_c_last, h0, c0, rkernel, pkernel, mask, h_seq, c_seq, gates, m_seq.
  c->set_output(0, c->input(10));
  c->set_output(1, c->input(3));
  c->set_output(2, c->input(4));
  c->set_output(3, c->input(5));
  c->set_output(4, c->input(6));
  return absl::OkStatus();
}

REGISTER_OP("DistRnnLstmpForward")
    .Input("proj: T")
    .Input("h0: T")
    .Input("c0: T")
    .Input("rkernel: T")
    .Input("pkernel: T")
    .Input("mask: T")
    .Output("h_seq: T")
    .Output("h_last: T")
    .Output("c_last: T")
    .Output("c_seq: T")
    .Output("gates: T")
    .Output("m_seq: T")
    .Attr("T: {float, double}")
    .Attr("gemm: {'auto', 'eigen'} = 'auto'")
    .SetShapeFn(LstmpForwardShape)
    .Doc("Projected LSTM recurrence over a time-major input projection; gates are the sigmoid outputs, "
         "m_seq the unprojected outputs. gemm='eigen' forces Eigen's matrix product (for tests).");

REGISTER_OP("DistRnnLstmpBackward")
    .Input("d_h_seq: T")
    .Input("d_h_last: T")
    .Input("d_c_last: T")
    .Input("h0: T")
    .Input("c0: T")
    .Input("rkernel: T")
    .Input("pkernel: T")
    .Input("mask: T")
    .Input("h_seq: T")
    .Input("c_seq: T")
    .Input("gates: T")
    .Input("m_seq: T")
    .Output("d_proj: T")
    .Output("d_h0: T")
    .Output("d_c0: T")
    .Output("d_rkernel: T")
    .Output("d_pkernel: T")
    .Attr("T: {float, double}")
    .Attr("gemm: {'auto', 'eigen'} = 'auto'")
    .SetShapeFn(LstmpBackwardShape)
    .Doc("Gradients of DistRnnLstmpForward with respect to proj, h0, c0, rkernel and pkernel.");

// Checks proj (T, B, 4U), h0 (B, P), c0 (B, U), rkernel (P, 4U), pkernel (U, P), mask (B, P) or empty.
Status CheckLstmpShapes(const Tensor& proj, const Tensor& h0, const Tensor& c0, const Tensor& rkernel,
                        const Tensor& pkernel, const Tensor& mask) {
  if (proj.dims() != 3) return InvalidArgument("proj must be (T, B, 4U), got ", proj.shape().DebugString());
  if (pkernel.dims() != 2) return InvalidArgument("pkernel must be (U, P), got ", pkernel.shape().DebugString());
  const int64_t batch = proj.dim_size(1), units = pkernel.dim_size(0), projection = pkernel.dim_size(1);
  if (rkernel.shape() != TensorShape({projection, 4 * units}))
    return InvalidArgument("rkernel must be (P, 4U) = ", TensorShape({projection, 4 * units}).DebugString(),
                           ", got ", rkernel.shape().DebugString());
  if (proj.dim_size(2) != 4 * units) return InvalidArgument("proj's last dimension must be 4U = ", 4 * units);
  const TensorShape h_state({batch, projection}), c_state({batch, units});
  if (h0.shape() != h_state) return InvalidArgument("h0 must be ", h_state.DebugString());
  if (c0.shape() != c_state) return InvalidArgument("c0 must be ", c_state.DebugString());
  if (mask.NumElements() != 0 && mask.shape() != h_state)
    return InvalidArgument("mask must be empty or ", h_state.DebugString());
  return absl::OkStatus();
}

template <typename T>
class LstmpForwardOp : public GemmOpKernel {
 public:
  using GemmOpKernel::GemmOpKernel;

  void Compute(OpKernelContext* ctx) override {
    const Tensor& proj = ctx->input(0);
    const Tensor& h0 = ctx->input(1);
    const Tensor& c0 = ctx->input(2);
    const Tensor& rkernel = ctx->input(3);
    const Tensor& pkernel = ctx->input(4);
    const Tensor& mask = ctx->input(5);
    OP_REQUIRES_OK(ctx, CheckLstmpShapes(proj, h0, c0, rkernel, pkernel, mask));
    const int64_t steps = proj.dim_size(0), batch = proj.dim_size(1);
    const int64_t units = pkernel.dim_size(0), projection = pkernel.dim_size(1);
    const int64_t gates = 4 * units, h_size = batch * projection, c_size = batch * units;

    Tensor *h_seq, *h_last, *c_last, *c_seq, *y_seq, *m_seq;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({steps, batch, projection}), &h_seq));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, h0.shape(), &h_last));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, c0.shape(), &c_last));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, TensorShape({steps, batch, units}), &c_seq));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(4, proj.shape(), &y_seq));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(5, TensorShape({steps, batch, units}), &m_seq));
    const bool has_mask = mask.NumElements() > 0;
    Tensor masked;  // the masked h fed to the next step's GEMM
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(proj.dtype(), has_mask ? h0.shape() : TensorShape({0}), &masked));

    const Gemm<T> gemm(ctx, allow_onednn());
    const T* dropout = has_mask ? mask.flat<T>().data() : nullptr;
    const T* p = proj.flat<T>().data();
    const T* u = rkernel.flat<T>().data();
    const T* pk = pkernel.flat<T>().data();
    T* hs = h_seq->flat<T>().data();
    T* cs = c_seq->flat<T>().data();
    T* ys = y_seq->flat<T>().data();
    T* ms = m_seq->flat<T>().data();
    T* hm = has_mask ? masked.flat<T>().data() : nullptr;
    const T* h_prev = h0.flat<T>().data();
    const T* c_prev = c0.flat<T>().data();
    if (has_mask && steps > 0) {
      Vec<T>(hm, h_size) = ConstVec<T>(h_prev, h_size) * ConstVec<T>(dropout, h_size);
    }

    for (int64_t t = 0; t < steps; ++t) {
      T* y = ys + t * batch * gates;
      const T* p_t = p + t * batch * gates;
      gemm(false, batch, gates, projection, has_mask ? hm : h_prev, projection, u, gates, y, gates);
      T* c = cs + t * c_size;
      T* m = ms + t * c_size;
      const T* cp = c_prev;
      ParallelRows(ctx, batch, 60.0 * gates, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          Vec<T> yb(y + b * gates, gates);
          yb = (yb + ConstVec<T>(p_t + b * gates, gates)).logistic();
          const auto i = yb.segment(0, units), f = yb.segment(units, units);
          const auto g = yb.segment(2 * units, units), o = yb.segment(3 * units, units);
          Vec<T> cb(c + b * units, units);
          cb = ConstVec<T>(cp + b * units, units) * f + i * (T(2) * g - T(1));
          Vec<T>(m + b * units, units) = cb.tanh() * o;
        }
      });
      T* h = hs + t * h_size;
      gemm(false, batch, projection, units, m, units, pk, projection, h, projection);
      if (has_mask) Vec<T>(hm, h_size) = ConstVec<T>(h, h_size) * ConstVec<T>(dropout, h_size);
      h_prev = h;
      c_prev = c;
    }
    std::memcpy(h_last->flat<T>().data(), h_prev, h_size * sizeof(T));
    std::memcpy(c_last->flat<T>().data(), c_prev, c_size * sizeof(T));
  }
};

template <typename T>
class LstmpBackwardOp : public GemmOpKernel {
 public:
  using GemmOpKernel::GemmOpKernel;

  void Compute(OpKernelContext* ctx) override {
    const Tensor& d_h_seq = ctx->input(0);
    const Tensor& d_h_last = ctx->input(1);
    const Tensor& d_c_last = ctx->input(2);
    const Tensor& h0 = ctx->input(3);
    const Tensor& c0 = ctx->input(4);
    const Tensor& rkernel = ctx->input(5);
    const Tensor& pkernel = ctx->input(6);
    const Tensor& mask = ctx->input(7);
    const Tensor& h_seq = ctx->input(8);
    const Tensor& c_seq = ctx->input(9);
    const Tensor& y_seq = ctx->input(10);
    const Tensor& m_seq = ctx->input(11);
    OP_REQUIRES_OK(ctx, CheckLstmpShapes(y_seq, h0, c0, rkernel, pkernel, mask));
    const int64_t steps = y_seq.dim_size(0), batch = y_seq.dim_size(1);
    const int64_t units = pkernel.dim_size(0), projection = pkernel.dim_size(1);
    const int64_t gates = 4 * units, h_size = batch * projection, c_size = batch * units;
    const TensorShape h_seq_shape({steps, batch, projection}), c_seq_shape({steps, batch, units});
    OP_REQUIRES(ctx, d_h_seq.shape() == h_seq_shape && h_seq.shape() == h_seq_shape,
                InvalidArgument("d_h_seq and h_seq must be ", h_seq_shape.DebugString()));
    OP_REQUIRES(ctx, c_seq.shape() == c_seq_shape && m_seq.shape() == c_seq_shape,
                InvalidArgument("c_seq and m_seq must be ", c_seq_shape.DebugString()));
    OP_REQUIRES(ctx, d_h_last.shape() == h0.shape() && d_c_last.shape() == c0.shape(),
                InvalidArgument("d_h_last must be ", h0.shape().DebugString(), " and d_c_last ",
                                c0.shape().DebugString()));

    Tensor *d_proj, *d_h0, *d_c0, *d_rkernel, *d_pkernel;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, y_seq.shape(), &d_proj));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, h0.shape(), &d_h0));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, c0.shape(), &d_c0));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, rkernel.shape(), &d_rkernel));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(4, pkernel.shape(), &d_pkernel));
    Tensor u_transposed_t, p_transposed_t, dm_t, tanh_c_t, dh_seq_t, h_prev_t;
    const auto dtype = y_seq.dtype();
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(dtype, TensorShape({gates, projection}), &u_transposed_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(dtype, TensorShape({projection, units}), &p_transposed_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(dtype, c0.shape(), &dm_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(dtype, c0.shape(), &tanh_c_t));
    // dh of every step (for the P gradient) and the (masked) h fed to h @ U (for the U gradient).
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(dtype, h_seq_shape, &dh_seq_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(dtype, h_seq_shape, &h_prev_t));

    const Gemm<T> gemm(ctx, allow_onednn());
    const bool has_mask = mask.NumElements() > 0;
    const T* dropout = has_mask ? mask.flat<T>().data() : nullptr;
    const T* dhs = d_h_seq.flat<T>().data();
    const T* hs = h_seq.flat<T>().data();
    const T* cs = c_seq.flat<T>().data();
    const T* ys = y_seq.flat<T>().data();
    const T* ms = m_seq.flat<T>().data();
    T* dz_all = d_proj->flat<T>().data();
    T* dh_all = dh_seq_t.flat<T>().data();
    T* dh_carry = d_h0->flat<T>().data();  // d_h0/d_c0 double as the carries
    T* dc_carry = d_c0->flat<T>().data();
    T* dm = dm_t.flat<T>().data();
    T* tanh_cs = tanh_c_t.flat<T>().data();
    std::memcpy(dh_carry, d_h_last.flat<T>().data(), h_size * sizeof(T));
    std::memcpy(dc_carry, d_c_last.flat<T>().data(), c_size * sizeof(T));
    // dz @ U^T and dh @ P^T run faster against the transposes laid out in memory.
    T* ut = u_transposed_t.flat<T>().data();
    T* pt = p_transposed_t.flat<T>().data();
    Transpose(rkernel.flat<T>().data(), projection, gates, ut);
    Transpose(pkernel.flat<T>().data(), units, projection, pt);

    for (int64_t t = steps - 1; t >= 0; --t) {
      const T* y = ys + t * batch * gates;
      const T* c = cs + t * c_size;
      const T* cp = t > 0 ? cs + (t - 1) * c_size : c0.flat<T>().data();
      T* dh = dh_all + t * h_size;
      T* dz = dz_all + t * batch * gates;
      // dh of this step: from above and from step t + 1.
      Vec<T>(dh, h_size) = ConstVec<T>(dhs + t * h_size, h_size) + ConstVec<T>(dh_carry, h_size);
      gemm(false, batch, units, projection, dh, projection, pt, units, dm, units);
      ParallelRows(ctx, batch, 40.0 * gates, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          const int64_t k = b * units;
          ConstVec<T> yb(y + b * gates, gates);
          const auto i = yb.segment(0, units), f = yb.segment(units, units);
          const auto g = yb.segment(2 * units, units), o = yb.segment(3 * units, units);
          Vec<T> dzb(dz + b * gates, gates), dcb(dc_carry + k, units);
          ConstVec<T> dmb(dm + k, units);
          Vec<T> tanh_c(tanh_cs + k, units);
          tanh_c = ConstVec<T>(c + k, units).tanh();
          dcb += dmb * o * (T(1) - tanh_c.square());
          dzb.segment(0, units) = dcb * (T(2) * g - T(1)) * i * (T(1) - i);
          dzb.segment(units, units) = dcb * ConstVec<T>(cp + k, units) * f * (T(1) - f);
          dzb.segment(2 * units, units) = dcb * (T(2) * i) * g * (T(1) - g);
          dzb.segment(3 * units, units) = dmb * tanh_c * o * (T(1) - o);
          dcb *= f;
        }
      });
      gemm(false, batch, projection, gates, dz, gates, ut, projection, dh_carry, projection);
      if (has_mask) Vec<T>(dh_carry, h_size) *= ConstVec<T>(dropout, h_size);
    }

    // Weight gradients over all T * B rows, one GEMM each:
    // U: (masked h_{t-1})^T @ dz;  P: m^T @ dh.
    RecurrentKernelGradient(gemm, steps, batch, projection, gates, h0.flat<T>().data(), hs, dropout, dz_all,
                            h_prev_t.flat<T>().data(), d_rkernel->flat<T>().data());
    if (steps == 0) {
      std::memset(d_pkernel->flat<T>().data(), 0, pkernel.NumElements() * sizeof(T));
    } else {
      gemm(true, units, projection, steps * batch, ms, units, dh_all, projection, d_pkernel->flat<T>().data(),
           projection);
    }
  }
};

DIST_RNN_REGISTER_CPU_KERNELS("DistRnnLstmpForward", LstmpForwardOp);
DIST_RNN_REGISTER_CPU_KERNELS("DistRnnLstmpBackward", LstmpBackwardOp);

}  // namespace
}  // namespace dist_rnn
