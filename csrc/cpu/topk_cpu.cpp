// CPU top-k selection: per (sequence, KV head) a partial selection (nth_element) over the
// middle of the cache, plus the always-kept sink and recent positions; ascending output.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "ops/checks.h"

namespace mage::cpu {
namespace {

// Selects into dst[0, count) and returns count. NaN scores rank lowest; ties go to the
// earlier position, so the result is deterministic.
int64_t select_one(const float* score, int64_t len, int64_t k, int64_t n_sink,
                   int64_t n_recent, int32_t* dst) {
  if (len <= k) {
    std::iota(dst, dst + len, 0);
    return len;
  }
  // n_sink + n_recent <= k < len: sinks, middle and recents are disjoint.
  std::vector<int32_t> middle(len - n_sink - n_recent);
  std::iota(middle.begin(), middle.end(), static_cast<int32_t>(n_sink));
  auto key = [score](int32_t j) {
    const float s = score[j];
    return std::isnan(s) ? -std::numeric_limits<float>::infinity() : s;
  };
  auto better = [&key](int32_t a, int32_t b) {
    const float sa = key(a), sb = key(b);
    return sa > sb || (sa == sb && a < b);
  };
  const int64_t take = k - n_sink - n_recent;
  std::nth_element(middle.begin(), middle.begin() + take, middle.end(), better);
  int64_t n = 0;
  for (int64_t j = 0; j < n_sink; ++j) dst[n++] = static_cast<int32_t>(j);
  for (int64_t i = 0; i < take; ++i) dst[n++] = middle[i];
  for (int64_t j = len - n_recent; j < len; ++j) dst[n++] = static_cast<int32_t>(j);
  std::sort(dst + n_sink, dst + n_sink + take);
  return n;
}

void topk_select_out(const at::Tensor& scores_in, const at::Tensor& cache_lens_in, int64_t k,
                     int64_t n_sink, int64_t n_recent, const at::Tensor& indices,
                     const at::Tensor& counts) {
  const char* op = "mage.topk_select";
  const auto d = check_topk_inputs(op, scores_in, cache_lens_in, k, n_sink, n_recent);
  check_topk_outputs(op, d, scores_in, indices, counts);
  const auto scores = scores_in.contiguous();
  const auto cache_lens = cache_lens_in.contiguous();
  const float* s = scores.data_ptr<float>();
  const int32_t* lens = cache_lens.data_ptr<int32_t>();
  int32_t* idx = indices.data_ptr<int32_t>();
  int32_t* cnt = counts.data_ptr<int32_t>();
  at::parallel_for(0, d.batch * d.hkv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t len = lens[bh / d.hkv];
      int32_t* dst = idx + bh * k;
      const int64_t n = select_one(s + bh * d.capacity, len, k, n_sink, n_recent, dst);
      std::fill(dst + n, dst + k, -1);
      cnt[bh] = static_cast<int32_t>(n);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(mage, CPU, m) { m.impl("topk_select_out", &topk_select_out); }

}  // namespace mage::cpu
