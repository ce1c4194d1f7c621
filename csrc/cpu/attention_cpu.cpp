// CPU kernels of the three attention ops. All math in fp32 (fp64 for fp64 inputs: lse_dtype)
// through ATen (BLAS matmuls over chunks of the cache, intra-op parallel), with an online
// softmax so memory stays bounded by one chunk whatever the cache length. Per sequence: its G*B
// query rows per KV head attend to cache chunks, then to the block's own keys.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>

#include "ops/checks.h"
#include "ops/online_softmax.h"

namespace mage::cpu {
namespace {

constexpr int64_t kChunk = 2048;  // cache positions per matmul

at::Tensor rows_of(const at::Tensor& q, int64_t b, const AttentionDims& d) {
  // q[b] is [Hq, B, d]; query head g*... of KV head h are rows [h, g*B + i] (repeat_kv order).
  return q[b]
      .to(lse_dtype(q.scalar_type()))
      .mul(d.scale)
      .reshape({d.hkv, d.group * d.block, d.dim});
}

int32_t len_of(const at::Tensor& cache_lens, int64_t b) {
  return cache_lens.data_ptr<int32_t>()[b];
}

void write_output(const OnlineSoftmax& sm, int64_t b, const AttentionDims& d,
                  const at::Tensor& out, const at::Tensor& lse) {
  out[b].copy_(sm.output().reshape({d.hq, d.block, d.dim}));
  lse[b].copy_(sm.lse().reshape({d.hq, d.block}));
}

// Exact attention over cache[:len] + block for every sequence; optional importance scores.
void exact_attention(const char* op, const at::Tensor& q_in, const at::Tensor& k_cache,
                     const at::Tensor& v_cache, const at::Tensor& cache_lens_in,
                     const at::Tensor& k_block, const at::Tensor& v_block,
                     std::optional<double> scale, const at::Tensor& out, const at::Tensor& lse,
                     const at::Tensor* scores) {
  const auto d = check_attention_inputs(op, q_in, k_cache, v_cache, k_block, v_block, scale);
  check_cache_lens(op, cache_lens_in, d, q_in.device());
  check_attention_outputs(op, d, q_in, out, lse, scores);
  const auto q = q_in.contiguous();
  const auto cache_lens = cache_lens_in.contiguous();

  for (int64_t b = 0; b < d.batch; ++b) {
    const int64_t len = len_of(cache_lens, b);
    const auto rows = rows_of(q, b, d);
    OnlineSoftmax sm(d.hkv, rows.size(1), d.dim, rows.options());
    for (int64_t c0 = 0; c0 < len; c0 += kChunk) {
      const int64_t c = std::min(kChunk, len - c0);
      auto keys = k_cache[b].narrow(1, c0, c).to(rows.scalar_type());
      auto values = v_cache[b].narrow(1, c0, c).to(rows.scalar_type());
      sm.add(at::matmul(rows, keys.transpose(1, 2)), values);
    }
    sm.add(at::matmul(rows, k_block[b].to(rows.scalar_type()).transpose(1, 2)),
           v_block[b].to(rows.scalar_type()));
    write_output(sm, b, d, out, lse);

    if (scores != nullptr) {
      // Second pass: the normaliser (lse) of every row is known only after the first.
      const auto row_lse = sm.lse().unsqueeze(-1);  // [Hkv, R, 1]
      auto s = (*scores)[b];                        // [Hkv, capacity]
      s.zero_();
      for (int64_t c0 = 0; c0 < len; c0 += kChunk) {
        const int64_t c = std::min(kChunk, len - c0);
        auto keys = k_cache[b].narrow(1, c0, c).to(rows.scalar_type());
        auto p = at::exp(at::matmul(rows, keys.transpose(1, 2)) - row_lse);  // [Hkv, R, C]
        s.narrow(1, c0, c).copy_(p.mean(1));
      }
    }
  }
}

void attention_with_scores_out(const at::Tensor& q, const at::Tensor& k_cache,
                               const at::Tensor& v_cache, const at::Tensor& cache_lens,
                               const at::Tensor& k_block, const at::Tensor& v_block,
                               std::optional<double> scale, const at::Tensor& out,
                               const at::Tensor& lse, const at::Tensor& scores) {
  exact_attention("mage.attention_with_scores", q, k_cache, v_cache, cache_lens, k_block,
                  v_block, scale, out, lse, &scores);
}

void dense_attention_out(const at::Tensor& q, const at::Tensor& k_cache,
                         const at::Tensor& v_cache, const at::Tensor& cache_lens,
                         const at::Tensor& k_block, const at::Tensor& v_block,
                         std::optional<double> scale, const at::Tensor& out,
                         const at::Tensor& lse) {
  exact_attention("mage.dense_attention", q, k_cache, v_cache, cache_lens, k_block, v_block,
                  scale, out, lse, nullptr);
}

void sparse_attention_out(const at::Tensor& q_in, const at::Tensor& k_cache,
                          const at::Tensor& v_cache, const at::Tensor& indices_in,
                          const at::Tensor& counts_in, const at::Tensor& k_block,
                          const at::Tensor& v_block, std::optional<double> scale,
                          const at::Tensor& out, const at::Tensor& lse) {
  const char* op = "mage.sparse_attention";
  const auto d = check_attention_inputs(op, q_in, k_cache, v_cache, k_block, v_block, scale);
  check_selection(op, indices_in, counts_in, d, q_in.device());
  check_attention_outputs(op, d, q_in, out, lse, nullptr);
  const auto q = q_in.contiguous();
  const auto indices = indices_in.to(at::kLong);
  const auto counts = counts_in.to(at::kLong);
  const int64_t k = indices.size(2);

  for (int64_t b = 0; b < d.batch; ++b) {
    const auto rows = rows_of(q, b, d);
    OnlineSoftmax sm(d.hkv, rows.size(1), d.dim, rows.options());
    const auto count = counts[b].unsqueeze(-1);  // [Hkv, 1]
    for (int64_t c0 = 0; c0 < k; c0 += kChunk) {
      const int64_t c = std::min(kChunk, k - c0);
      auto valid = (at::arange(c0, c0 + c, indices.options()).unsqueeze(0) < count);  // [Hkv, C]
      auto idx = at::where(valid, indices[b].narrow(1, c0, c), at::zeros_like(count));
      auto gather_idx = idx.unsqueeze(-1).expand({d.hkv, c, d.dim});
      auto keys = k_cache[b].gather(1, gather_idx).to(rows.scalar_type());
      auto values = v_cache[b].gather(1, gather_idx).to(rows.scalar_type());
      auto logits = at::matmul(rows, keys.transpose(1, 2));
      logits.masked_fill_(valid.logical_not().unsqueeze(1),
                          -std::numeric_limits<float>::infinity());
      sm.add(logits, values);
    }
    sm.add(at::matmul(rows, k_block[b].to(rows.scalar_type()).transpose(1, 2)),
           v_block[b].to(rows.scalar_type()));
    write_output(sm, b, d, out, lse);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(mage, CPU, m) {
  m.impl("attention_with_scores_out", &attention_with_scores_out);
  m.impl("dense_attention_out", &dense_attention_out);
  m.impl("sparse_attention_out", &sparse_attention_out);
}

}  // namespace mage::cpu
