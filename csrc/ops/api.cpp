// The C++ API (include/mage/ops.h): every function calls its op through the dispatcher, so the
// C++ runtime and Python share one set of kernels, checks and registrations.
#include <ATen/core/dispatch/Dispatcher.h>

#include "mage/ops.h"

namespace mage {
namespace {

template <typename Fn>
c10::TypedOperatorHandle<Fn> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

using T = const at::Tensor&;
using Scale = std::optional<double>;

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_with_scores(T q, T k_cache, T v_cache,
                                                                     T cache_lens, T k_block,
                                                                     T v_block, Scale scale) {
  static auto op =
      op_handle<std::tuple<at::Tensor, at::Tensor, at::Tensor>(T, T, T, T, T, T, Scale)>(
          "mage::attention_with_scores");
  return op.call(q, k_cache, v_cache, cache_lens, k_block, v_block, scale);
}

std::tuple<at::Tensor, at::Tensor> dense_attention(T q, T k_cache, T v_cache, T cache_lens,
                                                   T k_block, T v_block, Scale scale) {
  static auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(T, T, T, T, T, T, Scale)>(
      "mage::dense_attention");
  return op.call(q, k_cache, v_cache, cache_lens, k_block, v_block, scale);
}

std::tuple<at::Tensor, at::Tensor> sparse_attention(T q, T k_cache, T v_cache, T indices,
                                                    T counts, T k_block, T v_block,
                                                    Scale scale) {
  static auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(T, T, T, T, T, T, T, Scale)>(
      "mage::sparse_attention");
  return op.call(q, k_cache, v_cache, indices, counts, k_block, v_block, scale);
}

std::tuple<at::Tensor, at::Tensor> topk_select(T scores, T cache_lens, int64_t k,
                                               int64_t n_sink, int64_t n_recent) {
  static auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(T, T, int64_t, int64_t, int64_t)>(
      "mage::topk_select");
  return op.call(scores, cache_lens, k, n_sink, n_recent);
}

void append_kv(T k_cache, T v_cache, T cache_lens, T k_block, T v_block) {
  static auto op = op_handle<void(T, T, T, T, T)>("mage::append_kv");
  op.call(k_cache, v_cache, cache_lens, k_block, v_block);
}

void attention_with_scores_out(T q, T k_cache, T v_cache, T cache_lens, T k_block, T v_block,
                               Scale scale, T out, T lse, T scores) {
  static auto op = op_handle<void(T, T, T, T, T, T, Scale, T, T, T)>(
      "mage::attention_with_scores_out");
  op.call(q, k_cache, v_cache, cache_lens, k_block, v_block, scale, out, lse, scores);
}

void dense_attention_out(T q, T k_cache, T v_cache, T cache_lens, T k_block, T v_block,
                         Scale scale, T out, T lse) {
  static auto op =
      op_handle<void(T, T, T, T, T, T, Scale, T, T)>("mage::dense_attention_out");
  op.call(q, k_cache, v_cache, cache_lens, k_block, v_block, scale, out, lse);
}

void sparse_attention_out(T q, T k_cache, T v_cache, T indices, T counts, T k_block, T v_block,
                          Scale scale, T out, T lse) {
  static auto op =
      op_handle<void(T, T, T, T, T, T, T, Scale, T, T)>("mage::sparse_attention_out");
  op.call(q, k_cache, v_cache, indices, counts, k_block, v_block, scale, out, lse);
}

void topk_select_out(T scores, T cache_lens, int64_t k, int64_t n_sink, int64_t n_recent,
                     T indices, T counts) {
  static auto op =
      op_handle<void(T, T, int64_t, int64_t, int64_t, T, T)>("mage::topk_select_out");
  op.call(scores, cache_lens, k, n_sink, n_recent, indices, counts);
}

std::vector<int64_t> take_error(c10::Device device) {
  static auto op = op_handle<std::vector<int64_t>(c10::Device)>("mage::take_error");
  return op.call(device);
}

void check_errors(c10::Device device) {
  static auto op = op_handle<void(c10::Device)>("mage::check_errors");
  op.call(device);
}

}  // namespace mage
