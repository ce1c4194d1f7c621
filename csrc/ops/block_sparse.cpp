// block_sparse_attention: the sparse training attention of MAGE-FT. Query block j of a sequence
// (block_size queries) attends to the selected entries indices[b, j, h, :counts] of that
// sequence's context plus its own block's keys, bidirectionally.
//
// The op is sparse_attention with every (sequence, block) as one "unit": the blocks of a
// sequence become the batch of a sparse_attention call, over the sequence's context expanded to
// the blocks with batch stride 0 (nothing copied). So the forward reuses the sparse kernels of
// each backend (on CUDA the fast gather kernels, which read rows with cp.async through the
// cache's batch/head strides and so take the stride-0 batch as it is), one call per sequence.
// The backward is the chunked recompute of ops/backward_core.h over the same units; as many
// blocks select the same context rows, their gradients are accumulated (accumulate_rows).
#include "mage/ops.h"
#include "ops/attention_backward.h"
#include "ops/backward_core.h"
#include "ops/checks.h"
#include "ops/matmul_precision.h"

namespace mage {
namespace {

using T = const at::Tensor&;

// [batch, H, T, ...] -> [batch * n_blocks, H, block_size, ...]: unit b * n_blocks + j holds
// block j of sequence b (a copy unless it is a view already).
at::Tensor to_units(T t, int64_t n_blocks) {
  return t.unflatten(2, {n_blocks, t.size(2) / n_blocks}).transpose(1, 2).flatten(0, 1);
}

// The inverse of to_units: [batch * n_blocks, H, block_size, ...] -> [batch, H, T, ...].
at::Tensor from_units(T t, int64_t batch) {
  return t.unflatten(0, {batch, t.size(0) / batch}).transpose(1, 2).flatten(2, 3);
}

// Query-side units [U, Hkv, G * block_size, ...] (the rows of each KV head) from
// [batch, Hq, T, ...].
at::Tensor to_unit_rows(T t, const BlockSparseDims& bd) {
  return to_units(t, bd.n_blocks).unflatten(1, {bd.dims.hkv, bd.dims.group}).flatten(2, 3);
}

// The context of sequence b seen by `n` units: [n, Hkv, N, d] with batch stride 0.
at::Tensor ctx_for_units(T ctx, int64_t b, int64_t n) {
  return ctx[b].unsqueeze(0).expand({n, ctx.size(1), ctx.size(2), ctx.size(3)});
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> block_sparse_attention_generic(T q, T k_ctx, T v_ctx,
                                                                  T indices, T counts, T k_own,
                                                                  T v_own, int64_t block_size,
                                                                  std::optional<double> scale) {
  const char* op = "mage.block_sparse_attention";
  const auto bd = check_block_sparse_inputs(op, q, k_ctx, v_ctx, indices, counts, k_own, v_own,
                                            block_size, scale);
  const auto& d = bd.dims;
  const int64_t nb = bd.n_blocks;
  const auto q_u = to_units(q, nb).contiguous(), k_u = to_units(k_own, nb).contiguous(),
             v_u = to_units(v_own, nb).contiguous();
  const auto idx_u = indices.flatten(0, 1), cnt_u = counts.flatten(0, 1);
  auto out_u = at::empty_like(q_u);
  auto lse_u = at::empty({d.batch * nb, d.hq, block_size},
                         q.options().dtype(lse_dtype(q.scalar_type())));
  for (int64_t b = 0; b < d.batch; ++b) {
    const int64_t u0 = b * nb, u1 = u0 + nb;
    sparse_attention_out(q_u.slice(0, u0, u1), ctx_for_units(k_ctx, b, nb),
                         ctx_for_units(v_ctx, b, nb), idx_u.slice(0, u0, u1),
                         cnt_u.slice(0, u0, u1), k_u.slice(0, u0, u1), v_u.slice(0, u0, u1),
                         d.scale, out_u.slice(0, u0, u1), lse_u.slice(0, u0, u1));
  }
  return {from_units(out_u, d.batch).contiguous(), from_units(lse_u, d.batch).contiguous()};
}

AttentionGrads block_sparse_attention_backward_generic(
    T dout, const std::optional<at::Tensor>& dlse, T q, T k_ctx, T v_ctx, T indices, T counts,
    T k_own, T v_own, T out, T lse, int64_t block_size, std::optional<double> scale) {
  const char* op = "mage.block_sparse_attention_backward";
  const auto bd = check_block_sparse_inputs(op, q, k_ctx, v_ctx, indices, counts, k_own, v_own,
                                            block_size, scale);
  const auto& d = bd.dims;
  check_attention_grads(op, d, q, dout, dlse, out, lse);
  const MatmulPrecision math(q);
  const auto acc = math.compute;
  const int64_t nb = bd.n_blocks, kmax = indices.size(3);
  const int64_t rows = d.group * block_size;

  const auto q_rows = to_unit_rows(math.op(q), bd), dout_rows = to_unit_rows(math.op(dout), bd);
  const auto lse_rows = to_unit_rows(lse.to(acc), bd);
  const auto delta = to_unit_rows(softmax_delta(dout, out, dlse.value_or(at::Tensor()), acc), bd);
  const auto k_u = to_units(k_own, nb), v_u = to_units(v_own, nb);
  const auto idx_u = indices.flatten(0, 1).to(at::kLong);
  const auto cnt_u = counts.flatten(0, 1).to(at::kLong);

  const auto fp = q.options().dtype(acc).memory_format(at::MemoryFormat::Contiguous);
  auto dq_rows = at::empty(q_rows.sizes(), fp);
  auto dk_u = at::empty(k_u.sizes(), fp), dv_u = at::empty(k_u.sizes(), fp);
  SelectedRowGrads ctx_grads(d.batch, d.hkv, k_ctx.size(2), d.dim, fp);

  const auto plan = plan_chunks(q.device(), nb, d.hkv * rows, kmax + block_size);
  for (int64_t b = 0; b < d.batch; ++b) {
    for (int64_t j0 = 0; j0 < nb; j0 += plan.units_per_group) {
      const int64_t n = std::min(nb - j0, plan.units_per_group);
      const int64_t u0 = b * nb + j0, u1 = u0 + n;
      QueryRowsGrad g(math, q_rows.slice(0, u0, u1), dout_rows.slice(0, u0, u1),
                      lse_rows.slice(0, u0, u1), delta.slice(0, u0, u1), d.scale);
      const auto cnt = cnt_u.slice(0, u0, u1);
      const int64_t keys = cnt.is_cpu() ? cnt.max().item<int64_t>() : kmax;
      for (int64_t c0 = 0; c0 < keys; c0 += plan.keys_per_chunk) {
        const int64_t c = std::min(plan.keys_per_chunk, keys - c0);
        const auto valid = at::arange(c0, c0 + c, cnt.options()).view({1, 1, c}) <
                           cnt.unsqueeze(-1);  // [n, Hkv, C]
        const auto idx = idx_u.slice(0, u0, u1).narrow(2, c0, c);
        const auto pos = at::where(valid, idx, 0);
        auto [dk, dv] = g.key_chunk(gather_rows(ctx_for_units(k_ctx, b, n), pos),
                                    gather_rows(ctx_for_units(v_ctx, b, n), pos), valid);
        ctx_grads.add(b, idx, valid, dk, dv);
      }
      auto [dk, dv] = g.key_chunk(k_u.slice(0, u0, u1), v_u.slice(0, u0, u1), at::Tensor());
      dk_u.slice(0, u0, u1).copy_(dk);
      dv_u.slice(0, u0, u1).copy_(dv);
      dq_rows.slice(0, u0, u1).copy_(g.dq());
    }
  }
  const auto dtype = q.scalar_type();
  auto result = [&](T t) { return t.to(dtype).contiguous(); };
  const auto dq = from_units(dq_rows.unflatten(2, {d.group, block_size}).flatten(1, 2), d.batch);
  return {result(dq), ctx_grads.dk(dtype), ctx_grads.dv(dtype),
          result(from_units(dk_u, d.batch)), result(from_units(dv_u, d.batch))};
}

}  // namespace mage
