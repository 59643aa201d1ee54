// The GRU sequence recurrence of dist_rnn.models.kernels.plain.gru as two
// compiled CPU ops: DistRnnGruForward and DistRnnGruBackward.
//
// Same layouts and semantics as the graph kernel (Keras' GRU with
// reset_after=True): time-major input projection proj (T, B, 3U) = x @ W + b_in
// with gate order z, r, h, recurrent kernel (U, 3U) and recurrent bias (3U,):
//   hu  = (h_{t-1} * mask) @ U + b_rec
//   z   = sigmoid(proj_z + hu_z),  r = sigmoid(proj_r + hu_r)
//   hh  = tanh(proj_h + r * hu_h)
//   h_t = hh + z * (h_{t-1} - hh)
// The recurrent dropout mask (B, U) multiplies only the h fed to the matmul;
// the update uses the unmasked h. An empty mask (0 elements) means no dropout.
// The forward op returns, besides h_seq and h_T, what the backward op needs:
// zr (T, B, 2U), hu_h (T, B, U) and hh (T, B, U), as the graph kernel saves.
//
// The matrices are Eigen/Core maps and products, not the Tensor module's
// contractions: this file builds in a fraction of the time (see
// docs/benchmarks.md, #22). Eigen/Core's GEMM runs on one thread, so the ops
// shard the work over TensorFlow's intra-op pool by blocks of units, one pool
// round trip per step: forward, each shard multiplies h by its units'
// columns of all three gates and updates those units' state; backward, each
// shard first finishes step t+1 (dh_{t-1} of its units = dhu_{t+1} @ U^T, all
// of dhu_{t+1} being complete by then) and then computes step t's gate
// gradients of its units, which need only those units' dh. The
// recurrent-kernel and bias gradients are one GEMM over all T * B rows,
// sharded by columns.

#define EIGEN_USE_THREADS

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>

#include "op_common.h"

namespace dist_rnn {
namespace {

using namespace ::dist_rnn::ops;  // NOLINT(build/namespaces): the shared op vocabulary

template <typename T>
using RowMajorMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <typename T>
using MatrixMap = Eigen::Map<RowMajorMatrix<T>>;
template <typename T>
using ConstMatrixMap = Eigen::Map<const RowMajorMatrix<T>>;
template <typename T>
using RowVectorMap = Eigen::Map<Eigen::Matrix<T, 1, Eigen::Dynamic>>;
// Elementwise work on a run of units: Eigen's vectorized logistic and tanh (std::exp/std::tanh per
// element cost more than the step's GEMM).
template <typename T>
using ArrayMap = Eigen::Map<Eigen::Array<T, 1, Eigen::Dynamic>>;
template <typename T>
using ConstArrayMap = Eigen::Map<const Eigen::Array<T, 1, Eigen::Dynamic>>;

// Units per shard block: a multiple of the SIMD width, so that the column
// blocks of every shard's GEMM start on full packets where the width allows.
constexpr int64_t kUnitBlock = 16;

// Runs fn(first, count) over blocks of [0, size) on the op's intra-op pool; cost_per_item in cycles.
void ParallelBlocks(OpKernelContext* ctx, int64_t size, int64_t block, double cost_per_item,
                    const std::function<void(int64_t, int64_t)>& fn) {
  const int64_t blocks = (size + block - 1) / block;
  auto* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  using Params = ::tensorflow::thread::ThreadPool::SchedulingParams;
  pool->ParallelFor(blocks, Params::Adaptive(static_cast<int64_t>(cost_per_item * block)),
                    [&](int64_t begin, int64_t end) {
                      const int64_t first = begin * block;
                      fn(first, std::min(end * block, size) - first);
                    });
}

Status GruForwardShape(InferenceContext* c) {
  ShapeHandle proj, h0, rkernel, rbias;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 3, &proj));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &h0));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 2, &rkernel));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 1, &rbias));
  DimensionHandle steps = c->Dim(proj, 0), batch = c->Dim(proj, 1), units = c->Dim(rkernel, 0);
  DimensionHandle two_units;
  TF_RETURN_IF_ERROR(c->Multiply(units, 2, &two_units));
  ShapeHandle seq = c->MakeShape({steps, batch, units});
  c->set_output(0, seq);
  c->set_output(1, c->MakeShape({batch, units}));
  c->set_output(2, c->MakeShape({steps, batch, two_units}));
  c->set_output(3, seq);
  c->set_output(4, seq);
  return absl::OkStatus();
}

