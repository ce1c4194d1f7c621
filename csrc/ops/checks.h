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

}  // namespace mage
