// The layer-normalized GRU recurrence of dist_rnn.models.kernels.layer_norm.ln_gru
// as two compiled CPU ops: DistRnnLnGruForward and DistRnnLnGruBackward.
//
// Same layouts and semantics as the graph kernel: time-major input projection
// proj (T, B, 3U), gate order z, r, n; recurrent kernel (U, 3U); no biases
// (the layer-norm shifts play their role). With hu = (h * mask) @ U:
//   [z, r] = sigmoid(LN_zr(proj_zr + hu_zr) * gate_gamma + gate_beta)   (two U-wide norms)
//   n      = tanh(LN_n(proj_n + r * hu_n) * cand_gamma + cand_beta)
//   h_t    = n + z * (h_{t-1} - n)
// The recurrent dropout mask multiplies only the h fed to the matmul; the
// update uses the unmasked h. Statistics are the mean and the biased variance
// over the units, eps added to every variance (a scalar input of type T, as in
// ln_lstm_ops.cc, so that float64 gets eps in float64). An empty mask (0
// elements) means no recurrent dropout.
//
// Forward, per step: one GEMM h @ U, then one pass over the batch rows that
// adds the projection, does both layer norms, the sigmoid, the tanh and the
// update. It saves what the backward needs, as the graph kernel does: zr, hu_n,
// n, the normalized gates ghat with their reciprocal standard deviations
// (T, B, 2), and the normalized candidate qhat with its (T, B).
// Backward, per step in reverse: one pass from dh through both layer norms to
// the gradient dhu at h @ U, then one GEMM dhu @ U^T. The gain/shift gradients
// accumulate per batch row (each row belongs to one shard per step, so no
// races) and are summed over rows at the end; the recurrent-kernel gradient is
// one GEMM over all T * B rows. GEMMs: gemm.h (oneDNN's sgemm when available,
// else Eigen).

#include <cmath>
#include <cstring>

#include "layer_norm.h"
#include "op_common.h"

namespace dist_rnn {
namespace {

using namespace ::dist_rnn::ops;  // NOLINT(build/namespaces): the shared op vocabulary

Status LnGruForwardShape(InferenceContext* c) {
  ShapeHandle proj, h0, rkernel;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 3, &proj));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &h0));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 2, &rkernel));
  DimensionHandle steps = c->Dim(proj, 0), batch = c->Dim(proj, 1), units = c->Dim(rkernel, 0);
  DimensionHandle two_units;
  TF_RETURN_IF_ERROR(c->Multiply(units, 2, &two_units));
  ShapeHandle seq = c->MakeShape({steps, batch, units});
  ShapeHandle gate_seq = c->MakeShape({steps, batch, two_units});
  c->set_output(0, seq);                                      // h_seq
  c->set_output(1, c->MakeShape({batch, units}));             // h_last
  c->set_output(2, gate_seq);                                 // zr
  c->set_output(3, seq);                                      // hu_n
  c->set_output(4, seq);                                      // n
  c->set_output(5, gate_seq);                                 // ghat
  c->set_output(6, c->MakeShape({steps, batch, c->MakeDim(2)}));  // rstd_g
  c->set_output(7, seq);                                      // qhat
  c->set_output(8, c->MakeShape({steps, batch}));             // rstd_q
  return absl::OkStatus();
}

Status LnGruBackwardShape(InferenceContext* c) {
  // Inputs: d_h_seq, d_h_last, h0, rkernel, gate_gamma, cand_gamma, mask,
  // h_seq, zr, hu_n, n, ghat, rstd_g, qhat, rstd_q.
  ShapeHandle d_h_seq, rkernel;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 3, &d_h_seq));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 2, &rkernel));
  c->set_output(0, c->MakeShape({c->Dim(d_h_seq, 0), c->Dim(d_h_seq, 1), c->Dim(rkernel, 1)}));
  c->set_output(1, c->input(2));
  c->set_output(2, c->input(3));
  c->set_output(3, c->input(4));
  c->set_output(4, c->input(4));
  c->set_output(5, c->input(5));
  c->set_output(6, c->input(5));
  return absl::OkStatus();
}

