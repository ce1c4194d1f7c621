// Input validation for every MAGE op: one place for every error message. Each check names the
// op and the argument, and says what was expected and what was given.
//
// Value checks (cache_lens within capacity, indices within the cache, counts within k) read the
// tensor, so they run for CPU tensors only: on CUDA they would cost a host synchronisation and
// break CUDA graph capture. CUDA kernels instead clamp lengths to the capacity, never read out
// of bounds, and write NaN rows for out-of-range indices (see README, "Limitations").
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace mage {

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

// q, k_cache, v_cache, k_block, v_block: shapes, dtypes, devices, layouts.
AttentionDims check_attention_inputs(const char* op, const at::Tensor& q,
                                     const at::Tensor& k_cache, const at::Tensor& v_cache,
                                     const at::Tensor& k_block, const at::Tensor& v_block,
                                     std::optional<double> scale);

// cache_lens: int32 [batch] on the device of `ref`; on CPU also 0 <= value <= capacity - extra.
void check_cache_lens(const char* op, const at::Tensor& cache_lens, const AttentionDims& dims,
                      const at::Device& device, int64_t extra = 0, const char* ref = "q");

// indices [batch, Hkv, k] int32, counts [batch, Hkv] int32; on CPU also the values.
void check_selection(const char* op, const at::Tensor& indices, const at::Tensor& counts,
                     const AttentionDims& dims, const at::Device& device);

// Preallocated outputs: out [batch, Hq, B, d] (dtype of q), lse [batch, Hq, B] fp32,
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

}  // namespace mage