Status GruBackwardShape(InferenceContext* c) {
  // Inputs: d_h_seq, d_h_last, h0, rkernel, mask, h_seq, zr, hu_h, hh.
  ShapeHandle d_h_seq, rkernel;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 3, &d_h_seq));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 2, &rkernel));
  DimensionHandle gates = c->Dim(rkernel, 1);
  c->set_output(0, c->MakeShape({c->Dim(d_h_seq, 0), c->Dim(d_h_seq, 1), gates}));
  c->set_output(1, c->input(2));
  c->set_output(2, c->input(3));
  c->set_output(3, c->MakeShape({gates}));
  return absl::OkStatus();
}

REGISTER_OP("DistRnnGruForward")
    .Input("proj: T")
    .Input("h0: T")
    .Input("rkernel: T")
    .Input("rbias: T")
    .Input("mask: T")
    .Output("h_seq: T")
    .Output("h_last: T")
    .Output("zr: T")
    .Output("hu_h: T")
    .Output("hh: T")
    .Attr("T: {float, double}")
    .SetShapeFn(GruForwardShape)
    .Doc("GRU (reset_after) recurrence over a time-major input projection; zr, hu_h, hh are saved for the "
         "backward op.");

REGISTER_OP("DistRnnGruBackward")
    .Input("d_h_seq: T")
    .Input("d_h_last: T")
    .Input("h0: T")
    .Input("rkernel: T")
    .Input("mask: T")
    .Input("h_seq: T")
    .Input("zr: T")
    .Input("hu_h: T")
    .Input("hh: T")
    .Output("d_proj: T")
    .Output("d_h0: T")
    .Output("d_rkernel: T")
    .Output("d_rbias: T")
    .Attr("T: {float, double}")
    .SetShapeFn(GruBackwardShape)
    .Doc("Gradients of DistRnnGruForward with respect to proj, h0, rkernel and rbias.");

// Checks h0 (B, U), rkernel (U, 3U), mask (B, U) or empty.
Status CheckGruState(const Tensor& h0, const Tensor& rkernel, const Tensor& mask) {
  if (rkernel.dims() != 2 || rkernel.dim_size(1) != 3 * rkernel.dim_size(0))
    return InvalidArgument("rkernel must be (U, 3U), got ", rkernel.shape().DebugString());
  if (h0.dims() != 2 || h0.dim_size(1) != rkernel.dim_size(0))
    return InvalidArgument("h0 must be (B, U) with U = ", rkernel.dim_size(0), ", got ", h0.shape().DebugString());
  if (mask.NumElements() != 0 && mask.shape() != h0.shape())
    return InvalidArgument("mask must be empty or ", h0.shape().DebugString());
  return absl::OkStatus();
}

template <typename T>
class GruForwardOp : public OpKernel {
 public:
  explicit GruForwardOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& proj = ctx->input(0);
    const Tensor& h0 = ctx->input(1);
    const Tensor& rkernel = ctx->input(2);
    const Tensor& rbias = ctx->input(3);
    const Tensor& mask = ctx->input(4);
    OP_REQUIRES_OK(ctx, CheckGruState(h0, rkernel, mask));
    const int64_t batch = h0.dim_size(0), units = h0.dim_size(1), gates = 3 * units;
    OP_REQUIRES(ctx, proj.dims() == 3 && proj.dim_size(1) == batch && proj.dim_size(2) == gates,
                InvalidArgument("proj must be (T, ", batch, ", ", gates, "), got ", proj.shape().DebugString()));
    OP_REQUIRES(ctx, rbias.shape() == TensorShape({gates}),
                InvalidArgument("rbias must be (", gates, "), got ", rbias.shape().DebugString()));
    const int64_t steps = proj.dim_size(0), state_size = batch * units;

