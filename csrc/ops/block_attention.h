// mage.block_attention: block-causal attention of T query tokens (whole blocks of block_size)
// over a context plus their own block, forward and backward, written once in ATen for every
// device. Query token t of sequence b, in block j = t / block_size, attends to
// k_ctx[b, :, 0 : start[b] + j*block_size) and, bidirectionally, to its own block
// k_own[b, :, j*block_size : (j+1)*block_size).
//
// The pattern is split into three disjoint key sets per query row, each computed with its own
// log-sum-exp and merged (out = sum_i out_i * exp(lse_i - lse), lse = logsumexp_i lse_i):
//   A  prefix   k_ctx[0, off) for every query, off = start - block_size (only when off > 0);
//   B  diagonal token-causal over k_ctx[max(off, 0), start + T - block_size): query t sees
//               the keys up to position t + off, a SQUARE causal problem (so top-left and
//               bottom-right causal alignment agree and any fused kernel computes it);
//   C  local    per block, the previous block's tail that B leaves out (ctx positions
//               (t + off, start + j*block_size)) plus the own block: a [G*bs x 2bs] tile per
//               block and KV head, done with batched matmuls.
// A and B go to a PartKernel: the generic chunked online softmax here (CPU, and the CUDA
// fallback), or a fused tensor-core kernel on CUDA (cuda/block_attention_cuda.cpp). The
// backward uses the same split with the MERGED out and lse (the gradient of each disjoint key
// set is the backward of its part given the global softmax statistics), so memory stays linear
// in T: no T x T (or T x N) mask or score matrix exists anywhere, only bounded chunks.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "ops/checks.h"

namespace mage {

// Attention of q [B, Hq, Sq, d] over k/v [B, Hkv, Sk, d] (GQA: query head h reads KV head
// h / (Hq / Hkv)), either over every key or token-causal with Sq == Sk (query i sees keys
// 0..i). Returns out [B, Hq, Sq, d] (any floating dtype) and lse [B, Hq, Sq] (natural log,
// float32 or float64); the backward returns dq, dk, dv (any floating dtype) given the softmax
// statistics (out, lse) of the WHOLE attention the part belongs to.
class PartKernel {
 public:
  virtual ~PartKernel() = default;
  virtual const char* name() const = 0;
  virtual std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& v, bool causal,
                                                     double scale) const = 0;
  virtual std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
      const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
      const at::Tensor& out, const at::Tensor& lse, bool causal, double scale) const = 0;
};

// Chunked online softmax in plain ATen, fp32 math (fp64 for fp64 inputs); any device.
const PartKernel& generic_part_kernel();

// Math dtype of the generic code: float64 for float64 inputs, else float32. Also lse's dtype.
at::ScalarType compute_dtype(const at::Tensor& q);

// The op on inputs already checked (dims from check_block_attention_inputs).
std::tuple<at::Tensor, at::Tensor> compute_block_attention(
    const at::Tensor& q, const at::Tensor& k_ctx, const at::Tensor& v_ctx,
    const at::Tensor& k_own, const at::Tensor& v_own, const BlockAttentionDims& dims,
    at::IntArrayRef start, const PartKernel& kernel);

// dq, dk_ctx (zero where not read), dv_ctx, dk_own, dv_own, in the inputs' dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> compute_block_attention_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k_ctx, const at::Tensor& v_ctx,
    const at::Tensor& k_own, const at::Tensor& v_own, const at::Tensor& out, const at::Tensor& lse,
    const BlockAttentionDims& dims, at::IntArrayRef start, const PartKernel& kernel);

}  // namespace mage