REGISTER_OP("DistRnnLnGruForward")
    .Input("proj: T")
    .Input("h0: T")
    .Input("rkernel: T")
    .Input("gate_gamma: T")
    .Input("gate_beta: T")
    .Input("cand_gamma: T")
    .Input("cand_beta: T")
    .Input("mask: T")
    .Input("eps: T")
    .Output("h_seq: T")
    .Output("h_last: T")
    .Output("zr: T")
    .Output("hu_n: T")
    .Output("n: T")
    .Output("ghat: T")
    .Output("rstd_g: T")
    .Output("qhat: T")
    .Output("rstd_q: T")
    .Attr("T: {float, double}")
    .Attr("gemm: {'auto', 'eigen'} = 'auto'")
    .SetShapeFn(LnGruForwardShape)
    .Doc("Layer-normalized GRU recurrence over a time-major input projection; zr are the sigmoid gates, "
         "ghat/qhat the normalized gates and candidate with their reciprocal standard deviations.");

REGISTER_OP("DistRnnLnGruBackward")
    .Input("d_h_seq: T")
    .Input("d_h_last: T")
    .Input("h0: T")
    .Input("rkernel: T")
    .Input("gate_gamma: T")
    .Input("cand_gamma: T")
    .Input("mask: T")
    .Input("h_seq: T")
    .Input("zr: T")
    .Input("hu_n: T")
    .Input("n: T")
    .Input("ghat: T")
    .Input("rstd_g: T")
    .Input("qhat: T")
    .Input("rstd_q: T")
    .Output("d_proj: T")
    .Output("d_h0: T")
    .Output("d_rkernel: T")
    .Output("d_gate_gamma: T")
    .Output("d_gate_beta: T")
    .Output("d_cand_gamma: T")
    .Output("d_cand_beta: T")
    .Attr("T: {float, double}")
    .Attr("gemm: {'auto', 'eigen'} = 'auto'")
    .SetShapeFn(LnGruBackwardShape)
    .Doc("Gradients of DistRnnLnGruForward with respect to proj, h0, rkernel, gate_gamma, gate_beta, "
         "cand_gamma and cand_beta.");

// Checks h0 (B, U), rkernel (U, 3U), gate_gamma (2U), cand_gamma (U), mask (B, U) or empty.
Status CheckShapes(const Tensor& h0, const Tensor& rkernel, const Tensor& gate_gamma, const Tensor& cand_gamma,
                   const Tensor& mask) {
  if (rkernel.dims() != 2 || rkernel.dim_size(1) != 3 * rkernel.dim_size(0))
    return InvalidArgument("rkernel must be (U, 3U), got ", rkernel.shape().DebugString());
  const int64_t units = rkernel.dim_size(0);
  if (h0.dims() != 2 || h0.dim_size(1) != units)
    return InvalidArgument("h0 must be (B, U) with U = ", units, ", got ", h0.shape().DebugString());
  if (gate_gamma.shape() != TensorShape({2 * units}))
    return InvalidArgument("gate_gamma and gate_beta must be (", 2 * units, ")");
  if (cand_gamma.shape() != TensorShape({units}))
    return InvalidArgument("cand_gamma and cand_beta must be (", units, ")");
  if (mask.NumElements() != 0 && mask.shape() != h0.shape())
    return InvalidArgument("mask must be empty or ", h0.shape().DebugString());
  return absl::OkStatus();
}

template <typename T>
class LnGruForwardOp : public GemmOpKernel {
 public:
  using GemmOpKernel::GemmOpKernel;

