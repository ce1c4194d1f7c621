// torch's CUDA row-sum order (csrc/ops/sum_order.h), which the fused RMSNorm kernels reproduce:
// the configurations torch 2.11's Reduce.cuh picks, worked out by hand from setReduceConfig.
#include <gtest/gtest.h>

#include <cstdint>

#include "ops/sum_order.h"

namespace {

using mage::SumOrder;
using mage::torch_mean_factor;
using mage::torch_mean_order;

void expect_order(int64_t rows, int64_t n, int vec, int threads, int width) {
  const SumOrder o = torch_mean_order(rows, n);
  EXPECT_EQ(o.vec, vec) << rows << " x " << n;
  EXPECT_EQ(o.threads, threads) << rows << " x " << n;
  EXPECT_EQ(o.width, width) << rows << " x " << n;
  EXPECT_FALSE(o.cta_split) << rows << " x " << n;
}

TEST(SumOrder, OneWarpPerRowFromSixteenRows) {
  expect_order(32, 1536, 4, 32, 32);    // 1.5B hidden, batch 1 x 32 tokens
  expect_order(512, 3584, 4, 32, 32);   // 7B hidden, batch 16
  expect_order(16, 4096, 4, 32, 32);
  expect_order(384, 128, 4, 32, 32);    // q_norm rows of d = 128
  expect_order(4096, 64, 1, 32, 32);    // d = 64: not vectorised (fewer than 128 elements)
}

TEST(SumOrder, FewRowsWidenTheRow) {
  expect_order(4, 1536, 4, 128, 128);   // block 4, batch 1: 4 rows of 128 threads
  expect_order(1, 1536, 4, 256, 256);
  expect_order(8, 64, 1, 64, 64);
  expect_order(8, 256, 4, 64, 64);
  expect_order(8, 128, 4, 32, 32);      // d = 128 has 32 vectors: never wider than a warp
}

TEST(SumOrder, LongRowsSplitAcrossWarps) {
  expect_order(64, 8192, 4, 512, 32);   // 16 warps of 32 share a row
  expect_order(1, 8192, 4, 512, 512);
  expect_order(2, 16384, 4, 512, 256);
}

TEST(SumOrder, NoCtaSplitUpToSixteenThousandElements) {
  for (int64_t n = 32; n <= 16384; n += 8) {
    for (int64_t rows : {1, 2, 3, 4, 7, 8, 15, 16, 17, 32, 100, 511, 512, 100000}) {
      const SumOrder o = torch_mean_order(rows, n);
      EXPECT_FALSE(o.cta_split) << rows << " x " << n;
      EXPECT_GE(o.width, 32) << rows << " x " << n;
      EXPECT_EQ(o.threads % o.width, 0) << rows << " x " << n;
      EXPECT_LE(o.threads, 512) << rows << " x " << n;
    }
  }
}

TEST(SumOrder, MeanFactorIsTheRoundedReciprocal) {
  EXPECT_EQ(torch_mean_factor(32, 1536), 1.0f / 1536.0f);
  EXPECT_EQ(torch_mean_factor(7, 3584), 1.0f / 3584.0f);
  EXPECT_EQ(torch_mean_factor(1, 128), 1.0f / 128.0f);
}

}  // namespace
