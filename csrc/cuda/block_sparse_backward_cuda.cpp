// block_sparse_attention's backward through FlashAttention-2's variable-length backward (torch's
// at::_flash_attention_backward with cumulative sequence lengths), instead of the chunked ATen
// recompute (ops/block_sparse.cpp): a fused kernel keeps P and dS on chip.
//
// Each (sequence, block, KV head) is one variable-length sequence: its block_size query rows with
// the G query heads of the KV head as the heads (so counts may differ between KV heads), and as
// keys its own block then its selected context rows, gathered into one packed tensor. dK / dV
// of the own block go back in place; those of the selected rows are summed into the context
// (SelectedRowGrads, deterministic). Packing: slot t of sequence s goes to row cu_k[s] + t when
// t < block_size + count[s], else to one dump row (never read), so no host synchronisation.
//
// Opt-in (MAGE_SPARSE_BACKWARD=flash; default: the generic path) until it has been measured and
// checked on a GPU. Falls back to the generic path, warning once, where the kernel does not apply
// (fp32, head dims flash does not take, a dlse) or raises (unless MAGE_BLOCK_ATTENTION_STRICT=1).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <mutex>
#include <string>

#include "ops/attention_backward.h"
#include "ops/backward_core.h"
#include "ops/checks.h"

namespace mage::cuda {
namespace {

using at::Tensor;

bool env_is(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v != nullptr && std::string(v) == value;
}

bool flash_applies(const Tensor& q) {
  const auto t = q.scalar_type();
  const auto* p = at::cuda::getCurrentDeviceProperties();
  return (t == at::kHalf || t == at::kBFloat16) && q.size(3) % 8 == 0 && q.size(3) <= 256 &&
         p->major >= 8;
}

// Rank of the lse the variable-length flash forward returns: 3 ([sequences, heads, max_q], older
// FlashAttention-2) or 2 ([heads, total_q], newer); its backward takes the same. Probed once.
int varlen_lse_rank(const Tensor& like) {
  static std::once_flag once;
  static int rank = 0;
  std::call_once(once, [&] {
    auto x = at::zeros({2, 1, 64}, like.options());
    auto cu = at::arange(0, 3, like.options().dtype(at::kInt));
    rank = static_cast<int>(
        std::get<1>(at::_flash_attention_forward(x, x, x, cu, cu, 1, 1, 0.0, false, false, 1.0))
            .dim());
  });
  return rank;
}

// [B, Hkv*G, nb*bs, e] -> [S*bs, G, e] with S = B*nb*Hkv sequences ordered (b, j, h).
Tensor pack_rows(const Tensor& t, int64_t hkv, int64_t nb, int64_t bs) {
  const int64_t b = t.size(0), g = t.size(1) / hkv, e = t.size(3);
  return t.view({b, hkv, g, nb, bs, e}).permute({0, 3, 1, 4, 2, 5}).reshape({-1, g, e});
}

// The inverse of pack_rows: [S*bs, G, e] -> [B, Hkv*G, nb*bs, e].
Tensor unpack_rows(const Tensor& t, int64_t batch, int64_t hkv, int64_t nb, int64_t bs) {
  const int64_t g = t.size(1), e = t.size(2);
  return t.view({batch, nb, hkv, bs, g, e}).permute({0, 2, 4, 1, 3, 5}).reshape(
      {batch, hkv * g, nb * bs, e});
}

AttentionGrads flash_backward(const Tensor& dout, const Tensor& q, const Tensor& k_ctx,
                              const Tensor& v_ctx, const Tensor& indices, const Tensor& counts,
                              const Tensor& k_own, const Tensor& v_own, const Tensor& out,
                              const Tensor& lse, int64_t bs, const BlockSparseDims& bd) {
  const auto& d = bd.dims;
  const int64_t nb = bd.n_blocks, kmax = indices.size(3), hkv = d.hkv, g = d.group;
  const int64_t seqs = d.batch * nb * hkv, slots = bs + kmax, e = d.dim;
  const auto long_opts = q.options().dtype(at::kLong);

  // Keys and values of every sequence, own block first: [S, slots, e].
  auto own = [&](const Tensor& t) {
    return t.view({d.batch, hkv, nb, bs, e}).permute({0, 2, 1, 3, 4}).reshape({seqs, bs, e});
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

  const auto cu_q = at::arange(0, (seqs + 1) * bs, bs, q.options().dtype(at::kInt));
  const auto cu_k32 = cu_k.to(at::kInt);
  // lse [B, Hq, T] -> the layout of the variable-length kernel (every sequence has bs rows).
  const auto lse5 = lse.view({d.batch, hkv, g, nb, bs});
  const auto lse_flash = varlen_lse_rank(q) == 3
                             ? lse5.permute({0, 3, 1, 2, 4}).reshape({seqs, g, bs})
                             : lse5.permute({2, 0, 3, 1, 4}).reshape({g, seqs * bs});
  const auto no_rng = at::empty({}, q.options().dtype(at::kUInt64));
  auto r = at::_flash_attention_backward(
      pack_rows(dout, hkv, nb, bs), pack_rows(q, hkv, nb, bs), kp, vp, pack_rows(out, hkv, nb, bs),
      lse_flash.contiguous(), cu_q, cu_k32, bs, slots, 0.0, false, no_rng, no_rng, d.scale);

  // Per-slot gradients [S, slots, e] back from the packed rows (dump / unused rows: garbage,
  // only read at invalid slots, which go to SelectedRowGrads' spare rows).
  auto per_slot = [&](const Tensor& packed) {
    return packed.view({-1, e}).index_select(0, target).view({seqs, slots, e});
  };
  const auto dk_s = per_slot(std::get<1>(r)), dv_s = per_slot(std::get<2>(r));
  auto own_back = [&](const Tensor& t) {
    return t.narrow(1, 0, bs).reshape({d.batch, nb, hkv, bs, e}).permute({0, 2, 1, 3, 4})
        .reshape({d.batch, hkv, nb * bs, e}).contiguous();
  };
  SelectedRowGrads ctx_grads(d.batch, hkv, k_ctx.size(2), e,
                             q.options().dtype(at::kFloat));
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
  const auto dtype = q.scalar_type();
  return {unpack_rows(std::get<0>(r), d.batch, hkv, nb, bs).contiguous(), ctx_grads.dk(dtype),
          ctx_grads.dv(dtype), own_back(dk_s), own_back(dv_s)};
}

AttentionGrads block_sparse_attention_backward(const Tensor& dout,
                                               const std::optional<Tensor>& dlse,
                                               const Tensor& q, const Tensor& k_ctx,
                                               const Tensor& v_ctx, const Tensor& indices,
                                               const Tensor& counts, const Tensor& k_own,
                                               const Tensor& v_own, const Tensor& out,
                                               const Tensor& lse, int64_t block_size,
                                               std::optional<double> scale) {
  auto generic = [&] {
    return block_sparse_attention_backward_generic(dout, dlse, q, k_ctx, v_ctx, indices, counts,
                                                   k_own, v_own, out, lse, block_size, scale);
  };
  if (!env_is("MAGE_SPARSE_BACKWARD", "flash") || dlse.has_value() || !flash_applies(q)) {
    return generic();
  }
  const char* op = "mage.block_sparse_attention_backward";
  const c10::cuda::CUDAGuard guard(q.device());
  const auto bd = check_block_sparse_inputs(op, q, k_ctx, v_ctx, indices, counts, k_own, v_own,
                                            block_size, scale);
  check_attention_grads(op, bd.dims, q, dout, dlse, out, lse);
  try {
    return flash_backward(dout.contiguous(), q.contiguous(), k_ctx, v_ctx, indices, counts,
                          k_own.contiguous(), v_own.contiguous(), out.contiguous(),
                          lse.contiguous(), block_size, bd);
  } catch (const c10::Error& e) {
    const char* strict = std::getenv("MAGE_BLOCK_ATTENTION_STRICT");
    if (strict != nullptr && strict[0] != '\0' && strict[0] != '0') throw;
    TORCH_WARN_ONCE(op, ": the FlashAttention variable-length backward failed (",
                    e.what_without_backtrace(), "); using the generic ATen path instead");
    return generic();
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(mage, CUDA, m) {
  m.impl("block_sparse_attention_backward", &block_sparse_attention_backward);
}

}  // namespace mage::cuda
