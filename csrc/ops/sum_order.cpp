#include "ops/sum_order.h"

#include <algorithm>

namespace mage {
namespace {

constexpr int kMaxThreads = 512;  // Reduce.cuh's MAX_NUM_THREADS for float
constexpr int kWarp = 32;
constexpr int64_t kMaxValuesPerThread = 256;

// floor(log2(n)) as a power of two, at least 1 (Reduce.cuh's last_pow2).
int last_pow2(int64_t n) {
  int64_t p = 1;
  while (p * 2 <= n) p *= 2;
  return static_cast<int>(p);
}

int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

SumOrder torch_mean_order(int64_t rows, int64_t n) {
  SumOrder o;
  // "Vectorize along input" when the reduced (fastest) dimension has >= 128 elements.
  o.vec = n >= 128 ? 4 : 1;
  const int64_t dim0 = n / o.vec;
  const int dim0_pow2 = dim0 < kMaxThreads ? last_pow2(dim0) : kMaxThreads;
  const int dim1_pow2 = rows < kMaxThreads ? last_pow2(rows) : kMaxThreads;
  int width = std::min(dim0_pow2, kWarp);
  const int height = std::min(dim1_pow2, kMaxThreads / width);
  width = std::min(dim0_pow2, kMaxThreads / height);
  // The block's y threads split the row (instead of taking other rows) when each x thread
  // would otherwise sum at least min(16 * height, 256) values.
  const bool split = div_up(n, width) >= std::min<int64_t>(16 * height, kMaxValuesPerThread);
  o.width = width;
  o.threads = split ? width * height : width;
  // torch then splits across CTAs too when each thread still has >= 256 values (and the grid
  // is small, which is not modelled here: conservatively flagged).
  o.cta_split = split && div_up(n, o.threads) >= kMaxValuesPerThread;
  return o;
}

float torch_mean_factor(int64_t rows, int64_t n) {
  return static_cast<float>(rows) / static_cast<float>(rows * n);
}

}  // namespace mage