  void Compute(OpKernelContext* ctx) override {
    const Tensor& proj = ctx->input(0);
    const Tensor& h0 = ctx->input(1);
    const Tensor& rkernel = ctx->input(2);
    const Tensor& gate_gamma = ctx->input(3);
    const Tensor& gate_beta = ctx->input(4);
    const Tensor& cand_gamma = ctx->input(5);
    const Tensor& cand_beta = ctx->input(6);
    const Tensor& mask = ctx->input(7);
    const Tensor& eps_t = ctx->input(8);
    OP_REQUIRES_OK(ctx, CheckShapes(h0, rkernel, gate_gamma, cand_gamma, mask));
    OP_REQUIRES(ctx, gate_beta.shape() == gate_gamma.shape() && cand_beta.shape() == cand_gamma.shape(),
                InvalidArgument("gate_beta and cand_beta must be shaped like gate_gamma and cand_gamma"));
    OP_REQUIRES(ctx, eps_t.NumElements() == 1, InvalidArgument("eps must be a scalar"));
    const int64_t batch = h0.dim_size(0), units = h0.dim_size(1), gates = 3 * units;
    OP_REQUIRES(ctx, proj.dims() == 3 && proj.dim_size(1) == batch && proj.dim_size(2) == gates,
                InvalidArgument("proj must be (T, ", batch, ", ", gates, "), got ", proj.shape().DebugString()));
    const int64_t steps = proj.dim_size(0), state_size = batch * units;
    const TensorShape seq({steps, batch, units}), gate_seq({steps, batch, 2 * units});

    Tensor *h_seq, *h_last, *zr_seq, *hn_seq, *n_seq, *ghat_seq, *rg_seq, *qhat_seq, *rq_seq;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, seq, &h_seq));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, h0.shape(), &h_last));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, gate_seq, &zr_seq));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, seq, &hn_seq));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(4, seq, &n_seq));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(5, gate_seq, &ghat_seq));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(6, TensorShape({steps, batch, 2}), &rg_seq));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(7, seq, &qhat_seq));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(8, TensorShape({steps, batch}), &rq_seq));
    const bool has_mask = mask.NumElements() > 0;
    // hu: the current step's h @ U; masked: the masked h fed to the next step's GEMM.
    Tensor hu_t, masked;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(proj.dtype(), TensorShape({batch, gates}), &hu_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(proj.dtype(), has_mask ? h0.shape() : TensorShape({0}), &masked));

    const Gemm<T> gemm(ctx, allow_onednn());
    const T eps = eps_t.flat<T>()(0);
    const T* m = has_mask ? mask.flat<T>().data() : nullptr;
    const T* p = proj.flat<T>().data();
    const T* u = rkernel.flat<T>().data();
    const ConstVec<T> gg(gate_gamma.flat<T>().data(), 2 * units), gb(gate_beta.flat<T>().data(), 2 * units);
    const ConstVec<T> cg(cand_gamma.flat<T>().data(), units), cb(cand_beta.flat<T>().data(), units);
    T* hs = h_seq->flat<T>().data();
    T* zrs = zr_seq->flat<T>().data();
    T* hns = hn_seq->flat<T>().data();
    T* ns = n_seq->flat<T>().data();
    T* ghs = ghat_seq->flat<T>().data();
    T* rgs = rg_seq->flat<T>().data();
    T* qhs = qhat_seq->flat<T>().data();
    T* rqs = rq_seq->flat<T>().data();
    T* hu = hu_t.flat<T>().data();
    T* hm = has_mask ? masked.flat<T>().data() : nullptr;
    const T* h_prev = h0.flat<T>().data();
    if (has_mask && steps > 0) {
      Vec<T>(hm, state_size) = ConstVec<T>(h_prev, state_size) * ConstVec<T>(m, state_size);
    }

    for (int64_t t = 0; t < steps; ++t) {
      gemm(false, batch, gates, units, has_mask ? hm : h_prev, units, u, gates, hu, gates);
      const T* p_t = p + t * batch * gates;
      T* h = hs + t * state_size;
      T* zr = zrs + t * batch * 2 * units;
      T* hn = hns + t * state_size;
      T* n = ns + t * state_size;
      T* ghat = ghs + t * batch * 2 * units;
      T* rg = rgs + t * batch * 2;
      T* qhat = qhs + t * state_size;
      T* rq = rqs + t * batch;
      const T* hp = h_prev;
      ParallelRows(ctx, batch, 90.0 * gates, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          const int64_t k = b * units;
          const T* pb = p_t + b * gates;
          const T* hub = hu + b * gates;
          Vec<T> gh(ghat + 2 * k, 2 * units);
          gh = ConstVec<T>(pb, 2 * units) + ConstVec<T>(hub, 2 * units);
          for (int g = 0; g < 2; ++g) rg[b * 2 + g] = Normalize<T>(Vec<T>(ghat + 2 * k + g * units, units), eps);
          Vec<T> zrb(zr + 2 * k, 2 * units);
          zrb = (gh * gg + gb).logistic();
          const auto z = zrb.segment(0, units), r = zrb.segment(units, units);
          Vec<T> hnb(hn + k, units), qb(qhat + k, units), nb(n + k, units), hb(h + k, units);
          hnb = ConstVec<T>(hub + 2 * units, units);
          qb = ConstVec<T>(pb + 2 * units, units) + r * hnb;
          rq[b] = Normalize<T>(qb, eps);
          nb = (qb * cg + cb).tanh();
          hb = nb + z * (ConstVec<T>(hp + k, units) - nb);
          if (has_mask) Vec<T>(hm + k, units) = hb * ConstVec<T>(m + k, units);
        }
      });
      h_prev = h;
    }
    std::memcpy(h_last->flat<T>().data(), h_prev, state_size * sizeof(T));
  }
};

