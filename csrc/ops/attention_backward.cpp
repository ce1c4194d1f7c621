// Backward of dense_attention / attention_with_scores (one op: both are exact attention over
// cache[:len] + block) and of sparse_attention, as the chunked recompute of
// ops/backward_core.h with every sequence as one unit: its G*B query rows per KV head attend to
// cache chunks (a dense range, or a chunk of the selection's slots), then to the block's keys.
#include <functional>

#include "ops/attention_backward.h"
#include "ops/backward_core.h"
#include "ops/checks.h"

namespace mage {
namespace {

using T = const at::Tensor&;
using OptT = const std::optional<at::Tensor>&;

// Keys of cache entries the sequences [u0, u1) may attend to (the chunk loop's end).
using KeysOfGroup = std::function<int64_t(int64_t u0, int64_t u1)>;
// Processes cache slots [c0, c0 + c) of sequences [u0, u1): gradients into dk_cache / dv_cache.
using CacheChunk = std::function<void(QueryRowsGrad& rows, int64_t u0, int64_t u1, int64_t c0,
                                      int64_t c, T dk_cache, T dv_cache)>;

AttentionGrads sequence_backward(const AttentionDims& d, T dout, OptT dlse, T q, T k_cache,
                                 T k_block, T v_block, T out, T lse, int64_t max_cache_keys,
                                 const KeysOfGroup& keys_of_group, const CacheChunk& cache_chunk) {
  const MatmulPrecision math(q);
  const auto acc = math.compute;
  const int64_t rows = d.group * d.block;
  auto as_rows = [&](T t) { return math.op(t).reshape({d.batch, d.hkv, rows, d.dim}); };
  const auto q_rows = as_rows(q), dout_rows = as_rows(dout);
  const auto lse_rows = lse.to(acc).reshape({d.batch, d.hkv, rows});
  const auto delta = softmax_delta(dout, out, dlse.value_or(at::Tensor()), acc)
                         .reshape({d.batch, d.hkv, rows});

  const auto opts = q.options().memory_format(at::MemoryFormat::Contiguous);
  auto dq = at::empty(q.sizes(), opts);
  // Cache rows nobody attends to (past a length, unselected) get exact zeros.
  auto dk_cache = at::zeros(k_cache.sizes(), opts), dv_cache = at::zeros(k_cache.sizes(), opts);
  auto dk_block = at::empty(k_block.sizes(), opts), dv_block = at::empty(k_block.sizes(), opts);

  const auto plan = plan_chunks(q.device(), d.batch, d.hkv * rows, max_cache_keys + d.block);
  for (int64_t u0 = 0; u0 < d.batch; u0 += plan.units_per_group) {
    const int64_t u1 = std::min(d.batch, u0 + plan.units_per_group);
    QueryRowsGrad g(math, q_rows.slice(0, u0, u1), dout_rows.slice(0, u0, u1),
                    lse_rows.slice(0, u0, u1), delta.slice(0, u0, u1), d.scale);
    const int64_t keys = keys_of_group(u0, u1);
    for (int64_t c0 = 0; c0 < keys; c0 += plan.keys_per_chunk) {
      cache_chunk(g, u0, u1, c0, std::min(plan.keys_per_chunk, keys - c0), dk_cache, dv_cache);
    }
    auto [dk, dv] = g.key_chunk(k_block.slice(0, u0, u1), v_block.slice(0, u0, u1), at::Tensor());
    dk_block.slice(0, u0, u1).copy_(dk);
    dv_block.slice(0, u0, u1).copy_(dv);
    dq.slice(0, u0, u1).copy_(g.dq().reshape({u1 - u0, d.hq, d.block, d.dim}));
  }
  return {dq, dk_cache, dv_cache, dk_block, dv_block};
}

// The largest of `values` [batch, ...] over sequences [u0, u1): read on the CPU only; on a GPU
// it would cost a host synchronisation, so the caller's bound (capacity, k) is used there.
int64_t group_max(const at::Tensor& values, int64_t u0, int64_t u1, int64_t bound) {
  if (!values.is_cpu()) return bound;
  return std::min(bound, values.slice(0, u0, u1).max().item<int64_t>());
}

}  // namespace

AttentionGrads dense_attention_backward_generic(T dout, OptT dlse, T q, T k_cache, T v_cache,
                                                T cache_lens, T k_block, T v_block, T out, T lse,
                                                std::optional<double> scale) {
  const char* op = "mage.dense_attention_backward";
  const auto d = check_attention_inputs(op, q, k_cache, v_cache, k_block, v_block, scale);
  check_cache_lens(op, cache_lens, d, q.device());
  check_attention_grads(op, d, q, dout, dlse, out, lse);
  const auto lens = cache_lens.to(at::kLong);

  auto keys_of_group = [&](int64_t u0, int64_t u1) {
    return group_max(lens, u0, u1, d.capacity);
  };
  auto chunk = [&](QueryRowsGrad& g, int64_t u0, int64_t u1, int64_t c0, int64_t c,
                   T dk_cache, T dv_cache) {
    const auto valid = at::arange(c0, c0 + c, lens.options()).view({1, 1, c}) <
                       lens.slice(0, u0, u1).view({-1, 1, 1});  // [U, 1, C]
    auto [dk, dv] = g.key_chunk(k_cache.slice(0, u0, u1).narrow(2, c0, c),
                                v_cache.slice(0, u0, u1).narrow(2, c0, c), valid);
    dk_cache.slice(0, u0, u1).narrow(2, c0, c).copy_(dk);
    dv_cache.slice(0, u0, u1).narrow(2, c0, c).copy_(dv);
  };
  return sequence_backward(d, dout, dlse, q, k_cache, k_block, v_block, out, lse, d.capacity,
                           keys_of_group, chunk);
}

AttentionGrads sparse_attention_backward_generic(T dout, OptT dlse, T q, T k_cache, T v_cache,
                                                 T indices, T counts, T k_block, T v_block,
                                                 T out, T lse, std::optional<double> scale) {
  const char* op = "mage.sparse_attention_backward";
  const auto d = check_attention_inputs(op, q, k_cache, v_cache, k_block, v_block, scale);
  check_selection(op, indices, counts, d, q.device());
  check_attention_grads(op, d, q, dout, dlse, out, lse);
  const auto idx = indices.to(at::kLong), cnt = counts.to(at::kLong);
  const int64_t kmax = indices.size(2);

  auto keys_of_group = [&](int64_t u0, int64_t u1) { return group_max(cnt, u0, u1, kmax); };
  auto chunk = [&](QueryRowsGrad& g, int64_t u0, int64_t u1, int64_t c0, int64_t c,
                   T dk_cache, T dv_cache) {
    const auto valid = at::arange(c0, c0 + c, cnt.options()).view({1, 1, c}) <
                       cnt.slice(0, u0, u1).unsqueeze(-1);  // [U, Hkv, C]
    const auto pos = at::where(valid, idx.slice(0, u0, u1).narrow(2, c0, c), 0);
    auto [dk, dv] = g.key_chunk(gather_rows(k_cache.slice(0, u0, u1), pos),
                                gather_rows(v_cache.slice(0, u0, u1), pos), valid);
    // The gathered rows scatter back. A selection's positions are unique per (sequence, KV
    // head) and invalid slots add exact zeros (at row 0), so no two nonzero contributions meet
    // and the result does not depend on the order of the adds (atomics on CUDA included).
    const auto where = pos.unsqueeze(-1).expand_as(dk);
    dk_cache.slice(0, u0, u1).scatter_add_(2, where, dk.to(dk_cache.scalar_type()));
    dv_cache.slice(0, u0, u1).scatter_add_(2, where, dv.to(dv_cache.scalar_type()));
  };
  return sequence_backward(d, dout, dlse, q, k_cache, k_block, v_block, out, lse, kmax,
                           keys_of_group, chunk);
}

}  // namespace mage
