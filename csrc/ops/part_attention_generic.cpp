// The generic PartKernel (ops/block_attention.h): attention over every key or token-causal
// (square), forward and backward, as tiles of ATen matmuls with fp32 math (fp64 for fp64
// inputs). Memory is bounded by one [Hkv, G*kQueryChunk, kKeyChunk] tile; the loops run in a
// fixed order (no atomics), so results are deterministic. Serves the CPU kernel and is the CUDA
// fallback (fp64, and whatever the fused kernels cannot do).
#include <limits>

#include "ops/block_attention.h"
#include "ops/online_softmax.h"

namespace mage {
namespace {

constexpr int64_t kQueryChunk = 256;  // query tokens per tile (G rows each per KV head)
constexpr int64_t kKeyChunk = 1024;   // keys per tile

// Tokens [q0, q0 + n) of sequence b of t [B, Hq, S, d], grouped by KV head: [Hkv, G*n, d],
// row g*n + i holding query head h*G + g, token q0 + i (the repeat_kv grouping).
at::Tensor grouped_rows(const at::Tensor& t, int64_t b, int64_t q0, int64_t n, int64_t hkv,
                        at::ScalarType dtype) {
  return t[b].narrow(1, q0, n).to(dtype).reshape({hkv, -1, t.size(3)});
}

// Causal tiles: -inf where the key (k0 + c) lies after the query (q0 + i). logits [Hkv, G*n, C].
void mask_future(at::Tensor& logits, int64_t q0, int64_t n, int64_t k0) {
  const int64_t c = logits.size(2);
  if (k0 + c - 1 <= q0) return;  // every key of the tile precedes every query
  auto opts = logits.options().dtype(at::kLong);
  auto future = at::arange(k0, k0 + c, opts).unsqueeze(0) > at::arange(q0, q0 + n, opts).unsqueeze(1);
  logits.view({logits.size(0), -1, n, c})
      .masked_fill_(future, -std::numeric_limits<double>::infinity());
}

class GenericPartKernel final : public PartKernel {
 public:
  const char* name() const override { return "generic"; }

  std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& v, bool causal,
                                             double scale) const override {
    const int64_t batch = q.size(0), hq = q.size(1), sq = q.size(2), dim = q.size(3);
    const int64_t hkv = k.size(1), sk = k.size(2);
    TORCH_INTERNAL_ASSERT(sk > 0 && (!causal || sq == sk), "generic part: bad key range");
    const auto dt = compute_dtype(q);
    auto out = at::empty({batch, hq, sq, dim}, q.options().dtype(dt));
    auto lse = at::empty({batch, hq, sq}, q.options().dtype(dt));
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t q0 = 0; q0 < sq; q0 += kQueryChunk) {
        const int64_t n = std::min(kQueryChunk, sq - q0);
        const auto rows = grouped_rows(q, b, q0, n, hkv, dt) * scale;  // never in place: may alias q
        OnlineSoftmax sm(hkv, rows.size(1), dim, rows.options());
        const int64_t kend = causal ? q0 + n : sk;
        for (int64_t k0 = 0; k0 < kend; k0 += kKeyChunk) {
          const int64_t c = std::min(kKeyChunk, kend - k0);
          auto logits = at::matmul(rows, k[b].narrow(1, k0, c).to(dt).transpose(1, 2));
          if (causal) mask_future(logits, q0, n, k0);
          sm.add(logits, v[b].narrow(1, k0, c).to(dt));
        }
        out[b].narrow(1, q0, n).copy_(sm.output().reshape({hq, n, dim}));
        lse[b].narrow(1, q0, n).copy_(sm.lse().reshape({hq, n}));
      }
    }
    return {out, lse};
  }

  // P = exp(S - lse), D = rowsum(dout * out), dS = P * (dP - D): the standard attention
  // backward, tile by tile, with the caller's (global) out and lse.
  std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
      const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
      const at::Tensor& out, const at::Tensor& lse, bool causal, double scale) const override {
    const int64_t batch = q.size(0), hq = q.size(1), sq = q.size(2), dim = q.size(3);
    const int64_t hkv = k.size(1), sk = k.size(2);
    TORCH_INTERNAL_ASSERT(sk > 0 && (!causal || sq == sk), "generic part: bad key range");
    const auto dt = compute_dtype(q);
    const auto delta = (dout.to(dt) * out.to(dt)).sum(-1);  // [B, Hq, Sq]
    auto dq = at::empty({batch, hq, sq, dim}, q.options().dtype(dt));
    auto dk = at::zeros({batch, hkv, sk, dim}, q.options().dtype(dt));
    auto dv = at::zeros({batch, hkv, sk, dim}, q.options().dtype(dt));
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t q0 = 0; q0 < sq; q0 += kQueryChunk) {
        const int64_t n = std::min(kQueryChunk, sq - q0);
        const auto rows = grouped_rows(q, b, q0, n, hkv, dt);
        const auto drows = grouped_rows(dout, b, q0, n, hkv, dt);
        const auto row_lse = lse[b].narrow(1, q0, n).to(dt).reshape({hkv, -1, 1});
        const auto row_delta = delta[b].narrow(1, q0, n).reshape({hkv, -1, 1});
        auto dq_rows = at::zeros_like(rows);
        const int64_t kend = causal ? q0 + n : sk;
        for (int64_t k0 = 0; k0 < kend; k0 += kKeyChunk) {
          const int64_t c = std::min(kKeyChunk, kend - k0);
          const auto keys = k[b].narrow(1, k0, c).to(dt);
          const auto values = v[b].narrow(1, k0, c).to(dt);
          auto logits = at::matmul(rows, keys.transpose(1, 2)).mul_(scale);
          if (causal) mask_future(logits, q0, n, k0);
          const auto p = (logits - row_lse).exp_();
          const auto ds = p * (at::matmul(drows, values.transpose(1, 2)) - row_delta);
          dq_rows.add_(at::matmul(ds, keys));
          dk[b].narrow(1, k0, c).add_(at::matmul(ds.transpose(1, 2), rows));
          dv[b].narrow(1, k0, c).add_(at::matmul(p.transpose(1, 2), drows));
        }
        dq[b].narrow(1, q0, n).copy_(dq_rows.mul_(scale).reshape({hq, n, dim}));
      }
    }
    dk.mul_(scale);
    return {dq, dk, dv};
  }
};

}  // namespace

at::ScalarType compute_dtype(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

const PartKernel& generic_part_kernel() {
  static const GenericPartKernel kernel;
  return kernel;
}

}  // namespace mage
