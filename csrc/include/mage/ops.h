// The C++ API of every MAGE op. Each function calls the op through the torch dispatcher, so
// C++ callers (the LibTorch runtime, the C++ tests) reach exactly the kernels Python reaches
// through torch.ops.mage.*.
//
// Shapes (the same for every attention op):
//   q          [batch, Hq, B, d]        the block's queries (B = block size), fp16/bf16/fp32
//   k_cache    [batch, Hkv, capacity, d] the prefix KV cache, head-major; a sequence's entries
//   v_cache    [batch, Hkv, capacity, d] live at positions [0, cache_lens[b]). Last two dims
//                                        contiguous; batch and head strides are free.
//   cache_lens [batch] int32            valid cache entries per sequence (may differ)
//   k_block    [batch, Hkv, B, d]       the block's own keys/values, always attended,
//   v_block    [batch, Hkv, B, d]       bidirectionally (never charged to a sparse budget)
//   out        [batch, Hq, B, d]        dtype of q
//   lse        [batch, Hq, B] fp32      natural-log log-sum-exp of each query row's logits
//   scores     [batch, Hkv, capacity] fp32  importance (spec 2.1), zero past cache_lens[b]
//   indices    [batch, Hkv, k] int32    selected cache positions, ascending; -1 past counts
//   counts     [batch, Hkv] int32       valid entries of indices per (sequence, KV head)
// Query head hq reads KV head hq / G with G = Hq / Hkv (the transformers repeat_kv grouping).
// scale defaults to 1/sqrt(d). On the CPU the attention ops also take float64 (then lse is
// float64 too), for gradient checks.
//
// Autograd: attention_with_scores, dense_attention, sparse_attention and block_sparse_attention
// are differentiable through torch::autograd (registered for the ops' Autograd key, so LibTorch
// callers and Python share it): out and lse carry gradients to q, the caches (through a
// selection: only the selected rows) and the block; scores, cache_lens, indices and counts
// carry none. The *_out forms are not differentiable (an input that requires grad is an
// error), nor are the *_backward ops (no double backward).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

