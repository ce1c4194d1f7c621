// A naive fp64 reference of the MAGE ops, written as plain loops so it shares nothing with the
// kernels under test.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <vector>

namespace mage_test {

struct NaiveResult {
  at::Tensor out;     // [batch, Hq, B, d] fp64
  at::Tensor lse;     // [batch, Hq, B] fp64
  at::Tensor scores;  // [batch, Hkv, capacity] fp64
};

// Exact attention of each query row over `keys(b, h)` cache positions plus the block.
// indices/counts undefined: all positions [0, cache_lens[b]).
inline NaiveResult naive_attention(const at::Tensor& q_in, const at::Tensor& kc_in,
                                   const at::Tensor& vc_in, const at::Tensor& lens_in,
                                   const at::Tensor& kb_in, const at::Tensor& vb_in,
                                   const at::Tensor& indices = {},
                                   const at::Tensor& counts = {}) {
  auto q = q_in.to(at::kDouble), kc = kc_in.to(at::kDouble), vc = vc_in.to(at::kDouble);
  auto kb = kb_in.to(at::kDouble), vb = vb_in.to(at::kDouble);
  const int64_t batch = q.size(0), hq = q.size(1), B = q.size(2), d = q.size(3);
  const int64_t hkv = kc.size(1), cap = kc.size(2), G = hq / hkv;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  NaiveResult r{at::zeros_like(q), at::zeros({batch, hq, B}, q.options()),
                at::zeros({batch, hkv, cap}, q.options())};
  auto qa = q.accessor<double, 4>(), kca = kc.accessor<double, 4>(), vca = vc.accessor<double, 4>();
  auto kba = kb.accessor<double, 4>(), vba = vb.accessor<double, 4>();
  auto oa = r.out.accessor<double, 4>();
  auto la = r.lse.accessor<double, 3>();
  auto sa = r.scores.accessor<double, 3>();
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t h = 0; h < hkv; ++h) {
      std::vector<int64_t> pos;
      if (indices.defined()) {
        const int64_t n = counts[b][h].item<int64_t>();
        for (int64_t i = 0; i < n; ++i) pos.push_back(indices[b][h][i].item<int64_t>());
      } else {
        const int64_t n = lens_in[b].item<int64_t>();
        for (int64_t j = 0; j < n; ++j) pos.push_back(j);
      }
      for (int64_t g = 0; g < G; ++g) {
        const int64_t head = h * G + g;
        for (int64_t i = 0; i < B; ++i) {
          std::vector<double> logits;
          for (int64_t j : pos) {
            double s = 0;
            for (int64_t c = 0; c < d; ++c) s += qa[b][head][i][c] * kca[b][h][j][c];
            logits.push_back(s * scale);
          }
          for (int64_t j = 0; j < B; ++j) {
            double s = 0;
            for (int64_t c = 0; c < d; ++c) s += qa[b][head][i][c] * kba[b][h][j][c];
            logits.push_back(s * scale);
          }
          double m = -std::numeric_limits<double>::infinity();
          for (double l : logits) m = std::max(m, l);
          double z = 0;
          for (double l : logits) z += std::exp(l - m);
          const double lse = m + std::log(z);
          la[b][head][i] = lse;
          for (size_t t = 0; t < logits.size(); ++t) {
            const double p = std::exp(logits[t] - lse);
            const bool in_cache = t < pos.size();
            for (int64_t c = 0; c < d; ++c) {
              oa[b][head][i][c] += p * (in_cache ? vca[b][h][pos[t]][c] : vba[b][h][t - pos.size()][c]);
            }
            if (in_cache) sa[b][h][pos[t]] += p / static_cast<double>(G * B);
          }
        }
      }
    }
  }
  return r;
}

}  // namespace mage_test
