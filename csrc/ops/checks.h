// Input validation for every MAGE op: one place for every error message. Each check names the
// op and the argument, and says what was expected and what was given.
//
// Value checks (cache_lens within capacity, indices within the cache and strictly ascending,
// counts within k) read the tensor, so they run for CPU tensors only: on CUDA they would cost a
// host synchronisation and break CUDA graph capture. CUDA kernels instead clamp lengths to the
// capacity, never read or write out of bounds, write NaN rows for out-of-range indices, and
// record each such value in the device's error record (ops/device_errors.h), which
// torch.ops.mage.check_errors reads where the caller synchronises anyway. (Ascending order is
// not checked on CUDA: a repeated index there is attended twice.)
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace mage {

// The dtype of lse (and of the kernels' internal accumulation): float32, or float64 for float64
// inputs (the CPU kernels take float64 so that gradients can be checked by finite differences).
inline at::ScalarType lse_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

struct AttentionDims {
  int64_t batch = 0;
  int64_t hq = 0;        // query heads
  int64_t hkv = 0;       // KV heads
  int64_t group = 0;     // hq / hkv
  int64_t block = 0;     // B, queries (and block keys) per sequence
  int64_t dim = 0;       // head dim d
  int64_t capacity = 0;  // cache positions per (sequence, KV head)
  double scale = 0.0;
};

// How the messages name the key/value arguments and their layouts (block_sparse_attention
// calls its cache "ctx" and its block "own").
struct AttentionNames {
  const char* k_cache = "k_cache";
  const char* v_cache = "v_cache";
  const char* k_block = "k_block";
  const char* v_block = "v_block";
  const char* cache_layout = "[batch, Hkv, capacity, d]";
  const char* block_layout = "[batch, Hkv, B, d]";
};

// q, k_cache, v_cache, k_block, v_block: shapes, dtypes, devices, layouts. `cuda_block` is the
// query block one CUDA kernel CTA sees (default: B = q.size(2)), checked against the kernels'
// limit.
AttentionDims check_attention_inputs(const char* op, const at::Tensor& q,
                                     const at::Tensor& k_cache, const at::Tensor& v_cache,
                                     const at::Tensor& k_block, const at::Tensor& v_block,
                                     std::optional<double> scale,
                                     const AttentionNames& names = AttentionNames{},
                                     int64_t cuda_block = -1);

// cache_lens: int32 [batch] on the device of `ref`; on CPU also 0 <= value <= capacity - extra.
void check_cache_lens(const char* op, const at::Tensor& cache_lens, const AttentionDims& dims,
                      const at::Device& device, int64_t extra = 0, const char* ref = "q");

// indices [batch, Hkv, k] int32, counts [batch, Hkv] int32; on CPU also the values: every
// count in [0, k], and each row's first counts[b, h] indices strictly ascending (so unique)
// within [0, capacity). (sparse_attention has no cache_lens; mage_ext.check_selection also
// checks the indices against them.)
void check_selection(const char* op, const at::Tensor& indices, const at::Tensor& counts,
                     const AttentionDims& dims, const at::Device& device);

// block_sparse_attention's selection: indices [batch, n_blocks, Hkv, k] int32, counts
// [batch, n_blocks, Hkv] int32; on CPU also the values (entries within [0, ctx_len)).
void check_block_selection(const char* op, const at::Tensor& indices, const at::Tensor& counts,
                           int64_t batch, int64_t n_blocks, int64_t hkv, int64_t ctx_len,
                           const at::Device& device);

// block_sparse_attention: q [batch, Hq, T, d], k_ctx/v_ctx [batch, Hkv, N, d], k_own/v_own
// [batch, Hkv, T, d], T a multiple of block_size, and the selection. dims.block is T and
// dims.capacity N.
struct BlockSparseDims {
  AttentionDims dims;
  int64_t block_size = 0;
  int64_t n_blocks = 0;
};
BlockSparseDims check_block_sparse_inputs(const char* op, const at::Tensor& q,
                                          const at::Tensor& k_ctx, const at::Tensor& v_ctx,
                                          const at::Tensor& indices, const at::Tensor& counts,
                                          const at::Tensor& k_own, const at::Tensor& v_own,
                                          int64_t block_size, std::optional<double> scale);

// The forward's results and the incoming gradients of a backward op: dout and out like q,
// lse (and dlse, if defined) [batch, Hq, B] of lse_dtype(q).
void check_attention_grads(const char* op, const AttentionDims& dims, const at::Tensor& q,
                           const at::Tensor& dout, const std::optional<at::Tensor>& dlse,
                           const at::Tensor& out, const at::Tensor& lse);

// Preallocated outputs: out [batch, Hq, B, d] (dtype of q), lse [batch, Hq, B] lse_dtype(q),
// scores [batch, Hkv, capacity] fp32; contiguous, on q's device.
void check_attention_outputs(const char* op, const AttentionDims& dims, const at::Tensor& q,
                             const at::Tensor& out, const at::Tensor& lse,
                             const at::Tensor* scores);

struct TopkDims {
  int64_t batch = 0;
  int64_t hkv = 0;
  int64_t capacity = 0;
  int64_t k = 0;
};

TopkDims check_topk_inputs(const char* op, const at::Tensor& scores,
                           const at::Tensor& cache_lens, int64_t k, int64_t n_sink,
                           int64_t n_recent);
void check_topk_outputs(const char* op, const TopkDims& dims, const at::Tensor& scores,
                        const at::Tensor& indices, const at::Tensor& counts);

// The CUDA kernels index with 32-bit ints: `value` (a size the launcher casts) must fit one.
void check_fits_int(const char* op, const char* what, int64_t value);

// Appending B block entries per sequence needs cache_lens[b] + B <= capacity.
AttentionDims check_append_inputs(const char* op, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& cache_lens,
                                  const at::Tensor& k_block, const at::Tensor& v_block);

// ---- The fused elementwise ops of a transformer layer (rms_norm, qkv_rope, silu_mul). ----

struct RmsNormDims {
  int64_t rows = 0;    // x.numel() / hidden
  int64_t hidden = 0;  // x.size(-1)
};

// x [..., hidden] fp16/bf16/fp32; weight [hidden] and residual (optional, x's shape) of x's
// dtype and device; eps >= 0. On CUDA also: hidden a multiple of 8 in [32, 16384].
RmsNormDims check_rms_norm_inputs(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& residual, double eps);
// out and residual_out: x's shape, dtype and device, contiguous, not the same tensor.
void check_rms_norm_outputs(const char* op, const at::Tensor& x, const at::Tensor& out,
                            const at::Tensor& residual_out);

struct QkvRopeDims {
  int64_t batch = 0;
  int64_t block = 0;  // B, tokens per sequence
  int64_t hq = 0;
  int64_t hkv = 0;
  int64_t dim = 0;
  bool qk_norm = false;
};

// qkv [batch, B, (Hq + 2 Hkv) * d] fp16/bf16/fp32, positions [batch, B] int64, inv_freq [d/2]
// fp32, q_norm_weight / k_norm_weight both or neither, [d] of qkv's dtype. On CUDA also: d a
// multiple of 16 (of 8 for fp32) in [32, 1024] (the heads of one token fit shared memory).
QkvRopeDims check_qkv_rope_inputs(const char* op, const at::Tensor& qkv,
                                  const at::Tensor& positions, const at::Tensor& inv_freq,
                                  int64_t n_q_heads, int64_t n_kv_heads, int64_t head_dim,
                                  const std::optional<at::Tensor>& q_norm_weight,
                                  const std::optional<at::Tensor>& k_norm_weight, double eps);
// q [batch, Hq, B, d], k and v [batch, Hkv, B, d]: qkv's dtype and device, contiguous.
void check_qkv_rope_outputs(const char* op, const QkvRopeDims& dims, const at::Tensor& qkv,
                            const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);

struct SiluMulDims {
  int64_t rows = 0;
  int64_t inter = 0;  // I: gate_up.size(-1) / 2
};

// gate_up [..., 2I] fp16/bf16/fp32 with I >= 1.
SiluMulDims check_silu_mul_inputs(const char* op, const at::Tensor& gate_up);
// out [..., I] of gate_up's dtype and device, contiguous.
void check_silu_mul_outputs(const char* op, const at::Tensor& gate_up, const at::Tensor& out);
// mage.block_attention (ops/block_attention.h): q [batch, Hq, T, d] with T a multiple of
// block_size, k_own/v_own [batch, Hkv, T, d], k_ctx/v_ctx [batch, Hkv, N, d] (last dim contiguous),
// one start per sequence with 0 <= start[b] and start[b] + T - block_size <= N.
struct BlockAttentionDims {
  int64_t batch = 0;
  int64_t hq = 0;
  int64_t hkv = 0;
  int64_t group = 0;     // hq / hkv
  int64_t tokens = 0;    // T, query rows (and own keys) per sequence
  int64_t dim = 0;
  int64_t capacity = 0;  // N, context positions per (sequence, KV head)
  int64_t block = 0;     // block_size
  double scale = 0.0;
};

BlockAttentionDims check_block_attention_inputs(const char* op, const at::Tensor& q,
                                                const at::Tensor& k_ctx, const at::Tensor& v_ctx,
                                                const at::Tensor& k_own, const at::Tensor& v_own,
                                                int64_t block_size, at::IntArrayRef start,
                                                std::optional<double> scale);

// The backward's extra inputs: dout and out of q's shape and dtype, lse [batch, Hq, T] in the
// dtype the forward returns (float32, float64 for float64 inputs); on q's device.
void check_block_attention_grad_inputs(const char* op, const BlockAttentionDims& dims,
                                       const at::Tensor& q, const at::Tensor& dout,
                                       const at::Tensor& out, const at::Tensor& lse);

// mage.linear: x [..., K] floating point, weight [N, K] and bias [N] (optional) of x's dtype
// and device (torch.nn.functional.linear's contract).
struct LinearDims {
  int64_t rows = 0;  // x.numel() / K
  int64_t in = 0;    // K
  int64_t out = 0;   // N
};
LinearDims check_linear_inputs(const char* op, const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias);

}  // namespace mage
