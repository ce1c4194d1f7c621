// The block attention split (see ops/block_attention.h): the local part C by batched matmuls,
// the prefix A and the causal diagonal B by a PartKernel, merged by log-sum-exp. Sequences
// with different starts run one by one (batch views, no copies); equal starts run batched.
#include "ops/block_attention.h"

#include <algorithm>
#include <limits>

#include "ops/matmul_precision.h"

namespace mage {
namespace {

using at::Tensor;

constexpr int64_t kLocalScores = int64_t{1} << 23;  // score elements per local chunk (32 MB fp32)

// One group of sequences sharing `start`.
struct Span {
  const BlockAttentionDims& d;
  int64_t batch;  // sequences in this group
  int64_t start;
  int64_t off() const { return start - d.block; }           // prefix A: ctx [0, off)
  int64_t ctx_end() const { return start + d.tokens - d.block; }  // L: ctx [0, L) is read
  int64_t diag_row() const { return std::max<int64_t>(0, -off()); }  // B's first query row
  int64_t diag_key() const { return std::max<int64_t>(0, off()); }   // B's first ctx key
  int64_t blocks() const { return d.tokens / d.block; }
};

// Rows of blocks [j0, j0 + nb) of t [B, Hq, T, e] (or [B, Hq, T]) in the per-block layout
// [B*Hkv*nb, G*bs, e] (or [B*Hkv*nb, G*bs]): one matrix per (sequence, KV head, block),
// rows ordered (query head in the group, row in the block).
Tensor to_blocks(const Tensor& t, const BlockAttentionDims& d, int64_t j0, int64_t nb) {
  const bool vec = t.dim() == 3;
  const auto t4 = vec ? t.unsqueeze(-1) : t;
  const int64_t batch = t.size(0), e = t4.size(3);
  auto blocks = t4.narrow(2, j0 * d.block, nb * d.block)
                    .reshape({batch, d.hkv, d.group, nb, d.block, e})
                    .permute({0, 1, 3, 2, 4, 5})
                    .reshape({batch * d.hkv * nb, d.group * d.block, e});
  return vec ? blocks.squeeze(-1) : blocks;
}

// Inverse of to_blocks: [B*Hkv*nb, G*bs, e] (or [.., G*bs]) -> [B, Hq, nb*bs, e] (or [B, Hq, nb*bs]).
Tensor from_blocks(const Tensor& x, const BlockAttentionDims& d, int64_t batch, int64_t nb) {
  const bool vec = x.dim() == 2;
  const auto x3 = vec ? x.unsqueeze(-1) : x;
  auto rows = x3.reshape({batch, d.hkv, nb, d.group, d.block, x3.size(2)})
                  .permute({0, 1, 3, 2, 4, 5})
                  .reshape({batch, d.hq, nb * d.block, x3.size(2)});
  return vec ? rows.squeeze(-1) : rows;
}

// Context rows [begin, begin + count) of t [B, Hkv, N, e], zero rows for positions < 0.
Tensor ctx_rows(const Tensor& t, int64_t begin, int64_t count) {
  if (begin >= 0) return t.narrow(2, begin, count);
  const int64_t pad = std::min(-begin, count);
  auto zeros = at::zeros({t.size(0), t.size(1), pad, t.size(3)}, t.options());
  return pad == count ? zeros : at::cat({zeros, t.narrow(2, 0, count - pad)}, 2);
}

// The local keys (or values) of blocks [j0, j0 + nb): the previous block's span of the context
// (ctx positions [start + (j-1)*bs, start + j*bs)) then the own block: [B*Hkv*nb, 2*bs, e].
Tensor local_keys(const Tensor& ctx, const Tensor& own, const Span& s, int64_t j0, int64_t nb) {
  const auto& d = s.d;
  const int64_t e = own.size(3);
  auto tail = ctx_rows(ctx, s.off() + j0 * d.block, nb * d.block)
                  .reshape({s.batch, d.hkv, nb, d.block, e});
  auto mine = own.narrow(2, j0 * d.block, nb * d.block).reshape({s.batch, d.hkv, nb, d.block, e});
  return at::cat({tail, mine}, 3).reshape({s.batch * d.hkv * nb, 2 * d.block, e});
}

// Which local keys a row sees, [nb, 1, bs, 2*bs]: the own block (key i >= bs) always; tail key
// i of block j iff i > r (B covers the rest of the tail) and its position off + j*bs + i >= 0.
Tensor local_mask(const Span& s, int64_t j0, int64_t nb, const at::Device& device) {
  const int64_t bs = s.d.block;
  const auto opts = at::TensorOptions().dtype(at::kLong).device(device);
  const auto i = at::arange(2 * bs, opts);
  const auto r = at::arange(bs, opts);
  const auto first = at::arange(j0, j0 + nb, opts) * bs + s.off();  // position of tail key 0
  const auto later = i.unsqueeze(0) > r.unsqueeze(1);                 // [bs, 2bs]
  const auto exists = (first.unsqueeze(1) + i.unsqueeze(0)) >= 0;      // [nb, 2bs]
  const auto own = (i >= bs).view({1, 1, 2 * bs});
  return (own | (later.unsqueeze(0) & exists.unsqueeze(1))).unsqueeze(1);
}

// Blocks per local chunk: bounds the [B*Hkv*nb, G*bs, 2*bs] score tiles.
int64_t local_chunk(const Span& s) {
  const int64_t per_block = s.batch * s.d.hq * s.d.block * 2 * s.d.block;
  return std::max<int64_t>(1, kLocalScores / per_block);
}

// Masked, scaled local scores of blocks [j0, j0 + nb): [B*Hkv*nb, G*bs, 2*bs], -inf where hidden.
Tensor local_scores(const MatmulPrecision& mm, const Tensor& qb, const Tensor& keys, const Span& s,
                    int64_t j0, int64_t nb) {
  auto scores = mm.mm(qb, keys.transpose(1, 2)).mul_(s.d.scale);
  scores.view({-1, nb, s.d.group, s.d.block, 2 * s.d.block})
      .masked_fill_(local_mask(s, j0, nb, qb.device()).logical_not(),
                    -std::numeric_limits<double>::infinity());
  return scores;
}

// Part C forward into o [B, Hq, T, d] and lse [B, Hq, T] (compute dtype; every row is written).
void local_forward(const Tensor& q, const Tensor& k_ctx, const Tensor& v_ctx, const Tensor& k_own,
                   const Tensor& v_own, const Span& s, Tensor& o, Tensor& lse) {
  const auto& d = s.d;
  const MatmulPrecision mm(q);
  const int64_t step = local_chunk(s);
  for (int64_t j0 = 0; j0 < s.blocks(); j0 += step) {
    const int64_t nb = std::min(step, s.blocks() - j0);
    const auto qb = mm.op(to_blocks(q, d, j0, nb));
    const auto scores = local_scores(mm, qb, mm.op(local_keys(k_ctx, k_own, s, j0, nb)), s, j0, nb);
    const auto row_lse = at::logsumexp(scores, -1);  // finite: the own block is always seen
    const auto p = (scores - row_lse.unsqueeze(-1)).exp_();
    const auto ob = mm.mm(p, mm.op(local_keys(v_ctx, v_own, s, j0, nb)));
    o.narrow(2, j0 * d.block, nb * d.block).copy_(from_blocks(ob, d, s.batch, nb));
    lse.narrow(2, j0 * d.block, nb * d.block).copy_(from_blocks(row_lse, d, s.batch, nb));
  }
}

// Adds grad [B, Hkv, n, e] of ctx positions [begin, begin + n) into acc [B, Hkv, L, e],
// dropping positions < 0 (the zero rows ctx_rows padded in).
void add_ctx_rows(Tensor& acc, const Tensor& grad, int64_t begin) {
  const int64_t skip = std::max<int64_t>(0, -begin), n = grad.size(2) - skip;
  if (n > 0) acc.narrow(2, begin + skip, n).add_(grad.narrow(2, skip, n));
}

struct Grads {
  Tensor dq, dk_ctx, dv_ctx, dk_own, dv_own;  // compute dtype; d*_ctx cover ctx [0, L)
};

// Part C backward with the merged lse and delta = rowsum(dout * out).
void local_backward(const Tensor& dout, const Tensor& q, const Tensor& k_ctx,
                    const Tensor& v_ctx, const Tensor& k_own, const Tensor& v_own,
                    const Tensor& lse, const Tensor& delta, const Span& s, Grads& g) {
  const auto& d = s.d;
  const MatmulPrecision mm(q);
  const int64_t step = local_chunk(s), bs = d.block;
  for (int64_t j0 = 0; j0 < s.blocks(); j0 += step) {
    const int64_t nb = std::min(step, s.blocks() - j0);
    const auto qb = mm.op(to_blocks(q, d, j0, nb));
    const auto dob = mm.op(to_blocks(dout, d, j0, nb));
    const auto keys = mm.op(local_keys(k_ctx, k_own, s, j0, nb));
    const auto values = mm.op(local_keys(v_ctx, v_own, s, j0, nb));
    const auto scores = local_scores(mm, qb, keys, s, j0, nb);
    const auto p = (scores - to_blocks(lse, d, j0, nb).to(mm.compute).unsqueeze(-1)).exp_();
    const auto ds = p * (mm.mm(dob, values.transpose(1, 2)) -
                         to_blocks(delta, d, j0, nb).unsqueeze(-1));
    g.dq.narrow(2, j0 * bs, nb * bs)
        .add_(from_blocks(mm.mm(ds, keys).mul_(d.scale), d, s.batch, nb));
    // [B*Hkv*nb, 2bs, e] -> [B, Hkv, nb, 2bs, e]: keys [0, bs) are the tail, [bs, 2bs) own.
    const auto dk = mm.mm(ds.transpose(1, 2), qb).mul_(d.scale).view({s.batch, d.hkv, nb, 2 * bs, -1});
    const auto dv = mm.mm(p.transpose(1, 2), dob).view({s.batch, d.hkv, nb, 2 * bs, -1});
    auto rows = [&](const Tensor& t, int64_t first) {
      return t.narrow(3, first, bs).reshape({s.batch, d.hkv, nb * bs, t.size(4)});
    };
    g.dk_own.narrow(2, j0 * bs, nb * bs).copy_(rows(dk, bs));
    g.dv_own.narrow(2, j0 * bs, nb * bs).copy_(rows(dv, bs));
    add_ctx_rows(g.dk_ctx, rows(dk, 0), s.off() + j0 * bs);
    add_ctx_rows(g.dv_ctx, rows(dv, 0), s.off() + j0 * bs);
  }
}

// o, lse (compute dtype) <- the log-sum-exp merge of (o, lse) and (o2, lse2): with w2 =
// exp(lse2) / (exp(lse) + exp(lse2)), o += w2 * (o2 - o) and lse = logaddexp(lse, lse2).
// lse is finite (the local part always sees the own block); lse2 finite or -inf.
void merge_into(Tensor o, Tensor lse, const Tensor& o2, const Tensor& lse2) {
  const auto l2 = lse2.to(lse.scalar_type());
  o.lerp_(o2.to(o.scalar_type()), at::sigmoid(l2 - lse).unsqueeze(-1));
  lse.copy_(at::logaddexp(lse, l2));
}

std::tuple<Tensor, Tensor> forward_span(const Tensor& q, const Tensor& k_ctx, const Tensor& v_ctx,
                                        const Tensor& k_own, const Tensor& v_own, const Span& s,
                                        const PartKernel& kernel) {
  const auto& d = s.d;
  const auto opts = q.options().dtype(compute_dtype(q));
  auto o = at::empty({s.batch, d.hq, d.tokens, d.dim}, opts);
  auto lse = at::empty({s.batch, d.hq, d.tokens}, opts);
  local_forward(q, k_ctx, v_ctx, k_own, v_own, s, o, lse);
  if (s.off() > 0) {  // A: the prefix every query sees
    auto [oa, la] = kernel.forward(q, k_ctx.narrow(2, 0, s.off()), v_ctx.narrow(2, 0, s.off()),
                                   /*causal=*/false, d.scale);
    merge_into(o, lse, oa, la);
  }
  const int64_t t0 = s.diag_row(), n = d.tokens - t0;
  if (n > 0) {  // B: query t sees ctx keys up to t + off
    auto [ob, lb] = kernel.forward(q.narrow(2, t0, n), k_ctx.narrow(2, s.diag_key(), n),
                                   v_ctx.narrow(2, s.diag_key(), n), /*causal=*/true, d.scale);
    merge_into(o.narrow(2, t0, n), lse.narrow(2, t0, n), ob, lb);
  }
  return {o, lse};
}

Grads backward_span(const Tensor& dout, const Tensor& q, const Tensor& k_ctx, const Tensor& v_ctx,
                    const Tensor& k_own, const Tensor& v_own, const Tensor& out, const Tensor& lse,
                    const Span& s, const PartKernel& kernel) {
  const auto& d = s.d;
  const auto opts = q.options().dtype(compute_dtype(q));
  Grads g;
  g.dq = at::zeros({s.batch, d.hq, d.tokens, d.dim}, opts);
  g.dk_ctx = at::zeros({s.batch, d.hkv, s.ctx_end(), d.dim}, opts);
  g.dv_ctx = at::zeros({s.batch, d.hkv, s.ctx_end(), d.dim}, opts);
  g.dk_own = at::empty({s.batch, d.hkv, d.tokens, d.dim}, opts);
  g.dv_own = at::empty({s.batch, d.hkv, d.tokens, d.dim}, opts);
  const auto delta = (dout.to(opts.dtype()) * out.to(opts.dtype())).sum(-1);
  local_backward(dout, q, k_ctx, v_ctx, k_own, v_own, lse, delta, s, g);
  if (s.off() > 0) {
    auto [dq, dk, dv] = kernel.backward(dout, q, k_ctx.narrow(2, 0, s.off()),
                                        v_ctx.narrow(2, 0, s.off()), out, lse, false, d.scale);
    g.dq.add_(dq);
    g.dk_ctx.narrow(2, 0, s.off()).add_(dk);
    g.dv_ctx.narrow(2, 0, s.off()).add_(dv);
  }
  const int64_t t0 = s.diag_row(), n = d.tokens - t0;
  if (n > 0) {
    auto [dq, dk, dv] = kernel.backward(
        dout.narrow(2, t0, n), q.narrow(2, t0, n), k_ctx.narrow(2, s.diag_key(), n),
        v_ctx.narrow(2, s.diag_key(), n), out.narrow(2, t0, n), lse.narrow(2, t0, n), true, d.scale);
    g.dq.narrow(2, t0, n).add_(dq);
    g.dk_ctx.narrow(2, s.diag_key(), n).add_(dk);
    g.dv_ctx.narrow(2, s.diag_key(), n).add_(dv);
  }
  return g;
}

bool same_start(at::IntArrayRef start) {
  return std::all_of(start.begin(), start.end(), [&](int64_t x) { return x == start[0]; });
}

// Calls fn(batch_begin, batch_count, start) per group of sequences run together: the whole
// batch when every start is equal, else one sequence at a time.
template <typename Fn>
void for_each_span(const BlockAttentionDims& d, at::IntArrayRef start, Fn&& fn) {
  if (same_start(start)) {
    fn(0, d.batch, start[0]);
  } else {
    for (int64_t b = 0; b < d.batch; ++b) fn(b, 1, start[b]);
  }
}

}  // namespace

std::tuple<Tensor, Tensor> compute_block_attention(const Tensor& q, const Tensor& k_ctx,
                                                   const Tensor& v_ctx, const Tensor& k_own,
                                                   const Tensor& v_own,
                                                   const BlockAttentionDims& dims,
                                                   at::IntArrayRef start,
                                                   const PartKernel& kernel) {
  auto out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  auto lse = at::empty({dims.batch, dims.hq, dims.tokens}, q.options().dtype(compute_dtype(q)));
  for_each_span(dims, start, [&](int64_t b0, int64_t nb, int64_t st) {
    const Span s{dims, nb, st};
    auto [o, l] = forward_span(q.narrow(0, b0, nb), k_ctx.narrow(0, b0, nb),
                               v_ctx.narrow(0, b0, nb), k_own.narrow(0, b0, nb),
                               v_own.narrow(0, b0, nb), s, kernel);
    out.narrow(0, b0, nb).copy_(o);
    lse.narrow(0, b0, nb).copy_(l);
  });
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> compute_block_attention_backward(
    const Tensor& dout, const Tensor& q, const Tensor& k_ctx, const Tensor& v_ctx,
    const Tensor& k_own, const Tensor& v_own, const Tensor& out, const Tensor& lse,
    const BlockAttentionDims& dims, at::IntArrayRef start, const PartKernel& kernel) {
  const auto contiguous = [](const Tensor& t) {
    return at::empty(t.sizes(), t.options().memory_format(at::MemoryFormat::Contiguous));
  };
  auto dq = contiguous(q), dk_own = contiguous(k_own), dv_own = contiguous(v_own);
  auto dk_ctx = at::zeros(k_ctx.sizes(), k_ctx.options().memory_format(at::MemoryFormat::Contiguous));
  auto dv_ctx = at::zeros(v_ctx.sizes(), v_ctx.options().memory_format(at::MemoryFormat::Contiguous));
  for_each_span(dims, start, [&](int64_t b0, int64_t nb, int64_t st) {
    const Span s{dims, nb, st};
    auto slice = [&](const Tensor& t) { return t.narrow(0, b0, nb); };
    const auto g = backward_span(slice(dout), slice(q), slice(k_ctx), slice(v_ctx), slice(k_own),
                                 slice(v_own), slice(out), slice(lse), s, kernel);
    slice(dq).copy_(g.dq);
    slice(dk_own).copy_(g.dk_own);
    slice(dv_own).copy_(g.dv_own);
    slice(dk_ctx).narrow(2, 0, s.ctx_end()).copy_(g.dk_ctx);
    slice(dv_ctx).narrow(2, 0, s.ctx_end()).copy_(g.dv_ctx);
  });
  return {dq, dk_ctx, dv_ctx, dk_own, dv_own};
}

}  // namespace mage
