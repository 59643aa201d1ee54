// The layer-normalized LSTM recurrence of dist_rnn.models.kernels.layer_norm.ln_lstm
// as two compiled CPU ops: DistRnnLnLstmForward and DistRnnLnLstmBackward.
//
// Same layouts and semantics as the graph kernel: time-major input projection
// proj (T, B, 4U), gate order i, j, f, o; recurrent kernel (U, 4U); the gate
// pre-activations z = proj[t] + (h * mask) @ U are layer-normalized per gate
// (four U-wide groups), then y = sigmoid(zhat * gain + bias) with the j-gate
// scale 2 and the forget bias already folded into gain/bias by the layer; the
// carried cell state is the unnormalized c, and h = tanh(LN(c) * cell_gamma +
// cell_beta) * o. Statistics are the mean and the biased variance over the
// units, eps added to every variance (a scalar input of type T, not a float
// attribute, so that float64 gets eps in float64 like the graph kernel's
// statistics; a float32 eps shifts float64 results by ~1e-11). An empty mask (0 elements) means no
// recurrent dropout.
//
// Forward, per step: one GEMM h @ U, then one pass over the batch rows that
// adds the projection, does both layer norms, the sigmoid and the state
// update. It saves what the backward needs, like the graph kernel: c, the
// sigmoid outputs, the normalized gates zhat with their reciprocal standard
// deviations (T, B, 4), and the normalized cell chat with its (T, B).
// Backward, per step in reverse: one pass from dh and dc through both layer
// norms to dz, then one GEMM dz @ U^T. The gain/shift gradients accumulate
// per batch row (each row belongs to one shard per step, so no races) and are
// summed over rows at the end; the recurrent-kernel gradient is one GEMM over
// all T * B rows. GEMMs: gemm.h (oneDNN's sgemm when available, else Eigen).

#include <cmath>
#include <cstring>

#include "layer_norm.h"
#include "op_common.h"

namespace dist_rnn {
namespace {

using namespace ::dist_rnn::ops;  // NOLINT(build/namespaces): the shared op vocabulary

Status LnLstmForwardShape(InferenceContext* c) {
  ShapeHandle proj, h0, c0, rkernel;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 3, &proj));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &h0));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 2, &c0));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 2, &rkernel));
  DimensionHandle steps = c->Dim(proj, 0), batch = c->Dim(proj, 1), units = c->Dim(rkernel, 0);
  ShapeHandle seq = c->MakeShape({steps, batch, units});
  ShapeHandle state = c->MakeShape({batch, units});
  c->set_output(0, seq);                                      // h_seq
  c->set_output(1, state);                                    // h_last
  c->set_output(2, state);                                    // c_last
  c->set_output(3, seq);                                      // c_seq
  c->set_output(4, proj);                                     // gates
  c->set_output(5, proj);                                     // zhat
  c->set_output(6, c->MakeShape({steps, batch, c->MakeDim(4)}));  // rstd_z
  c->set_output(7, seq);                                      // chat
  c->set_output(8, c->MakeShape({steps, batch}));             // rstd_c
  return absl::OkStatus();
}

Status LnLstmBackwardShape(InferenceContext* c) {
  // Inputs: d_h_seq, d_h_last, d_c_last, h0, c0, rkernel, gain, cell_gamma, cell_beta, mask,
  // h_seq, c_seq, gates, zhat, rstd_z, chat, rstd_c.
  c->set_output(0, c->input(12));
  c->set_output(1, c->input(3));
  c->set_output(2, c->input(4));
  c->set_output(3, c->input(5));
  c->set_output(4, c->input(6));
  c->set_output(5, c->input(6));
  c->set_output(6, c->input(7));
  c->set_output(7, c->input(8));
  return absl::OkStatus();
}

REGISTER_OP("DistRnnLnLstmForward")
    .Input("proj: T")
    .Input("h0: T")
    .Input("c0: T")
    .Input("rkernel: T")
    .Input("gain: T")
    .Input("bias: T")
    .Input("cell_gamma: T")
    .Input("cell_beta: T")
    .Input("mask: T")
    .Input("eps: T")
    .Output("h_seq: T")
    .Output("h_last: T")
    .Output("c_last: T")
    .Output("c_seq: T")
    .Output("gates: T")
    .Output("zhat: T")
    .Output("rstd_z: T")
    .Output("chat: T")
    .Output("rstd_c: T")
    .Attr("T: {float, double}")
    .Attr("gemm: {'auto', 'eigen'} = 'auto'")
    .SetShapeFn(LnLstmForwardShape)
    .Doc("Layer-normalized LSTM recurrence over a time-major input projection; gates are the sigmoid "
         "outputs, zhat/chat the normalized gates and cell with their reciprocal standard deviations.");

