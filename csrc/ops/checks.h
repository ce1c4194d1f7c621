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

// indices [batch, Hkv, k] int32, counts [batch, Hkv] int32; on CPU also the values: every
// count in [0, k], and each row's first counts[b, h] indices strictly ascending (so unique)
// within [0, capacity). (sparse_attention has no cache_lens; mage_ext.check_selection also
// checks the indices against them.)
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

// The CUDA kernels index with 32-bit ints: `value` (a size the launcher casts) must fit one.
void check_fits_int(const char* op, const char* what, int64_t value);

// Appending B block entries per sequence needs cache_lens[b] + B <= capacity.
AttentionDims check_append_inputs(const char* op, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& cache_lens,
                                  const at::Tensor& k_block, const at::Tensor& v_block);

}  // namespace mage