namespace mage {

// Exact attention of the block over cache + block, with the importance score of every cache
// entry: scores[b,h,j] = mean over the G*B query rows of KV head h of softmax_j (spec 2.1).
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_with_scores(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& cache_lens, const at::Tensor& k_block, const at::Tensor& v_block,
    std::optional<double> scale = std::nullopt);

// Exact attention over cache + block (no scores): exact mode and the dense baseline.
std::tuple<at::Tensor, at::Tensor> dense_attention(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& cache_lens, const at::Tensor& k_block, const at::Tensor& v_block,
    std::optional<double> scale = std::nullopt);

// Attention over the selected cache entries (indices/counts) plus the block.
std::tuple<at::Tensor, at::Tensor> sparse_attention(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& indices, const at::Tensor& counts, const at::Tensor& k_block,
    const at::Tensor& v_block, std::optional<double> scale = std::nullopt);

// The sparse training attention of MAGE-FT: query block j of each sequence (block_size rows of
// q) attends to the selected entries of that sequence's context plus its own block.
//   q              [batch, Hq, T, d]        T = n_blocks * block_size
//   k_ctx, v_ctx   [batch, Hkv, N, d]       the context (e.g. the clean copy); rows contiguous
//   indices        [batch, n_blocks, Hkv, k] int32  selected context positions of block j,
//                                           ascending, in [0, N); -1 past counts
//   counts         [batch, n_blocks, Hkv] int32
//   k_own, v_own   [batch, Hkv, T, d]       the blocks' own keys/values (block j: rows of block j)
// Returns out [batch, Hq, T, d] (dtype of q) and lse [batch, Hq, T].
std::tuple<at::Tensor, at::Tensor> block_sparse_attention(
    const at::Tensor& q, const at::Tensor& k_ctx, const at::Tensor& v_ctx,
    const at::Tensor& indices, const at::Tensor& counts, const at::Tensor& k_own,
    const at::Tensor& v_own, int64_t block_size, std::optional<double> scale = std::nullopt);

// Backward ops (what autograd calls; usable directly): from the forward's inputs, its out and
// lse, and the gradients dout (and dlse, or nothing when lse is unused), the gradients of
// (q, k_cache, v_cache, k_block, v_block) (block_sparse: (q, k_ctx, v_ctx, k_own, v_own)).
// attention_with_scores shares dense_attention_backward (scores carry no gradient).
using AttentionGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
AttentionGrads dense_attention_backward(
    const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q,
    const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cache_lens,
    const at::Tensor& k_block, const at::Tensor& v_block, const at::Tensor& out,
    const at::Tensor& lse, std::optional<double> scale = std::nullopt);
AttentionGrads sparse_attention_backward(
    const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q,
    const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& indices,
    const at::Tensor& counts, const at::Tensor& k_block, const at::Tensor& v_block,
    const at::Tensor& out, const at::Tensor& lse, std::optional<double> scale = std::nullopt);
AttentionGrads block_sparse_attention_backward(
    const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q,
    const at::Tensor& k_ctx, const at::Tensor& v_ctx, const at::Tensor& indices,
    const at::Tensor& counts, const at::Tensor& k_own, const at::Tensor& v_own,
    const at::Tensor& out, const at::Tensor& lse, int64_t block_size,
    std::optional<double> scale = std::nullopt);

// Top-k cache positions per (sequence, KV head). The first n_sink and last n_recent valid
// positions are always kept and count towards k. Where cache_lens[b] <= k every valid position
// is selected and counts[b, :] = cache_lens[b].
std::tuple<at::Tensor, at::Tensor> topk_select(const at::Tensor& scores,
                                               const at::Tensor& cache_lens, int64_t k,
                                               int64_t n_sink = 0, int64_t n_recent = 0);

// Writes the block's keys/values at positions [cache_lens[b], cache_lens[b] + B) of each
// sequence. cache_lens itself is left unchanged (the caller owns it).
void append_kv(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cache_lens,
               const at::Tensor& k_block, const at::Tensor& v_block);

// Preallocated-output forms: the outputs (passed last) are written in place and nothing is
// allocated, so these are usable under CUDA graph capture.
void attention_with_scores_out(const at::Tensor& q, const at::Tensor& k_cache,
                               const at::Tensor& v_cache, const at::Tensor& cache_lens,
                               const at::Tensor& k_block, const at::Tensor& v_block,
                               std::optional<double> scale, const at::Tensor& out, const at::Tensor& lse,
                               const at::Tensor& scores);
void dense_attention_out(const at::Tensor& q, const at::Tensor& k_cache,
                         const at::Tensor& v_cache, const at::Tensor& cache_lens,
                         const at::Tensor& k_block, const at::Tensor& v_block,
                         std::optional<double> scale, const at::Tensor& out, const at::Tensor& lse);
void sparse_attention_out(const at::Tensor& q, const at::Tensor& k_cache,
                          const at::Tensor& v_cache, const at::Tensor& indices,
                          const at::Tensor& counts, const at::Tensor& k_block,
                          const at::Tensor& v_block, std::optional<double> scale,
                          const at::Tensor& out, const at::Tensor& lse);
void topk_select_out(const at::Tensor& scores, const at::Tensor& cache_lens, int64_t k,
                     int64_t n_sink, int64_t n_recent, const at::Tensor& indices, const at::Tensor& counts);

// ---- Fused elementwise ops of a Qwen2 / Qwen3 layer ----
// Each gives bit for bit the values of the transformers module sequence it replaces, run on the
// same device: the CPU kernels are that ATen sequence; the CUDA kernels reproduce every rounding
// step of it (README, "Fused layer ops"). bf16 / fp16 / fp32; every tensor on one device.

// Residual add + RMSNorm: h = x + residual (rounded to x's dtype, as `residual + hidden_states`),
// out = weight * (h.float() * rsqrt(mean(h.float()^2, -1) + eps)).to(x.dtype) (Qwen2RMSNorm).
// new_residual = h; without a residual h = x and new_residual is a copy of x.
//   x [..., hidden], weight [hidden] and residual [..., hidden] of x's dtype.
//   CUDA: hidden a multiple of 8, 32 <= hidden <= 16384.
std::tuple<at::Tensor, at::Tensor> rms_norm(
    const at::Tensor& x, const at::Tensor& weight, double eps,
    const std::optional<at::Tensor>& residual = std::nullopt);

// The QKV GEMM's output [batch, B, (Hq + 2 * Hkv) * d] (q heads, k heads, v heads) to the
// attention ops' layout, with Qwen3's per-head q_norm / k_norm (RMSNorm over d, before the
// rotation) when both weights are given, and RoPE on q and k as transformers' Qwen2 / Qwen3:
// cos, sin = cat(f, f).cos() / .sin() cast to qkv's dtype, f = positions.float() * inv_freq;
// x * cos + rotate_half(x) * sin. Returns q [batch, Hq, B, d], k and v [batch, Hkv, B, d]
// (contiguous, qkv's dtype).
//   positions [batch, B] int64; inv_freq [d / 2] fp32 (the rotary module's inv_freq).
//   CUDA: d a multiple of 16, 32 <= d <= 512.
std::tuple<at::Tensor, at::Tensor, at::Tensor> qkv_rope(
    const at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& inv_freq,
    int64_t n_q_heads, int64_t n_kv_heads, int64_t head_dim,
    const std::optional<at::Tensor>& q_norm_weight = std::nullopt,
    const std::optional<at::Tensor>& k_norm_weight = std::nullopt, double eps = 1e-6);

// SwiGLU's elementwise part: gate_up [..., 2 * I] (gate first, as the concatenated
// [gate_proj; up_proj] weight gives) -> out [..., I] = silu(gate) * up (Qwen2MLP's act_fn(gate)
// * up: silu in fp32 rounded to the dtype, then the product rounded).
at::Tensor silu_mul(const at::Tensor& gate_up);

// y = x W^T + b (at::linear's contract): x [..., K], weight [N, K], bias [N] or none; at::linear.
// Experimental, on CUDA with MAGE_SKINNY_GEMM=on: fp16 / bf16 inputs of at most 32 rows (one
// decoding block) take a split-K GEMM kernel (csrc/cuda/skinny_gemm.h; slower than cuBLAS so far).
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias = std::nullopt);