REGISTER_OP("DistRnnLnLstmBackward")
    .Input("d_h_seq: T")
    .Input("d_h_last: T")
    .Input("d_c_last: T")
    .Input("h0: T")
    .Input("c0: T")
    .Input("rkernel: T")
    .Input("gain: T")
    .Input("cell_gamma: T")
    .Input("cell_beta: T")
    .Input("mask: T")
    .Input("h_seq: T")
    .Input("c_seq: T")
    .Input("gates: T")
    .Input("zhat: T")
    .Input("rstd_z: T")
    .Input("chat: T")
    .Input("rstd_c: T")
    .Output("d_proj: T")
    .Output("d_h0: T")
    .Output("d_c0: T")
    .Output("d_rkernel: T")
    .Output("d_gain: T")
    .Output("d_bias: T")
    .Output("d_cell_gamma: T")
    .Output("d_cell_beta: T")
    .Attr("T: {float, double}")
    .Attr("gemm: {'auto', 'eigen'} = 'auto'")
    .SetShapeFn(LnLstmBackwardShape)
    .Doc("Gradients of DistRnnLnLstmForward with respect to proj, h0, c0, rkernel, gain, bias, "
         "cell_gamma and cell_beta.");

// Checks proj (T, B, 4U), h0/c0 (B, U), rkernel (U, 4U), gain (4U), cell_gamma/cell_beta (U), mask.
Status CheckShapes(const Tensor& proj, const Tensor& h0, const Tensor& c0, const Tensor& rkernel,
                   const Tensor& gain, const Tensor& cell_gamma, const Tensor& cell_beta, const Tensor& mask) {
  if (proj.dims() != 3) return InvalidArgument("proj must be (T, B, 4U), got ", proj.shape().DebugString());
  if (rkernel.dims() != 2 || rkernel.dim_size(1) != 4 * rkernel.dim_size(0))
    return InvalidArgument("rkernel must be (U, 4U), got ", rkernel.shape().DebugString());
  const int64_t batch = proj.dim_size(1), units = rkernel.dim_size(0);
  if (proj.dim_size(2) != 4 * units) return InvalidArgument("proj's last dimension must be 4U = ", 4 * units);
  const TensorShape state({batch, units});
  if (h0.shape() != state || c0.shape() != state)
    return InvalidArgument("h0 and c0 must be ", state.DebugString());
  if (gain.shape() != TensorShape({4 * units})) return InvalidArgument("gain and bias must be (", 4 * units, ")");
  if (cell_gamma.shape() != TensorShape({units}) || cell_beta.shape() != TensorShape({units}))
    return InvalidArgument("cell_gamma and cell_beta must be (", units, ")");
  if (mask.NumElements() != 0 && mask.shape() != state)
    return InvalidArgument("mask must be empty or ", state.DebugString());
  return absl::OkStatus();
}

template <typename T>
class LnLstmForwardOp : public GemmOpKernel {
 public:
  using GemmOpKernel::GemmOpKernel;

