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
// scale defaults to 1/sqrt(d).
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