    Tensor *h_seq, *h_last, *zr_seq, *hu_seq, *hh_seq;
    const TensorShape seq({steps, batch, units});
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, seq, &h_seq));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, h0.shape(), &h_last));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({steps, batch, 2 * units}), &zr_seq));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, seq, &hu_seq));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(4, seq, &hh_seq));
    // hu = h_in @ U of the current step, and the masked h (two buffers: step t reads one, writes the other).
    Tensor hu_t, masked_t;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(proj.dtype(), TensorShape({batch, gates}), &hu_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(proj.dtype(), TensorShape({2, batch, units}), &masked_t));

    const bool has_mask = mask.NumElements() > 0;
    const T* m = has_mask ? mask.flat<T>().data() : nullptr;
    const T* p = proj.flat<T>().data();
    const T* rb = rbias.flat<T>().data();
    T* hs = h_seq->flat<T>().data();
    T* zrs = zr_seq->flat<T>().data();
    T* hus = hu_seq->flat<T>().data();
    T* hhs = hh_seq->flat<T>().data();
    T* hu = hu_t.flat<T>().data();
    T* masked = masked_t.flat<T>().data();
    ConstMatrixMap<T> u(rkernel.flat<T>().data(), units, gates);
    MatrixMap<T> hu_m(hu, batch, gates);
    const T* h_prev = h0.flat<T>().data();
    if (has_mask) {
      for (int64_t i = 0; i < state_size; ++i) masked[i] = h_prev[i] * m[i];
    }

    for (int64_t t = 0; t < steps; ++t) {
      const T* h_in = has_mask ? masked + (t % 2) * state_size : h_prev;
      T* masked_next = masked + ((t + 1) % 2) * state_size;
      ConstMatrixMap<T> h_in_m(h_in, batch, units);
      const T* pt = p + t * batch * gates;
      T* h = hs + t * state_size;
      T* zr = zrs + t * batch * 2 * units;
      T* hu_h = hus + t * state_size;
      T* hh = hhs + t * state_size;
      const T* hp = h_prev;
      ParallelBlocks(ctx, units, kUnitBlock, 6.0 * batch * units + 60.0 * batch, [&](int64_t first, int64_t count) {
        for (int64_t g = 0; g < 3; ++g) {
          hu_m.middleCols(g * units + first, count).noalias() = h_in_m * u.middleCols(g * units + first, count);
        }
        // Gate g's columns of units [first, first + count) in row b of a (B, 3U) matrix.
        auto gate = [&](const T* rows, int64_t b, int64_t g) {
          return ConstArrayMap<T>(rows + b * gates + g * units + first, count);
        };
        auto rb_gate = [&](int64_t g) { return ConstArrayMap<T>(rb + g * units + first, count); };
        for (int64_t b = 0; b < batch; ++b) {
          const int64_t k = b * units + first;
          ArrayMap<T> z(zr + b * 2 * units + first, count), r(zr + b * 2 * units + units + first, count);
          ArrayMap<T> hu_c(hu_h + k, count), cand(hh + k, count), h_new(h + k, count);
          z = (gate(pt, b, 0) + (gate(hu, b, 0) + rb_gate(0))).logistic();
          r = (gate(pt, b, 1) + (gate(hu, b, 1) + rb_gate(1))).logistic();
          hu_c = gate(hu, b, 2) + rb_gate(2);
          cand = (gate(pt, b, 2) + r * hu_c).tanh();
          h_new = cand + z * (ConstArrayMap<T>(hp + k, count) - cand);
          if (has_mask) ArrayMap<T>(masked_next + k, count) = h_new * ConstArrayMap<T>(m + k, count);
        }
      });
      h_prev = h;
    }
    std::memcpy(h_last->flat<T>().data(), h_prev, state_size * sizeof(T));
  }
};

