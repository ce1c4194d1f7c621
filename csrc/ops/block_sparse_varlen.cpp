// See ops/block_sparse_varlen.h.
#include "ops/block_sparse_varlen.h"

#include "ops/backward_core.h"

#include <algorithm>
#include <vector>

namespace mage {
namespace {

using at::Tensor;

// [B, Hkv*G, nb*bs, e] -> [S*G*bs, 1, e]: S = B*nb*Hkv sequences ordered (b, j, h), each with
// the G*bs query rows of its KV head's G query heads, ordered (head in the group, row).
Tensor pack_rows(const Tensor& t, int64_t hkv, int64_t nb, int64_t bs) {
  const int64_t b = t.size(0), g = t.size(1) / hkv, e = t.size(3);
  return t.reshape({b, hkv, g, nb, bs, e}).permute({0, 3, 1, 2, 4, 5}).reshape({-1, 1, e});
}

// The inverse of pack_rows: [S*G*bs, 1, e] -> [B, Hkv*G, nb*bs, e].
Tensor unpack_rows(const Tensor& t, int64_t batch, int64_t hkv, int64_t g, int64_t nb,
                   int64_t bs) {
  const int64_t e = t.size(2);
  return t.view({batch, nb, hkv, g, bs, e}).permute({0, 2, 3, 1, 4, 5}).reshape(
      {batch, hkv * g, nb * bs, e});
}

}  // namespace

namespace {

// One group of blocks [j0, j0 + nb) of every sequence: its dq, dk_own, dv_own (in the compute
// layout [B, H, nb*bs, e]); the selected rows' dK / dV are summed into ctx_grads.
std::tuple<Tensor, Tensor, Tensor> varlen_group(
    const Tensor& dout, const Tensor& q, const Tensor& k_ctx, const Tensor& v_ctx,
    const Tensor& indices, const Tensor& counts, const Tensor& k_own, const Tensor& v_own,
    const Tensor& out, const Tensor& lse, int64_t bs, const BlockSparseDims& bd,
    const VarlenBackward& kernel, int lse_rank, SelectedRowGrads& ctx_grads) {
  const auto& d = bd.dims;
  const int64_t nb = indices.size(1), kmax = indices.size(3), hkv = d.hkv, g = d.group;
  const int64_t seqs = d.batch * nb * hkv, slots = bs + kmax, e = d.dim;
  const auto long_opts = q.options().dtype(at::kLong);

  // Keys and values of every sequence, own block first: [S, slots, e].
  auto own = [&](const Tensor& t) {
    return t.reshape({d.batch, hkv, nb, bs, e}).permute({0, 2, 1, 3, 4}).reshape({seqs, bs, e});
  };
  const auto idx = indices.to(at::kLong).clamp_min(0);  // [B, nb, Hkv, kmax]
  auto selected = [&](const Tensor& ctx) {
    const auto src = ctx.unsqueeze(1).expand({d.batch, nb, hkv, ctx.size(2), e});
    return src.gather(3, idx.unsqueeze(-1).expand({d.batch, nb, hkv, kmax, e}))
        .reshape({seqs, kmax, e});
  };
  // (counts past kmax are reported by the forward's device error record; clamped here so that
  // no sequence reaches past the packed rows)
  const auto lengths = counts.to(at::kLong).clamp(0, kmax).reshape({seqs}) + bs;  // [S]
  const auto cu_k = at::cat({at::zeros({1}, long_opts), lengths.cumsum(0)});
  const auto slot = at::arange(slots, long_opts).view({1, slots});
  const int64_t dump = seqs * slots;  // the packed tensors' last row
  const auto target =
      at::where(slot < lengths.view({seqs, 1}), cu_k.narrow(0, 0, seqs).view({seqs, 1}) + slot,
                dump)
          .reshape({-1});
  auto pack_keys = [&](const Tensor& ctx, const Tensor& own_t) {
    auto packed = at::empty({dump + 1, 1, e}, q.options());
    packed.view({dump + 1, e}).index_copy_(0, target,
                                          at::cat({own(own_t), selected(ctx)}, 1).view({-1, e}));
    return packed;
  };
  const auto kp = pack_keys(k_ctx, k_own), vp = pack_keys(v_ctx, v_own);

  const int64_t rows = g * bs;  // query rows per sequence (one head: GQA through the rows, so
                               // flash never expands dK / dV to the query heads)
  const auto cu_q = at::arange(0, (seqs + 1) * rows, rows, q.options().dtype(at::kInt));
  const auto cu_k32 = cu_k.to(at::kInt);
  // lse [B, Hq, T] -> the layout of the variable-length kernel, rows as pack_rows orders them.
  const auto lse_rows = lse.reshape({d.batch, hkv, g, nb, bs}).permute({0, 3, 1, 2, 4});
  const auto lse_varlen = lse_rows.reshape(lse_rank == 3 ? at::IntArrayRef{seqs, 1, rows}
                                                          : at::IntArrayRef{1, seqs * rows});
  auto r = kernel(pack_rows(dout, hkv, nb, bs), pack_rows(q, hkv, nb, bs), kp, vp,
                  pack_rows(out, hkv, nb, bs), lse_varlen.contiguous(), cu_q, cu_k32, rows, slots,
                  d.scale);

  // Per-slot gradients [S, slots, e] back from the packed rows (dump / unused rows: garbage,
  // only read at invalid slots, which go to SelectedRowGrads' spare rows).
  auto per_slot = [&](const Tensor& packed) {
    return packed.view({-1, e}).index_select(0, target).view({seqs, slots, e});
  };
  const auto dk_s = per_slot(std::get<1>(r)), dv_s = per_slot(std::get<2>(r));
  auto own_back = [&](const Tensor& t) {
    return t.narrow(1, 0, bs).reshape({d.batch, nb, hkv, bs, e}).permute({0, 2, 1, 3, 4})
        .reshape({d.batch, hkv, nb * bs, e});
  };
  const auto valid = at::arange(kmax, long_opts).view({1, 1, kmax}) <
                     counts.to(at::kLong).reshape({d.batch * nb, hkv, 1});  // [B*nb, Hkv, kmax]
  auto sel = [&](const Tensor& t) {  // the selected slots' rows, [B, nb, Hkv, kmax, e]
    return t.narrow(1, bs, kmax).reshape({d.batch, nb, hkv, kmax, e});
  };
  const auto dk_sel = sel(dk_s), dv_sel = sel(dv_s);
  const auto valid_b = valid.view({d.batch, nb, hkv, kmax});
  for (int64_t b = 0; b < d.batch; ++b) {
    ctx_grads.add(b, idx[b], valid_b[b], dk_sel[b], dv_sel[b]);
  }
  return {unpack_rows(std::get<0>(r), d.batch, hkv, g, nb, bs), own_back(dk_s), own_back(dv_s)};
}

}  // namespace

int64_t varlen_group_blocks(int64_t n_blocks, int64_t seqs_per_block, int64_t slots,
                            int64_t dim, int64_t budget_elements) {
  const int64_t per_block = std::max<int64_t>(1, seqs_per_block * slots * dim);
  return std::clamp<int64_t>(budget_elements / per_block, 1, std::max<int64_t>(n_blocks, 1));
}

AttentionGrads block_sparse_backward_varlen(const Tensor& dout, const Tensor& q,
                                            const Tensor& k_ctx, const Tensor& v_ctx,
                                            const Tensor& indices, const Tensor& counts,
                                            const Tensor& k_own, const Tensor& v_own,
                                            const Tensor& out, const Tensor& lse, int64_t bs,
                                            const BlockSparseDims& bd,
                                            const VarlenBackward& kernel, int lse_rank,
                                            int64_t budget_elements) {
  const auto& d = bd.dims;
  const int64_t nb = bd.n_blocks, kmax = indices.size(3);
  const int64_t group = varlen_group_blocks(nb, d.batch * d.hkv, bs + kmax, d.dim,
                                            budget_elements);
  SelectedRowGrads ctx_grads(d.batch, d.hkv, k_ctx.size(2), d.dim,
                             q.options().dtype(lse_dtype(q.scalar_type())));
  std::vector<Tensor> dq, dk_own, dv_own;
  for (int64_t j0 = 0; j0 < nb; j0 += group) {
    const int64_t n = std::min(group, nb - j0);
    auto rows = [&](const Tensor& t) { return t.narrow(2, j0 * bs, n * bs); };  // [B, H, T, ...]
    auto blocks = [&](const Tensor& t) { return t.narrow(1, j0, n); };          // [B, nb, ...]
    auto r = varlen_group(rows(dout), rows(q), k_ctx, v_ctx, blocks(indices), blocks(counts),
                          rows(k_own), rows(v_own), rows(out), rows(lse), bs, bd, kernel,
                          lse_rank, ctx_grads);
    dq.push_back(std::get<0>(r));
    dk_own.push_back(std::get<1>(r));
    dv_own.push_back(std::get<2>(r));
  }
  const auto dtype = q.scalar_type();
  return {at::cat(dq, 2), ctx_grads.dk(dtype), ctx_grads.dv(dtype), at::cat(dk_own, 2),
          at::cat(dv_own, 2)};
}

std::tuple<Tensor, Tensor, Tensor> varlen_backward_reference(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
    const Tensor& lse, const Tensor& cu_q, const Tensor& cu_k, int64_t /*max_q*/,
    int64_t /*max_k*/, double scale) {
  const auto acc = lse_dtype(q.scalar_type());
  auto dq = at::zeros(q.sizes(), q.options()), dk = at::zeros(k.sizes(), k.options()),
       dv = at::zeros(v.sizes(), v.options());
  const auto cq = cu_q.to(at::kCPU).to(at::kLong), ck = cu_k.to(at::kCPU).to(at::kLong);
  for (int64_t s = 0; s + 1 < cq.size(0); ++s) {
    const int64_t q0 = cq[s].item<int64_t>(), nq = cq[s + 1].item<int64_t>() - q0;
    const int64_t k0 = ck[s].item<int64_t>(), nk = ck[s + 1].item<int64_t>() - k0;
    auto rows = [&](const Tensor& t, int64_t r0, int64_t n) {
      return t.narrow(0, r0, n).select(1, 0).to(acc);
    };
    const auto qs = rows(q, q0, nq), dos = rows(dout, q0, nq), os = rows(out, q0, nq);
    const auto ks = rows(k, k0, nk), vs = rows(v, k0, nk);
    const auto l = lse.reshape({-1}).narrow(0, q0, nq).to(acc).unsqueeze(1);
    const auto p = (at::matmul(qs, ks.t()) * scale - l).exp();
    const auto ds = p * (at::matmul(dos, vs.t()) - (dos * os).sum(1, true));
    dq.narrow(0, q0, nq).select(1, 0).copy_(at::matmul(ds, ks) * scale);
    dk.narrow(0, k0, nk).select(1, 0).copy_(at::matmul(ds.t(), qs) * scale);
    dv.narrow(0, k0, nk).select(1, 0).copy_(at::matmul(p.t(), dos));
  }
  return {dq, dk, dv};
}

}  // namespace mage
