// Row-major GEMM and row sharding for the recurrence ops, on TensorFlow's intra-op pool.
//
// Gemm<float> calls oneDNN's sgemm, the GEMM behind TensorFlow's own CPU
// MatMul, through the one entry point the TensorFlow binary exports for it:
// the member function MklMatMulOp<ThreadPoolDevice, float, false>::MklBlasGemm
// of libtensorflow_cc (a weak symbol, found with dlsym). On TF 2.21 that
// function never reads its object; it runs small products on the calling
// thread and larger ones on the context's intra-op pool, exactly as MatMul
// does. Because calling a member function without an object is outside the
// C++ rules, the pointer is used only when the symbol exists under this exact
// signature AND a self-check of both layouts the ops need gives the exact
// product; otherwise (other TensorFlow builds, other platforms, float64, or
// gemm='eigen') Eigen's matrix product runs, sharded by columns on the pool.
//
// Measured per-step GEMMs on the 2-core CPU (docs/benchmarks.md, #22): for
// [32, 256] x [256, 1024] oneDNN 0.23 ms, Eigen's matrix product 0.37 ms
// (one thread), Eigen's Tensor contraction on the pool 0.47 ms.

#ifndef DIST_RNN_CSRC_GEMM_H_
#define DIST_RNN_CSRC_GEMM_H_

#include <dlfcn.h>

#include <algorithm>
#include <cstdint>

#include "Eigen/Core"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/platform/threadpool.h"

namespace dist_rnn {
namespace cpu {

// MklMatMulOp<Eigen::ThreadPoolDevice, float, false>::MklBlasGemm(ctx, transa, transb, m, n, k, a, lda,
// b, ldb, c, ldc): row-major C = op(A) op(B) (alpha 1, beta 0). The first argument is the object.
using OneDnnSgemm = void (*)(void*, ::tensorflow::OpKernelContext*, bool, bool, int64_t, int64_t, int64_t,
                             const float*, int64_t, const float*, int64_t, float*, int64_t);
constexpr char kOneDnnSgemmSymbol[] =
    "_ZN10tensorflow11MklMatMulOpIN5Eigen16ThreadPoolDeviceEfLb0EE11MklBlasGemmEPNS_15OpKernelContextEbblllPKflS7_lPfl";

// Stands in for the MklMatMulOp object the entry point never reads (zeros, ample size).
alignas(64) inline char one_dnn_dummy_object[4096] = {};

// Runs fn(begin, end) over [0, units) in shards on the op's intra-op pool (inline when small).
template <typename Fn>
void ParallelRows(::tensorflow::OpKernelContext* ctx, int64_t units, double cost_per_unit, Fn fn) {
  ctx->device()->tensorflow_cpu_worker_threads()->workers->ParallelFor(
      units, static_cast<int64_t>(cost_per_unit), [&fn](int64_t begin, int64_t end) { fn(begin, end); });
}

// Row-major C (m, n) = op(A) @ B with Eigen, column blocks sharded on the pool.
template <typename T>
void EigenGemm(::tensorflow::OpKernelContext* ctx, bool transpose_a, int64_t m, int64_t n, int64_t k,
               const T* a, int64_t lda, const T* b, int64_t ldb, T* c, int64_t ldc) {
  using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using Stride = Eigen::OuterStride<>;
  const Eigen::Map<const Matrix, 0, Stride> A(a, transpose_a ? k : m, transpose_a ? m : k, Stride(lda));
  const Eigen::Map<const Matrix, 0, Stride> B(b, k, n, Stride(ldb));
  constexpr int64_t kBlock = 128;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  ParallelRows(ctx, blocks, 2.0 * m * k * kBlock, [&](int64_t begin, int64_t end) {
    const int64_t c0 = begin * kBlock, width = std::min(n, end * kBlock) - c0;
    Eigen::Map<Matrix, 0, Stride> C(c + c0, m, width, Stride(ldc));
    if (transpose_a) {
      C.noalias() = A.transpose() * B.middleCols(c0, width);
    } else {
      C.noalias() = A * B.middleCols(c0, width);
    }
  });
}

// The exported oneDNN entry point if it is there and computes exact small products; else nullptr.
inline OneDnnSgemm ResolveOneDnnSgemm(::tensorflow::OpKernelContext* ctx) {
  auto fn = reinterpret_cast<OneDnnSgemm>(dlsym(RTLD_DEFAULT, kOneDnnSgemmSymbol));
  if (fn == nullptr) return nullptr;
  // A (3 x 5) small integers; B (5 x 4); products are exact in float.
  float a[15], b[20], got[12];
  for (int i = 0; i < 15; ++i) a[i] = static_cast<float>(i % 7 - 3);
  for (int i = 0; i < 20; ++i) b[i] = static_cast<float>(i % 5 - 2);
  for (bool transpose_a : {false, true}) {
    // transpose_a: read a as the (5 x 3) matrix whose transpose is multiplied.
    const int64_t m = 3, k = 5, lda = transpose_a ? 3 : 5;
    std::fill(got, got + 12, -1000.0f);
    fn(one_dnn_dummy_object, ctx, transpose_a, false, m, 4, k, a, lda, b, 4, got, 4);
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = 0; j < 4; ++j) {
        float want = 0;
        for (int64_t p = 0; p < k; ++p) want += (transpose_a ? a[p * lda + i] : a[i * lda + p]) * b[p * 4 + j];
        if (got[i * 4 + j] != want) return nullptr;
      }
    }
  }
  return fn;
}

// Row-major C (m, n) = op(A) (m, k) @ B (k, n), overwriting C; op(A) = A^T when transpose_a.
template <typename T>
class Gemm {
 public:
  Gemm(::tensorflow::OpKernelContext* ctx, bool allow_onednn) : ctx_(ctx) { (void)allow_onednn; }
  void operator()(bool transpose_a, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b,
                  int64_t ldb, T* c, int64_t ldc) const {
    if (m == 0 || n == 0) return;
    EigenGemm(ctx_, transpose_a, m, n, k, a, lda, b, ldb, c, ldc);
  }

 private:
  ::tensorflow::OpKernelContext* ctx_;
};

template <>
class Gemm<float> {
 public:
  Gemm(::tensorflow::OpKernelContext* ctx, bool allow_onednn) : ctx_(ctx) {
    static const OneDnnSgemm resolved = ResolveOneDnnSgemm(ctx);
    onednn_ = allow_onednn ? resolved : nullptr;
  }
  void operator()(bool transpose_a, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                  const float* b, int64_t ldb, float* c, int64_t ldc) const {
    if (m == 0 || n == 0) return;
    if (onednn_ != nullptr && k > 0) {
      onednn_(one_dnn_dummy_object, ctx_, transpose_a, false, m, n, k, a, lda, b, ldb, c, ldc);
    } else {
      EigenGemm(ctx_, transpose_a, m, n, k, a, lda, b, ldb, c, ldc);
    }
  }
  // Whether the products run on oneDNN.
  bool onednn() const { return onednn_ != nullptr; }

 private:
  ::tensorflow::OpKernelContext* ctx_;
  OneDnnSgemm onednn_;
};

}  // namespace cpu
}  // namespace dist_rnn

#endif  // DIST_RNN_CSRC_GEMM_H_