template <typename T>
class GruBackwardOp : public OpKernel {
 public:
  explicit GruBackwardOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& d_h_seq = ctx->input(0);
    const Tensor& d_h_last = ctx->input(1);
    const Tensor& h0 = ctx->input(2);
    const Tensor& rkernel = ctx->input(3);
    const Tensor& mask = ctx->input(4);
    const Tensor& h_seq = ctx->input(5);
    const Tensor& zr_seq = ctx->input(6);
    const Tensor& hu_seq = ctx->input(7);
    const Tensor& hh_seq = ctx->input(8);
    OP_REQUIRES_OK(ctx, CheckGruState(h0, rkernel, mask));
    const int64_t batch = h0.dim_size(0), units = h0.dim_size(1), gates = 3 * units;
    OP_REQUIRES(ctx, d_h_seq.dims() == 3, InvalidArgument("d_h_seq must be (T, B, U), got ",
                                                          d_h_seq.shape().DebugString()));
    const int64_t steps = d_h_seq.dim_size(0), state_size = batch * units;
    const TensorShape seq({steps, batch, units});
    OP_REQUIRES(ctx, d_h_seq.shape() == seq && h_seq.shape() == seq && hu_seq.shape() == seq &&
                         hh_seq.shape() == seq && zr_seq.shape() == TensorShape({steps, batch, 2 * units}),
                InvalidArgument("d_h_seq, h_seq, hu_h and hh must be ", seq.DebugString(), " and zr (T, B, 2U)"));
    OP_REQUIRES(ctx, d_h_last.shape() == h0.shape(), InvalidArgument("d_h_last must be ", h0.shape().DebugString()));

