// The CUDA attention kernels' launch plan (csrc/ops/launch_plan.h), checked on the CPU: the
// invariants every plan keeps, and the choices measured on the H200 (132 SMs) for the model
// shapes of the benchmarks (Fast-dLLM v2 1.5B: 6 x 32 = 192 rows per KV head, 2 KV heads;
// 7B: 224 rows, 4 heads; SDAR-4B: 128 rows, 8 heads, or 16 with block 4).
#include <gtest/gtest.h>

#include <cstdint>

#include "ops/launch_plan.h"

namespace {

using mage::cuda::AttentionPlan;
using mage::cuda::kKeyTile;
using mage::cuda::plan_attention;
using mage::cuda::plan_splits;
using mage::cuda::Splits;

constexpr int kH200Sms = 132;

int64_t tiles_of(int64_t keys) { return keys <= 0 ? 1 : (keys + kKeyTile - 1) / kKeyTile; }

// Every split non-empty, the key list covered, splits whole tiles.
void expect_covers(const Splits& s, int64_t max_keys) {
  ASSERT_GE(s.num_splits, 1);
  EXPECT_EQ(s.keys_per_split % kKeyTile, 0);
  const int64_t keys = tiles_of(max_keys) * kKeyTile;
  EXPECT_GE(static_cast<int64_t>(s.num_splits) * s.keys_per_split, keys);
  EXPECT_LT(static_cast<int64_t>(s.num_splits - 1) * s.keys_per_split, keys);
}

TEST(PlanSplits, OneWaveOfEqualSplitsCoveringTheKeys) {
  for (int64_t keys : {1, 63, 64, 65, 544, 2080, 8192 + 32, 131072 + 32}) {
    for (int64_t per_split : {1, 2, 6, 16, 64, 128, 256, 1000}) {
      for (int min_tiles : {1, 2, 8}) {
        const Splits s = plan_splits(keys, per_split, kH200Sms, min_tiles);
        expect_covers(s, keys);
        if (s.num_splits > 1) {
          EXPECT_LE(s.num_splits * per_split, kH200Sms) << keys << " keys, " << per_split;
          EXPECT_GE(s.keys_per_split / kKeyTile, min_tiles);
        }
        if (per_split >= kH200Sms) EXPECT_EQ(s.num_splits, 1);
      }
    }
  }
}

TEST(PlanSplits, AtMost65535Splits) {  // the grid's y dimension
  const Splits s = plan_splits(int64_t{1} << 31, 1, int64_t{1} << 20, 1);
  EXPECT_LE(s.num_splits, 65535);
  expect_covers(s, int64_t{1} << 31);
}

AttentionPlan h200(int rows, int64_t units, int64_t max_keys, bool sparse) {
  return plan_attention(rows, units, max_keys, sparse, kH200Sms, /*wgmma=*/true);
}

int64_t ctas(const AttentionPlan& p, int rows, int64_t units) {
  return (rows + p.rows_per_cta - 1) / p.rows_per_cta * units * p.splits.num_splits;
}

TEST(PlanAttention, EveryPlanFitsOneWaveWhenItSplits) {
  for (int rows : {16, 64, 80, 128, 192, 224, 256}) {
    for (int64_t units : {1, 2, 4, 8, 16, 64, 128, 256}) {
      for (int64_t keys : {40, 544, 2080, 32768 + 32, 131072 + 32}) {
        for (bool sparse : {false, true}) {
          for (bool wgmma : {false, true}) {
            const AttentionPlan p = plan_attention(rows, units, keys, sparse, kH200Sms, wgmma);
            expect_covers(p.splits, keys);
            if (wgmma) {
              EXPECT_EQ(p.rows_per_cta, p.wgmma_groups == 0 ? 224 : 64 * p.wgmma_groups);
              EXPECT_LE(p.wgmma_groups, 3);
            } else {
              EXPECT_EQ(p.wgmma_groups, 0);
              EXPECT_TRUE(p.rows_per_cta == 64 || p.rows_per_cta == 224);
            }
            const int per_sm = p.wgmma_groups == 1 ? 2 : 1;
            if (p.splits.num_splits > 1) EXPECT_LE(ctas(p, rows, units), kH200Sms * per_sm);
          }
        }
      }
    }
  }
}

TEST(PlanAttention, DenseStepTakesOneCtaPerHeadUpTo192Rows) {
  const AttentionPlan p15 = h200(192, 2, 131072 + 32, false);  // 1.5B, batch 1, 128K
  EXPECT_EQ(p15.wgmma_groups, 3);
  // 66 splits wanted (2 heads x 66 = 132 CTAs); 2049 tiles in equal splits of 32 tiles give 65.
  EXPECT_EQ(p15.splits.num_splits, 65);
  const AttentionPlan sdar = h200(128, 8, 131072 + 32, false);  // SDAR, batch 1
  EXPECT_EQ(sdar.wgmma_groups, 2);
  EXPECT_EQ(sdar.splits.num_splits, 16);  // 128 CTAs: 17 would spill into a second wave
}

TEST(PlanAttention, SevenBTakesTwoWarpgroupCtas) {
  for (int64_t batch : {1, 8, 32}) {
    EXPECT_EQ(h200(224, 4 * batch, 32768 + 32, false).wgmma_groups, 2) << batch;
  }
  for (int64_t batch : {8, 32}) {  // (batch 1: narrow one-group CTAs, see below)
    for (int64_t k : {256, 512, 2048}) {  // batch 32, k = 2048: 103 vs mma.sync's 114 us
      EXPECT_EQ(h200(224, 4 * batch, k + 32, true).wgmma_groups, 2) << batch << " " << k;
    }
  }
}

TEST(PlanAttention, ShortSparseListsSpreadRowsInsteadOfKeys) {
  const AttentionPlan k512 = h200(192, 2 * 32, 512 + 32, true);  // 1.5B, batch 32
  EXPECT_EQ(k512.wgmma_groups, 2);
  EXPECT_EQ(k512.splits.num_splits, 1);  // 2 x 64 = 128 CTAs, no merge
  const AttentionPlan k2048 = h200(192, 2 * 32, 2048 + 32, true);
  EXPECT_EQ(k2048.wgmma_groups, 3);
  EXPECT_EQ(k2048.splits.num_splits, 2);
}

TEST(PlanAttention, SmallSparseStepsUseNarrowCtasTwoPerSm) {
  const AttentionPlan p = h200(192, 2, 512 + 32, true);  // 1.5B, batch 1, k = 512
  EXPECT_EQ(p.wgmma_groups, 1);
  EXPECT_EQ(p.rows_per_cta, 64);
  EXPECT_EQ(p.splits.num_splits, 9);  // one 64-key tile per split
  EXPECT_EQ(h200(16, 8, 131072 + 4, false).wgmma_groups, 1);  // SDAR block 4: 16 rows
}

}  // namespace
