// The allocating forms of the ops: check shapes, allocate the outputs, call the *_out op.
// One implementation, registered for every backend that has the *_out kernels; with them
// block_sparse_attention, a composite of sparse_attention_out calls (ops/block_sparse.cpp).
#include <torch/library.h>

#include "mage/ops.h"
#include "ops/attention_backward.h"  // block_sparse_attention_generic
#include "ops/checks.h"

namespace mage {
namespace {

using T = const at::Tensor&;
using Scale = std::optional<double>;

std::tuple<at::Tensor, at::Tensor> allocate_out_lse(const AttentionDims& d, T q) {
  return {at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous)),
          at::empty({d.batch, d.hq, d.block}, q.options().dtype(lse_dtype(q.scalar_type())))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_with_scores_impl(
    T q, T k_cache, T v_cache, T cache_lens, T k_block, T v_block, Scale scale) {
  const auto d = check_attention_inputs("mage.attention_with_scores", q, k_cache, v_cache,
                                        k_block, v_block, scale);
  auto [out, lse] = allocate_out_lse(d, q);
  auto scores = at::empty({d.batch, d.hkv, d.capacity}, q.options().dtype(at::kFloat));
  attention_with_scores_out(q, k_cache, v_cache, cache_lens, k_block, v_block, scale, out, lse,
                            scores);
  return {out, lse, scores};
}

std::tuple<at::Tensor, at::Tensor> dense_attention_impl(T q, T k_cache, T v_cache, T cache_lens,
                                                        T k_block, T v_block, Scale scale) {
  const auto d = check_attention_inputs("mage.dense_attention", q, k_cache, v_cache, k_block,
                                        v_block, scale);
  auto [out, lse] = allocate_out_lse(d, q);
  dense_attention_out(q, k_cache, v_cache, cache_lens, k_block, v_block, scale, out, lse);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> sparse_attention_impl(T q, T k_cache, T v_cache, T indices,
                                                         T counts, T k_block, T v_block,
                                                         Scale scale) {
  const auto d = check_attention_inputs("mage.sparse_attention", q, k_cache, v_cache, k_block,
                                        v_block, scale);
  auto [out, lse] = allocate_out_lse(d, q);
  sparse_attention_out(q, k_cache, v_cache, indices, counts, k_block, v_block, scale, out, lse);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> topk_select_impl(T scores, T cache_lens, int64_t k,
                                                    int64_t n_sink, int64_t n_recent) {
  const auto d = check_topk_inputs("mage.topk_select", scores, cache_lens, k, n_sink, n_recent);
  auto indices = at::empty({d.batch, d.hkv, d.k}, scores.options().dtype(at::kInt));
  auto counts = at::empty({d.batch, d.hkv}, scores.options().dtype(at::kInt));
  topk_select_out(scores, cache_lens, k, n_sink, n_recent, indices, counts);
  return {indices, counts};
}

using OptT = const std::optional<at::Tensor>&;

at::Tensor empty_contiguous(at::IntArrayRef shape, T like) {
  return at::empty(shape, like.options().memory_format(at::MemoryFormat::Contiguous));
}

std::tuple<at::Tensor, at::Tensor> rms_norm_impl(T x, T weight, double eps, OptT residual) {
  check_rms_norm_inputs("mage.rms_norm", x, weight, residual, eps);
  auto out = empty_contiguous(x.sizes(), x);
  auto new_residual = empty_contiguous(x.sizes(), x);
  rms_norm_out(x, weight, eps, residual, out, new_residual);
  return {out, new_residual};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> qkv_rope_impl(T qkv, T positions, T inv_freq,
                                                             int64_t n_q_heads,
                                                             int64_t n_kv_heads, int64_t head_dim,
                                                             OptT q_norm_weight,
                                                             OptT k_norm_weight, double eps) {
  const auto d = check_qkv_rope_inputs("mage.qkv_rope", qkv, positions, inv_freq, n_q_heads,
                                       n_kv_heads, head_dim, q_norm_weight, k_norm_weight, eps);
  auto q = empty_contiguous({d.batch, d.hq, d.block, d.dim}, qkv);
  auto k = empty_contiguous({d.batch, d.hkv, d.block, d.dim}, qkv);
  auto v = empty_contiguous({d.batch, d.hkv, d.block, d.dim}, qkv);
  qkv_rope_out(qkv, positions, inv_freq, n_q_heads, n_kv_heads, head_dim, q_norm_weight,
               k_norm_weight, eps, q, k, v);
  return {q, k, v};
}

at::Tensor silu_mul_impl(T gate_up) {
  const auto d = check_silu_mul_inputs("mage.silu_mul", gate_up);
  auto shape = gate_up.sizes().vec();
  shape.back() = d.inter;
  auto out = empty_contiguous(shape, gate_up);
  silu_mul_out(gate_up, out);
  return out;
}

void register_functional(torch::Library& m) {
  m.impl("attention_with_scores", &attention_with_scores_impl);
  m.impl("dense_attention", &dense_attention_impl);
  m.impl("sparse_attention", &sparse_attention_impl);
  m.impl("topk_select", &topk_select_impl);
  m.impl("rms_norm", &rms_norm_impl);
  m.impl("qkv_rope", &qkv_rope_impl);
  m.impl("silu_mul", &silu_mul_impl);
  m.impl("block_sparse_attention", &block_sparse_attention_generic);
}

}  // namespace

TORCH_LIBRARY_IMPL(mage, CPU, m) { register_functional(m); }

#ifdef MAGE_WITH_CUDA
TORCH_LIBRARY_IMPL(mage, CUDA, m) { register_functional(m); }
#endif

}  // namespace mage