    Tensor *d_proj, *d_h0, *d_rkernel, *d_rbias;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({steps, batch, gates}), &d_proj));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, h0.shape(), &d_h0));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, rkernel.shape(), &d_rkernel));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, TensorShape({gates}), &d_rbias));
    // dhu: the gradient of h_in @ U + b_rec at every step; direct: dh_t * z_t (the path that skips U);
    // h_rows: the h_in of every step, for the weight gradient.
    Tensor dhu_t, direct_t, h_rows_t;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(h0.dtype(), TensorShape({steps, batch, gates}), &dhu_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(h0.dtype(), h0.shape(), &direct_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(h0.dtype(), seq, &h_rows_t));

    const bool has_mask = mask.NumElements() > 0;
    const T* m = has_mask ? mask.flat<T>().data() : nullptr;
    const T* dhs = d_h_seq.flat<T>().data();
    const T* hs = h_seq.flat<T>().data();
    const T* zrs = zr_seq.flat<T>().data();
    const T* hus = hu_seq.flat<T>().data();
    const T* hhs = hh_seq.flat<T>().data();
    T* dp_all = d_proj->flat<T>().data();
    T* dhu_all = dhu_t.flat<T>().data();
    T* direct = direct_t.flat<T>().data();
    T* carry = d_h0->flat<T>().data();  // dL/dh_t from later steps; ends as d_h0
    std::memcpy(carry, d_h_last.flat<T>().data(), state_size * sizeof(T));
    ConstMatrixMap<T> u(rkernel.flat<T>().data(), units, gates);
    MatrixMap<T> carry_m(carry, batch, units);

    // Step t+1's recurrent part for units [first, first + count): carry = direct + (dhu_{t+1} @ U^T) * mask.
    auto finish_step = [&](int64_t t, int64_t first, int64_t count) {
      ConstMatrixMap<T> dhu_m(dhu_all + t * batch * gates, batch, gates);
      carry_m.middleCols(first, count).noalias() = dhu_m * u.middleRows(first, count).transpose();
      for (int64_t b = 0; b < batch; ++b) {
        for (int64_t j = first; j < first + count; ++j) {
          const int64_t k = b * units + j;
          carry[k] = direct[k] + (has_mask ? carry[k] * m[k] : carry[k]);
        }
      }
    };
    // Step t's gate gradients for units [first, first + count), from carry = dL/dh_t of the later steps.
    auto gate_grads = [&](int64_t t, int64_t first, int64_t count) {
      const T* hp = t > 0 ? hs + (t - 1) * state_size : h0.flat<T>().data();
      const T* zr = zrs + t * batch * 2 * units;
      const T* hu_h = hus + t * state_size;
      const T* hh = hhs + t * state_size;
      const T* dho = dhs + t * state_size;
      T* dhu = dhu_all + t * batch * gates;
      T* dp = dp_all + t * batch * gates;
      for (int64_t b = 0; b < batch; ++b) {
        const T* zrb = zr + b * 2 * units;
        T* dhub = dhu + b * gates;
        T* dpb = dp + b * gates;
        for (int64_t j = first; j < first + count; ++j) {
          const int64_t k = b * units + j;
          const T z = zrb[j], r = zrb[units + j], cand = hh[k];
          const T dh = dho[k] + carry[k];
          const T kh = (T(1) - z) * (T(1) - cand * cand);  // d h_t / d (proj_h + r * hu_h)
          const T dz = dh * ((hp[k] - cand) * z * (T(1) - z));
          const T dr = dh * (kh * hu_h[k] * r * (T(1) - r));
          dhub[j] = dz;
          dhub[units + j] = dr;
          dhub[2 * units + j] = dh * (kh * r);
          dpb[j] = dz;
          dpb[units + j] = dr;
          dpb[2 * units + j] = dh * kh;
          direct[k] = dh * z;
        }
      }
    };

    const double step_cost = 6.0 * batch * units + 40.0 * batch;
    for (int64_t t = steps - 1; t >= -1 && steps > 0; --t) {
      ParallelBlocks(ctx, units, kUnitBlock, step_cost, [&](int64_t first, int64_t count) {
        if (t + 1 < steps) finish_step(t + 1, first, count);
        if (t >= 0) gate_grads(t, first, count);
      });
    }

    // Weight gradients over all T * B rows: d_rkernel = h_rows^T @ dhu, d_rbias = column sums of dhu.
    T* h_rows = h_rows_t.flat<T>().data();
    if (steps > 0) {
      std::memcpy(h_rows, h0.flat<T>().data(), state_size * sizeof(T));
      std::memcpy(h_rows + state_size, hs, (steps - 1) * state_size * sizeof(T));
      if (has_mask) {
        for (int64_t t = 0; t < steps; ++t)
          for (int64_t i = 0; i < state_size; ++i) h_rows[t * state_size + i] *= m[i];
      }
    }
    ConstMatrixMap<T> h_rows_m(h_rows, steps * batch, units);
    ConstMatrixMap<T> dhu_rows(dhu_all, steps * batch, gates);
    MatrixMap<T> d_u(d_rkernel->flat<T>().data(), units, gates);
    RowVectorMap<T> d_b(d_rbias->flat<T>().data(), gates);
    if (steps == 0) {
      d_u.setZero();
      d_b.setZero();
      return;
    }
    ParallelBlocks(ctx, gates, kUnitBlock, 2.0 * steps * batch * units, [&](int64_t first, int64_t count) {
      d_u.middleCols(first, count).noalias() = h_rows_m.transpose() * dhu_rows.middleCols(first, count);
      d_b.segment(first, count) = dhu_rows.middleCols(first, count).colwise().sum();
    });
  }
};

DIST_RNN_REGISTER_CPU_KERNELS("DistRnnGruForward", GruForwardOp);
DIST_RNN_REGISTER_CPU_KERNELS("DistRnnGruBackward", GruBackwardOp);

}  // namespace
}  // namespace dist_rnn