  void Compute(OpKernelContext* ctx) override {
    const Tensor& proj = ctx->input(0);
    const Tensor& h0 = ctx->input(1);
    const Tensor& c0 = ctx->input(2);
    const Tensor& rkernel = ctx->input(3);
    const Tensor& gain = ctx->input(4);
    const Tensor& bias = ctx->input(5);
    const Tensor& cell_gamma = ctx->input(6);
    const Tensor& cell_beta = ctx->input(7);
    const Tensor& mask = ctx->input(8);
    const Tensor& eps_t = ctx->input(9);
    OP_REQUIRES_OK(ctx, CheckShapes(proj, h0, c0, rkernel, gain, cell_gamma, cell_beta, mask));
    OP_REQUIRES(ctx, eps_t.NumElements() == 1, InvalidArgument("eps must be a scalar"));
    OP_REQUIRES(ctx, bias.shape() == gain.shape(), InvalidArgument("bias must be ", gain.shape().DebugString()));
    const int64_t steps = proj.dim_size(0), batch = proj.dim_size(1), units = rkernel.dim_size(0);
    const int64_t gates = 4 * units, state_size = batch * units;
    const TensorShape seq({steps, batch, units});

    Tensor *h_seq, *h_last, *c_last, *c_seq, *y_seq, *zhat_seq, *rz_seq, *chat_seq, *rc_seq;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, seq, &h_seq));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, h0.shape(), &h_last));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, c0.shape(), &c_last));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, seq, &c_seq));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(4, proj.shape(), &y_seq));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(5, proj.shape(), &zhat_seq));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(6, TensorShape({steps, batch, 4}), &rz_seq));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(7, seq, &chat_seq));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(8, TensorShape({steps, batch}), &rc_seq));
    const bool has_mask = mask.NumElements() > 0;
    Tensor masked;  // the masked h fed to the next step's GEMM
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(proj.dtype(), has_mask ? h0.shape() : TensorShape({0}), &masked));

    const Gemm<T> gemm(ctx, allow_onednn());
    const T eps = eps_t.flat<T>()(0);
    const T* m = has_mask ? mask.flat<T>().data() : nullptr;
    const T* p = proj.flat<T>().data();
    const T* u = rkernel.flat<T>().data();
    const ConstVec<T> gn(gain.flat<T>().data(), gates), bs(bias.flat<T>().data(), gates);
    const ConstVec<T> cg(cell_gamma.flat<T>().data(), units), cbeta(cell_beta.flat<T>().data(), units);
    T* hs = h_seq->flat<T>().data();
    T* cs = c_seq->flat<T>().data();
    T* ys = y_seq->flat<T>().data();
    T* zs = zhat_seq->flat<T>().data();
    T* rzs = rz_seq->flat<T>().data();
    T* chs = chat_seq->flat<T>().data();
    T* rcs = rc_seq->flat<T>().data();
    T* hm = has_mask ? masked.flat<T>().data() : nullptr;
    const T* h_prev = h0.flat<T>().data();
    const T* c_prev = c0.flat<T>().data();
    if (has_mask && steps > 0) {
      Vec<T>(hm, state_size) = ConstVec<T>(h_prev, state_size) * ConstVec<T>(m, state_size);
    }

    for (int64_t t = 0; t < steps; ++t) {
      T* zhat = zs + t * batch * gates;  // holds z until normalized in place
      gemm(false, batch, gates, units, has_mask ? hm : h_prev, units, u, gates, zhat, gates);
      const T* p_t = p + t * batch * gates;
      T* y = ys + t * batch * gates;
      T* rz = rzs + t * batch * 4;
      T* h = hs + t * state_size;
      T* c = cs + t * state_size;
      T* chat = chs + t * state_size;
      T* rc = rcs + t * batch;
      const T* cp = c_prev;
      ParallelRows(ctx, batch, 90.0 * gates, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          Vec<T> zb(zhat + b * gates, gates);
          zb += ConstVec<T>(p_t + b * gates, gates);
          for (int g = 0; g < 4; ++g) rz[b * 4 + g] = Normalize<T>(Vec<T>(zhat + b * gates + g * units, units), eps);
          Vec<T> yb(y + b * gates, gates);
          yb = (zb * gn + bs).logistic();
          const auto i = yb.segment(0, units), j = yb.segment(units, units);
          const auto f = yb.segment(2 * units, units), o = yb.segment(3 * units, units);
          const int64_t k = b * units;
          Vec<T> cb(c + k, units), chb(chat + k, units), hb(h + k, units);
          cb = ConstVec<T>(cp + k, units) * f + i * (T(2) * j - T(1));
          chb = cb;
          rc[b] = Normalize<T>(chb, eps);
          hb = (chb * cg + cbeta).tanh() * o;
          if (has_mask) Vec<T>(hm + k, units) = hb * ConstVec<T>(m + k, units);
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
class LnLstmBackwardOp : public GemmOpKernel {
 public:
  using GemmOpKernel::GemmOpKernel;

  void Compute(OpKernelContext* ctx) override {
    const Tensor& d_h_seq = ctx->input(0);
    const Tensor& d_h_last = ctx->input(1);
    const Tensor& d_c_last = ctx->input(2);
    const Tensor& h0 = ctx->input(3);
    const Tensor& c0 = ctx->input(4);
    const Tensor& rkernel = ctx->input(5);
    const Tensor& gain = ctx->input(6);
    const Tensor& cell_gamma = ctx->input(7);
    const Tensor& cell_beta = ctx->input(8);
    const Tensor& mask = ctx->input(9);
    const Tensor& h_seq = ctx->input(10);
    const Tensor& c_seq = ctx->input(11);
    const Tensor& y_seq = ctx->input(12);
    const Tensor& zhat_seq = ctx->input(13);
    const Tensor& rz_seq = ctx->input(14);
    const Tensor& chat_seq = ctx->input(15);
    const Tensor& rc_seq = ctx->input(16);
    OP_REQUIRES_OK(ctx, CheckShapes(y_seq, h0, c0, rkernel, gain, cell_gamma, cell_beta, mask));
    const int64_t steps = y_seq.dim_size(0), batch = y_seq.dim_size(1), units = rkernel.dim_size(0);
    const int64_t gates = 4 * units, state_size = batch * units;
    const TensorShape seq({steps, batch, units});
    OP_REQUIRES(ctx, d_h_seq.shape() == seq && h_seq.shape() == seq && c_seq.shape() == seq &&
                         chat_seq.shape() == seq,
                InvalidArgument("d_h_seq, h_seq, c_seq and chat must be ", seq.DebugString()));
    OP_REQUIRES(ctx, zhat_seq.shape() == y_seq.shape(), InvalidArgument("zhat must be shaped like gates"));
    OP_REQUIRES(ctx, rz_seq.shape() == TensorShape({steps, batch, 4}) && rc_seq.shape() == TensorShape({steps, batch}),
                InvalidArgument("rstd_z must be (T, B, 4) and rstd_c (T, B)"));
    OP_REQUIRES(ctx, d_h_last.shape() == h0.shape() && d_c_last.shape() == h0.shape(),
                InvalidArgument("d_h_last and d_c_last must be ", h0.shape().DebugString()));

    Tensor *d_proj, *d_h0, *d_c0, *d_rkernel, *d_gain, *d_bias, *d_cg, *d_cb;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, y_seq.shape(), &d_proj));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, h0.shape(), &d_h0));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, c0.shape(), &d_c0));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, rkernel.shape(), &d_rkernel));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(4, gain.shape(), &d_gain));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(5, gain.shape(), &d_bias));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(6, cell_gamma.shape(), &d_cg));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(7, cell_beta.shape(), &d_cb));
    Tensor u_transposed_t, h_prev_t, acc_t;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(y_seq.dtype(), TensorShape({gates, units}), &u_transposed_t));
    // The (masked) h fed to the recurrent matmul at every step, for the weight gradient.
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(y_seq.dtype(), seq, &h_prev_t));
    // Per batch row: sums over time of du * zhat, du, dcn * chat, dcn (the gain/shift gradients).
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(y_seq.dtype(), TensorShape({batch, 2 * gates + 2 * units}), &acc_t));

    const Gemm<T> gemm(ctx, allow_onednn());
    const bool has_mask = mask.NumElements() > 0;
    const T* m = has_mask ? mask.flat<T>().data() : nullptr;
    const ConstVec<T> gn(gain.flat<T>().data(), gates);
    const ConstVec<T> cg(cell_gamma.flat<T>().data(), units), cbeta(cell_beta.flat<T>().data(), units);
    const T* dhs = d_h_seq.flat<T>().data();
    const T* hs = h_seq.flat<T>().data();
    const T* cs = c_seq.flat<T>().data();
    const T* ys = y_seq.flat<T>().data();
    const T* zs = zhat_seq.flat<T>().data();
    const T* rzs = rz_seq.flat<T>().data();
    const T* chs = chat_seq.flat<T>().data();
    const T* rcs = rc_seq.flat<T>().data();
    T* dz_all = d_proj->flat<T>().data();
    T* dh_carry = d_h0->flat<T>().data();  // d_h0/d_c0 double as the carries
    T* dc_carry = d_c0->flat<T>().data();
    const int64_t acc_width = 2 * gates + 2 * units;
    T* acc = acc_t.flat<T>().data();
    std::memset(acc, 0, batch * acc_width * sizeof(T));
    std::memcpy(dh_carry, d_h_last.flat<T>().data(), state_size * sizeof(T));
    std::memcpy(dc_carry, d_c_last.flat<T>().data(), state_size * sizeof(T));
    // dz @ U^T runs faster against U^T laid out in memory than with a transposed operand.
    T* ut = u_transposed_t.flat<T>().data();
    Eigen::Map<Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>(ut, gates, units) =
        Eigen::Map<const Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>(
            rkernel.flat<T>().data(), units, gates).transpose();

    for (int64_t t = steps - 1; t >= 0; --t) {
      const T* y = ys + t * batch * gates;
      const T* zhat = zs + t * batch * gates;
      const T* rz = rzs + t * batch * 4;
      const T* chat = chs + t * state_size;
      const T* rc = rcs + t * batch;
      const T* cp = t > 0 ? cs + (t - 1) * state_size : c0.flat<T>().data();
      const T* dho = dhs + t * state_size;
      T* dz = dz_all + t * batch * gates;
      ParallelRows(ctx, batch, 100.0 * gates, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          const int64_t k = b * units;
          ConstVec<T> yb(y + b * gates, gates), chb(chat + k, units);
          const auto i = yb.segment(0, units), j = yb.segment(units, units);
          const auto f = yb.segment(2 * units, units), o = yb.segment(3 * units, units);
          T* accb = acc + b * acc_width;
          Vec<T> dzb(dz + b * gates, gates), dcb(dc_carry + k, units), dhb(dh_carry + k, units);
          dhb += ConstVec<T>(dho + k, units);  // dh of this step: from above and from step t + 1
          // dcn, the gradient at LN(c) * cell_gamma + cell_beta, goes into dz's o block for now.
          Vec<T> dcn(dz + b * gates + 3 * units, units);
          const auto tanh_c = (chb * cg + cbeta).tanh();
          dcn = dhb * o * (T(1) - tanh_c.square());
          Vec<T>(accb + 2 * gates, units) += dcn * chb;
          Vec<T>(accb + 2 * gates + units, units) += dcn;
          // dc_raw: through the cell layer norm, plus the carry from step t + 1 (lands in dc_carry).
          Vec<T> dchat(dz + b * gates, units);  // scratch in dz's i block
          dchat = dcn * cg;
          NormalizeBackward<T>(dchat, chb, rc[b]);
          dcb += dchat;
          // du: the gradient at the sigmoid arguments zhat * gain + bias.
          dzb.segment(0, units) = dcb * (T(2) * j - T(1)) * i * (T(1) - i);
          dzb.segment(units, units) = dcb * (T(2) * i) * j * (T(1) - j);
          dzb.segment(2 * units, units) = dcb * ConstVec<T>(cp + k, units) * f * (T(1) - f);
          dzb.segment(3 * units, units) = dhb * (chb * cg + cbeta).tanh() * o * (T(1) - o);
          const ConstVec<T> zb(zhat + b * gates, gates);
          Vec<T>(accb, gates) += dzb * zb;
          Vec<T>(accb + gates, gates) += dzb;
          dzb *= gn;
          for (int g = 0; g < 4; ++g) {
            NormalizeBackward<T>(Vec<T>(dz + b * gates + g * units, units),
                                 ConstVec<T>(zhat + b * gates + g * units, units), rz[b * 4 + g]);
          }
          dcb *= f;
        }
      });
      gemm(false, batch, units, gates, dz, gates, ut, units, dh_carry, units);
      if (has_mask) Vec<T>(dh_carry, state_size) *= ConstVec<T>(m, state_size);
    }

    // Gain/shift gradients: the per-row sums added over the batch.
    Vec<T> dg(d_gain->flat<T>().data(), gates), db(d_bias->flat<T>().data(), gates);
    Vec<T> dcg(d_cg->flat<T>().data(), units), dcb_out(d_cb->flat<T>().data(), units);
    dg.setZero();
    db.setZero();
    dcg.setZero();
    dcb_out.setZero();
    for (int64_t b = 0; b < batch; ++b) {
      const T* accb = acc + b * acc_width;
      dg += ConstVec<T>(accb, gates);
      db += ConstVec<T>(accb + gates, gates);
      dcg += ConstVec<T>(accb + 2 * gates, units);
      dcb_out += ConstVec<T>(accb + 2 * gates + units, units);
    }

    // Weight gradient: (masked h_{t-1})^T @ dz over all T * B rows in one GEMM.
    RecurrentKernelGradient(gemm, steps, batch, units, gates, h0.flat<T>().data(), hs, m, dz_all,
                            h_prev_t.flat<T>().data(), d_rkernel->flat<T>().data());
  }
};

}  // namespace

DIST_RNN_REGISTER_CPU_KERNELS("DistRnnLnLstmForward", LnLstmForwardOp);
DIST_RNN_REGISTER_CPU_KERNELS("DistRnnLnLstmBackward", LnLstmBackwardOp);

}  // namespace dist_rnn
