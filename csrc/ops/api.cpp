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
using OptT = const std::optional<at::Tensor>&;
using Scale = std::optional<double>;
using OptT = const std::optional<at::Tensor>&;

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

std::tuple<at::Tensor, at::Tensor> block_sparse_attention(T q, T k_ctx, T v_ctx, T indices,
                                                          T counts, T k_own, T v_own,
                                                          int64_t block_size, Scale scale) {
  static auto op =
      op_handle<std::tuple<at::Tensor, at::Tensor>(T, T, T, T, T, T, T, int64_t, Scale)>(
          "mage::block_sparse_attention");
  return op.call(q, k_ctx, v_ctx, indices, counts, k_own, v_own, block_size, scale);
}

AttentionGrads dense_attention_backward(T dout, OptT dlse, T q, T k_cache, T v_cache,
                                        T cache_lens, T k_block, T v_block, T out, T lse,
                                        Scale scale) {
  static auto op = op_handle<AttentionGrads(T, OptT, T, T, T, T, T, T, T, T, Scale)>(
      "mage::dense_attention_backward");
  return op.call(dout, dlse, q, k_cache, v_cache, cache_lens, k_block, v_block, out, lse, scale);
}

AttentionGrads sparse_attention_backward(T dout, OptT dlse, T q, T k_cache, T v_cache,
                                         T indices, T counts, T k_block, T v_block, T out,
                                         T lse, Scale scale) {
  static auto op = op_handle<AttentionGrads(T, OptT, T, T, T, T, T, T, T, T, T, Scale)>(
      "mage::sparse_attention_backward");
  return op.call(dout, dlse, q, k_cache, v_cache, indices, counts, k_block, v_block, out, lse,
                 scale);
}

AttentionGrads block_sparse_attention_backward(T dout, OptT dlse, T q, T k_ctx, T v_ctx,
                                               T indices, T counts, T k_own, T v_own, T out,
                                               T lse, int64_t block_size, Scale scale) {
  static auto op =
      op_handle<AttentionGrads(T, OptT, T, T, T, T, T, T, T, T, T, int64_t, Scale)>(
          "mage::block_sparse_attention_backward");
  return op.call(dout, dlse, q, k_ctx, v_ctx, indices, counts, k_own, v_own, out, lse,
                 block_size, scale);
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

std::tuple<at::Tensor, at::Tensor> rms_norm(T x, T weight, double eps, OptT residual) {
  static auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(T, T, double, OptT)>(
      "mage::rms_norm");
  return op.call(x, weight, eps, residual);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> qkv_rope(T qkv, T positions, T inv_freq,
                                                        int64_t n_q_heads, int64_t n_kv_heads,
                                                        int64_t head_dim, OptT q_norm_weight,
                                                        OptT k_norm_weight, double eps) {
  static auto op = op_handle<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      T, T, T, int64_t, int64_t, int64_t, OptT, OptT, double)>("mage::qkv_rope");
  return op.call(qkv, positions, inv_freq, n_q_heads, n_kv_heads, head_dim, q_norm_weight,
                 k_norm_weight, eps);
}

at::Tensor silu_mul(T gate_up) {
  static auto op = op_handle<at::Tensor(T)>("mage::silu_mul");
  return op.call(gate_up);
}

at::Tensor linear(T x, T weight, OptT bias) {
  static auto op = op_handle<at::Tensor(T, T, OptT)>("mage::linear");
  return op.call(x, weight, bias);
}

void rms_norm_out(T x, T weight, double eps, OptT residual, T out, T residual_out) {
  static auto op = op_handle<void(T, T, double, OptT, T, T)>("mage::rms_norm_out");
  op.call(x, weight, eps, residual, out, residual_out);
}

void qkv_rope_out(T qkv, T positions, T inv_freq, int64_t n_q_heads, int64_t n_kv_heads,
                  int64_t head_dim, OptT q_norm_weight, OptT k_norm_weight, double eps, T q, T k,
                  T v) {
  static auto op = op_handle<void(T, T, T, int64_t, int64_t, int64_t, OptT, OptT, double, T, T,
                                  T)>("mage::qkv_rope_out");
  op.call(qkv, positions, inv_freq, n_q_heads, n_kv_heads, head_dim, q_norm_weight,
          k_norm_weight, eps, q, k, v);
}

void silu_mul_out(T gate_up, T out) {
  static auto op = op_handle<void(T, T)>("mage::silu_mul_out");
  op.call(gate_up, out);
}

std::tuple<at::Tensor, at::Tensor> block_attention(T q, T k_ctx, T v_ctx, T k_own, T v_own,
                                                   int64_t block_size, at::IntArrayRef start,
                                                   Scale scale) {
  static auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(T, T, T, T, T, int64_t,
                                                                at::IntArrayRef, Scale)>(
      "mage::block_attention");
  return op.call(q, k_ctx, v_ctx, k_own, v_own, block_size, start, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> block_attention_backward(
    T dout, T q, T k_ctx, T v_ctx, T k_own, T v_own, T out, T lse, int64_t block_size,
    at::IntArrayRef start, Scale scale) {
  using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
  static auto op = op_handle<Grads(T, T, T, T, T, T, T, T, int64_t, at::IntArrayRef, Scale)>(
      "mage::block_attention_backward");
  return op.call(dout, q, k_ctx, v_ctx, k_own, v_own, out, lse, block_size, start, scale);
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