// Preallocated-output forms (contiguous outputs, nothing allocated: usable under CUDA graph
// capture). residual_out may be the residual tensor itself (an in-place update) and out may be x;
// out and residual_out must differ.
void rms_norm_out(const at::Tensor& x, const at::Tensor& weight, double eps,
                  const std::optional<at::Tensor>& residual, const at::Tensor& out,
                  const at::Tensor& residual_out);
void qkv_rope_out(const at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& inv_freq,
                  int64_t n_q_heads, int64_t n_kv_heads, int64_t head_dim,
                  const std::optional<at::Tensor>& q_norm_weight,
                  const std::optional<at::Tensor>& k_norm_weight, double eps, const at::Tensor& q,
                  const at::Tensor& k, const at::Tensor& v);
void silu_mul_out(const at::Tensor& gate_up, const at::Tensor& out);

// Block-causal attention (chunked prefill, block-diffusion training): query token t of
// sequence b, in block j = t / block_size, attends to k_ctx[b, :, 0 : start[b] + j*block_size)
// and bidirectionally to its own block k_own[b, :, j*block_size : (j+1)*block_size).
//   q [batch, Hq, T, d] (T a multiple of block_size), k_own/v_own [batch, Hkv, T, d],
//   k_ctx/v_ctx [batch, Hkv, N, d] (last dim contiguous; other strides free: a cache, or K/V
//   of a projection transposed), start[b] + T - block_size <= N.
// Returns out [batch, Hq, T, d] (dtype of q) and lse [batch, Hq, T] (float32; float64 for
// float64 inputs). Differentiable (lse carries no gradient); double backward is not supported.
std::tuple<at::Tensor, at::Tensor> block_attention(
    const at::Tensor& q, const at::Tensor& k_ctx, const at::Tensor& v_ctx,
    const at::Tensor& k_own, const at::Tensor& v_own, int64_t block_size, at::IntArrayRef start,
    std::optional<double> scale = std::nullopt);

// Gradients of block_attention given dout and its out / lse: dq, dk_ctx (zero where not read),
// dv_ctx, dk_own, dv_own.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> block_attention_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k_ctx, const at::Tensor& v_ctx,
    const at::Tensor& k_own, const at::Tensor& v_own, const at::Tensor& out, const at::Tensor& lse,
    int64_t block_size, at::IntArrayRef start, std::optional<double> scale = std::nullopt);

// The device's error record (what CUDA kernels found wrong in values the host does not check:
// a cache length past the capacity, an append that does not fit, a selected index outside the
// cache; see ops/device_errors.h). take_error returns it ([code, op, sequence, head, slot,
// value, limit, 0]) and clears it, or returns an empty vector when clean; check_errors throws
// with a message naming the op, sequence and value. Both synchronise the device's current
// stream: call them where the caller synchronises anyway (e.g. once per generated block).
// CPU devices have no record (the CPU kernels check values at once).
std::vector<int64_t> take_error(c10::Device device);
void check_errors(c10::Device device);

}  // namespace mage
