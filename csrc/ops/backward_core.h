// The chunked recompute behind every attention backward (dense, sparse, block-sparse), in ATen
// ops only, so one implementation serves the CPU and CUDA.
//
// Why a recompute with the saved lse: the forward keeps only out and lse ([rows] floats), never
// the [rows x keys] probabilities (at 32K keys that matrix is 64x the size of q). The backward
// rebuilds P = exp(q.k * scale - lse) one key chunk at a time, so its memory is linear in the
// cache length and bounded per chunk, as FlashAttention's backward does:
//   D  = rowsum(dout * out) - dlse          (once per row)
//   per chunk:  P = exp(S - lse), dV = P^T dout, dP = dout V^T, dS = P * (dP - D),
//               dQ += dS K * scale, dK = dS^T Q * scale
// Cost per key and KV head, R = G*B query rows: 5 matmuls of 2*R*d FLOPs (S again, dV, dP, dQ,
// dK: 2.5x the forward's 2). Bytes: K and V read once (gathered once for a selection), dK and dV
// written once, but in this ATen form also ~10 passes over [R x C] fp32 temporaries (S/P, dP,
// dS written and read by the elementwise steps and the matmuls), ~40*R bytes per key: at R = 192
// and d = 128 that is ~8x the bf16 floor (read K, V, write dK, dV: 8*d bytes), so this path is
// memory-bound where a fused kernel, keeping P and dS on chip, would be compute-bound. The
// matmuls run on the tensor cores for fp16 / bf16 CUDA inputs (ops/matmul_precision.h).
// The next step for CUDA is that fused kernel (FlashAttention-2/3 backward turned to the decode
// shape: few query rows, many keys, so one CTA per key tile looping over the G*B rows, dK/dV in
// registers, written once (scattered to the selected rows), dQ through a per-split fp32 buffer
// reduced in a fixed order). It plugs in at the CUDA registration of the *_backward ops
// (csrc/cuda/backward_cuda.cpp), the generic path staying as the fallback.
#pragma once

#include <ATen/ATen.h>

#include <utility>

#include "ops/matmul_precision.h"

namespace mage {

// The query side of a group of U attention problems ("units": a sequence, or one query block of
// a sequence), each with Hkv KV heads and R query rows per KV head: the G*B rows of the KV head's
// G query heads, so a KV head's gradients sum over its query heads inside the matmuls (GQA).
// Matmul precision: MatmulPrecision of the inputs (on CUDA, fp16 / bf16 tensor-core operands with
// fp32 accumulation; else fp32, fp64 for fp64); every other tensor is of its compute dtype.
class QueryRowsGrad {
 public:
  // q, dout: [U, Hkv, R, d] (any dtype: taken as the operand dtype); lse, delta: [U, Hkv, R] of
  // the compute dtype (delta = softmax_delta(...)).
  QueryRowsGrad(const MatmulPrecision& math, const at::Tensor& q, const at::Tensor& dout,
                const at::Tensor& lse, const at::Tensor& delta, double scale);

  // One chunk of C keys of every (unit, KV head): keys, values [U, Hkv, C, d] (any dtype);
  // valid: bool, broadcastable to [U, Hkv, C], or undefined (all valid).
  // Invalid keys may hold anything (even NaN): they are zeroed first. Adds the chunk's share of
  // dq; returns (dkeys, dvalues) [U, Hkv, C, d] of the compute dtype, exactly zero at invalid keys.
  std::pair<at::Tensor, at::Tensor> key_chunk(at::Tensor keys, at::Tensor values,
                                              const at::Tensor& valid);

  at::Tensor dq() const;  // [U, Hkv, R, d] (the sum over all chunks so far)

 private:
  MatmulPrecision math_;
  at::Tensor q_, dout_, lse_, delta_, dq_;
  double scale_;
};

// D = rowsum(dout * out) - dlse in the accumulation dtype `acc`: dout, out [..., d],
// dlse [...] or undefined. Returns [...].
at::Tensor softmax_delta(const at::Tensor& dout, const at::Tensor& out, const at::Tensor& dlse,
                         at::ScalarType acc);

// How many units and keys one chunk takes so that an [units, Hkv, R, C] matrix stays within a
// fixed element budget (smaller on the CPU, where it should stay in cache).
struct ChunkPlan {
  int64_t units_per_group = 1;
  int64_t keys_per_chunk = 1;
};
ChunkPlan plan_chunks(const at::Device& device, int64_t units, int64_t rows_per_unit,
                      int64_t keys);

// Rows `pos` [U, Hkv, C] (int64, all within the cache) of cache [U, Hkv, N, d] (any strides,
// batch stride 0 too): [U, Hkv, C, d].
at::Tensor gather_rows(const at::Tensor& cache, const at::Tensor& pos);

// dst [Hkv, N, d] += src [U, Hkv, C, d] at rows pos [U, Hkv, C]; many units may hit one row.
// Deterministic by default (a fixed summation order, no atomics): on the CPU scatter_add_ adds a
// row's contributions one after the other in unit order; on CUDA index_put_(accumulate=true)
// sorts the positions (stable) and sums each row's run in order. MAGE_BACKWARD_ATOMICS=1 (read
// per call) makes CUDA use scatter_add_'s atomics instead: faster, summation order not fixed
// (unless torch.use_deterministic_algorithms(True), which makes scatter_add_ deterministic).
void accumulate_rows(const at::Tensor& dst, const at::Tensor& pos, const at::Tensor& src);

// The context gradients of block-sparse attention: many blocks select the same context rows, so
// their dK / dV are summed (accumulate_rows) in the compute dtype and cast once at the end. dK
// and dV sit side by side ([.., 2d]) so that one accumulation (one sort of the positions) takes
// both. Slots past a count (their gradients are exact zeros, or garbage from a fused kernel)
// go to kSpareRows rows past the context, spread by slot: sent all to one row they made one run
// of duplicates that the deterministic accumulation sums serially (63 ms instead of 18 at 8K,
// k = 2048, H200).
class SelectedRowGrads {
 public:
  static constexpr int64_t kSpareRows = 4096;
  // batch, Hkv, n_ctx context rows of head dim `dim`; options: the compute dtype and device.
  SelectedRowGrads(int64_t batch, int64_t hkv, int64_t n_ctx, int64_t dim,
                   const at::TensorOptions& options);
  // Adds dk, dv [n, Hkv, C, d] of sequence b's slots idx [n, Hkv, C] (int64; anything where
  // not valid), valid [n, Hkv, C] bool.
  void add(int64_t b, const at::Tensor& idx, const at::Tensor& valid, const at::Tensor& dk,
           const at::Tensor& dv);
  at::Tensor dk(at::ScalarType dtype) const;  // [batch, Hkv, n_ctx, d], contiguous
  at::Tensor dv(at::ScalarType dtype) const;

 private:
  at::Tensor dkv_;  // [batch, Hkv, n_ctx + kSpareRows, 2d]
  int64_t n_ctx_, dim_;
};

}  // namespace mage