template <typename T>
class LnGruBackwardOp : public GemmOpKernel {
 public:
  using GemmOpKernel::GemmOpKernel;

  void Compute(OpKernelContext* ctx) override {
    const Tensor& d_h_seq = ctx->input(0);
    const Tensor& d_h_last = ctx->input(1);
    const Tensor& h0 = ctx->input(2);
    const Tensor& rkernel = ctx->input(3);
    const Tensor& gate_gamma = ctx->input(4);
    const Tensor& cand_gamma = ctx->input(5);
    const Tensor& mask = ctx->input(6);
    const Tensor& h_seq = ctx->input(7);
    const Tensor& zr_seq = ctx->input(8);
    const Tensor& hn_seq = ctx->input(9);
    const Tensor& n_seq = ctx->input(10);
    const Tensor& ghat_seq = ctx->input(11);
    const Tensor& rg_seq = ctx->input(12);
    const Tensor& qhat_seq = ctx->input(13);
    const Tensor& rq_seq = ctx->input(14);
    OP_REQUIRES_OK(ctx, CheckShapes(h0, rkernel, gate_gamma, cand_gamma, mask));
    OP_REQUIRES(ctx, d_h_seq.dims() == 3,
                InvalidArgument("d_h_seq must be (T, B, U), got ", d_h_seq.shape().DebugString()));
    const int64_t steps = d_h_seq.dim_size(0), batch = h0.dim_size(0), units = h0.dim_size(1);
    const int64_t gates = 3 * units, state_size = batch * units;
    const TensorShape seq({steps, batch, units}), gate_seq({steps, batch, 2 * units});
    OP_REQUIRES(ctx, d_h_seq.shape() == seq && h_seq.shape() == seq && hn_seq.shape() == seq &&
                         n_seq.shape() == seq && qhat_seq.shape() == seq,
                InvalidArgument("d_h_seq, h_seq, hu_n, n and qhat must be ", seq.DebugString()));
    OP_REQUIRES(ctx, zr_seq.shape() == gate_seq && ghat_seq.shape() == gate_seq,
                InvalidArgument("zr and ghat must be ", gate_seq.DebugString()));
    OP_REQUIRES(ctx, rg_seq.shape() == TensorShape({steps, batch, 2}) && rq_seq.shape() == TensorShape({steps, batch}),
                InvalidArgument("rstd_g must be (T, B, 2) and rstd_q (T, B)"));
    OP_REQUIRES(ctx, d_h_last.shape() == h0.shape(), InvalidArgument("d_h_last must be ", h0.shape().DebugString()));

    Tensor *d_proj, *d_h0, *d_rkernel, *d_gg, *d_gb, *d_cg, *d_cb;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({steps, batch, gates}), &d_proj));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, h0.shape(), &d_h0));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, rkernel.shape(), &d_rkernel));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, gate_gamma.shape(), &d_gg));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(4, gate_gamma.shape(), &d_gb));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(5, cand_gamma.shape(), &d_cg));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(6, cand_gamma.shape(), &d_cb));
    // dhu: the gradient at h @ U of every step (differs from d_proj in the n block: dq * r, not dq);
    // direct: dh_t * z_t, the part of dL/dh_{t-1} that skips U; h_prev_t: the (masked) h fed to the
    // recurrent matmul at every step, for the weight gradient.
    Tensor u_transposed_t, dhu_t, direct_t, h_prev_t, acc_t;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(h0.dtype(), TensorShape({gates, units}), &u_transposed_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(h0.dtype(), TensorShape({steps, batch, gates}), &dhu_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(h0.dtype(), h0.shape(), &direct_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(h0.dtype(), seq, &h_prev_t));
    // Per batch row: sums over time of dgate * ghat, dgate, dcand * qhat, dcand (the gain/shift gradients).
    const int64_t acc_width = 6 * units;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(h0.dtype(), TensorShape({batch, acc_width}), &acc_t));

    const Gemm<T> gemm(ctx, allow_onednn());
    const bool has_mask = mask.NumElements() > 0;
    const T* m = has_mask ? mask.flat<T>().data() : nullptr;
    const ConstVec<T> gg(gate_gamma.flat<T>().data(), 2 * units), cg(cand_gamma.flat<T>().data(), units);
    const T* dhs = d_h_seq.flat<T>().data();
    const T* hs = h_seq.flat<T>().data();
    const T* zrs = zr_seq.flat<T>().data();
    const T* hns = hn_seq.flat<T>().data();
    const T* ns = n_seq.flat<T>().data();
    const T* ghs = ghat_seq.flat<T>().data();
    const T* rgs = rg_seq.flat<T>().data();
    const T* qhs = qhat_seq.flat<T>().data();
    const T* rqs = rq_seq.flat<T>().data();
    T* dp_all = d_proj->flat<T>().data();
    T* dhu_all = dhu_t.flat<T>().data();
    // The carry dL/dh_t from later steps is direct + rec * mask, rec = dhu_{t+1} @ U^T; rec lives in
    // d_h0, which ends as that sum for t = -1.
    T* direct = direct_t.flat<T>().data();
    T* rec = d_h0->flat<T>().data();
    T* acc = acc_t.flat<T>().data();
    std::memset(acc, 0, batch * acc_width * sizeof(T));
    std::memcpy(direct, d_h_last.flat<T>().data(), state_size * sizeof(T));
    std::memset(rec, 0, state_size * sizeof(T));
    // dhu @ U^T runs faster against U^T laid out in memory than with a transposed operand.
    T* ut = u_transposed_t.flat<T>().data();
    Eigen::Map<Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>(ut, gates, units) =
        Eigen::Map<const Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>(
            rkernel.flat<T>().data(), units, gates).transpose();

    for (int64_t t = steps - 1; t >= 0; --t) {
      const T* zr = zrs + t * batch * 2 * units;
      const T* hn = hns + t * state_size;
      const T* n = ns + t * state_size;
      const T* ghat = ghs + t * batch * 2 * units;
      const T* rg = rgs + t * batch * 2;
      const T* qhat = qhs + t * state_size;
      const T* rq = rqs + t * batch;
      const T* hp = t > 0 ? hs + (t - 1) * state_size : h0.flat<T>().data();
      const T* dho = dhs + t * state_size;
      T* dp = dp_all + t * batch * gates;
      T* dhu = dhu_all + t * batch * gates;
      ParallelRows(ctx, batch, 100.0 * gates, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          const int64_t k = b * units;
          const ConstVec<T> z(zr + 2 * k, units), r(zr + 2 * k + units, units), nb(n + k, units);
          const ConstVec<T> qb(qhat + k, units), gh(ghat + 2 * k, 2 * units);
          T* accb = acc + b * acc_width;
          // dh of this step (in direct): from above and from step t + 1.
          Vec<T> dh(direct + k, units);
          if (has_mask) {
            dh += ConstVec<T>(dho + k, units) + ConstVec<T>(rec + k, units) * ConstVec<T>(m + k, units);
          } else {
            dh += ConstVec<T>(dho + k, units) + ConstVec<T>(rec + k, units);
          }
          // dcand, the gradient at LN_n(q) * cand_gamma + cand_beta, then dq through the norm, in
          // d_proj's n block (its final value).
          Vec<T> dq(dp + b * gates + 2 * units, units);
          dq = dh * (T(1) - z) * (T(1) - nb.square());
          Vec<T>(accb + 4 * units, units) += dq * qb;
          Vec<T>(accb + 5 * units, units) += dq;
          dq *= cg;
          NormalizeBackward<T>(dq, qb, rq[b]);
          // dgate, the gradient at the sigmoid arguments, then through the two gate norms.
          Vec<T> dg(dhu + b * gates, 2 * units);
          dg.segment(0, units) = dh * (ConstVec<T>(hp + k, units) - nb) * z * (T(1) - z);
          dg.segment(units, units) = dq * ConstVec<T>(hn + k, units) * r * (T(1) - r);
          Vec<T>(accb, 2 * units) += dg * gh;
          Vec<T>(accb + 2 * units, 2 * units) += dg;
          dg *= gg;
          for (int g = 0; g < 2; ++g) {
            NormalizeBackward<T>(Vec<T>(dhu + b * gates + g * units, units),
                                 ConstVec<T>(ghat + 2 * k + g * units, units), rg[b * 2 + g]);
          }
          Vec<T>(dp + b * gates, 2 * units) = dg;
          Vec<T>(dhu + b * gates + 2 * units, units) = dq * r;
          dh *= z;
        }
      });
      gemm(false, batch, units, gates, dhu, gates, ut, units, rec, units);
    }
    if (has_mask) {
      Vec<T>(rec, state_size) =
          ConstVec<T>(direct, state_size) + ConstVec<T>(rec, state_size) * ConstVec<T>(m, state_size);
    } else {
      Vec<T>(rec, state_size) += ConstVec<T>(direct, state_size);
    }

    // Gain/shift gradients: the per-row sums added over the batch.
    Vec<T> dgg(d_gg->flat<T>().data(), 2 * units), dgb(d_gb->flat<T>().data(), 2 * units);
    Vec<T> dcg(d_cg->flat<T>().data(), units), dcb(d_cb->flat<T>().data(), units);
    dgg.setZero();
    dgb.setZero();
    dcg.setZero();
    dcb.setZero();
    for (int64_t b = 0; b < batch; ++b) {
      const T* accb = acc + b * acc_width;
      dgg += ConstVec<T>(accb, 2 * units);
      dgb += ConstVec<T>(accb + 2 * units, 2 * units);
      dcg += ConstVec<T>(accb + 4 * units, units);
      dcb += ConstVec<T>(accb + 5 * units, units);
    }

    // Weight gradient: (masked h_{t-1})^T @ dhu over all T * B rows in one GEMM.
    RecurrentKernelGradient(gemm, steps, batch, units, gates, h0.flat<T>().data(), hs, m, dhu_all,
                            h_prev_t.flat<T>().data(), d_rkernel->flat<T>().data());
  }
};

}  // namespace

DIST_RNN_REGISTER_CPU_KERNELS("DistRnnLnGruForward", LnGruForwardOp);
DIST_RNN_REGISTER_CPU_KERNELS("DistRnnLnGruBackward", LnGruBackwardOp);

}  // namespace dist_rnn
