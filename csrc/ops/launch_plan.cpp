#include "ops/launch_plan.h"

#include <algorithm>

namespace mage::cuda {
namespace {

// Key tiles of the longest key list (at least one).
int64_t key_tiles_of(int64_t max_keys) {
  return std::max<int64_t>(1, (max_keys + kKeyTile - 1) / kKeyTile);
}

// 64-row warpgroups per CTA for `rows` (> 64) query rows per KV head; row_units = batch * Hkv,
// key_tiles = the longest key list in tiles.
// 2 or 3 groups (a fourth does not fit the registers). Up to 192 rows one CTA holds them all;
// more (224 for the 7B shape) take two 2-group CTAs per key split, the second reading the K/V
// tiles mostly from L2. Measured on the H200 (7B shape, both kernels in one process:
// benchmarks/results/wgmma_loop_probe_h200.json, sparse_7b_probe_h200.json): the two 2-group
// CTAs beat the 224-row mma.sync CTA on the dense step at every batch (batch 1 128K: 169 vs
// 220 us; batch 8 32K: 333 vs 449; batch 32 32K: 1315 vs 1869) and, since the sparse gathers
// have 4 producer warps, on the sparse step at batch 32 too (k = 512: 41.4 vs 42.3 us, 2048:
// 103 vs 114, 4096: 195 vs 214; k = 256 alone is slower, 31.4 vs 29.8).
// A short sparse key list whose units do not fill the GPU spreads 129-192 rows over two CTAs
// (2 + 1 groups) instead of splitting the keys further (fewer partials to merge): 1.5B shape,
// batch 32: k = 256 24.8 -> 17.8 us, k = 512 28.0 -> 25.2; with k = 2048 (33 tiles) the key
// split wins (52.3 vs 65.7 us; benchmarks/results/sparse_groups_probe_h200.json).
int wgmma_groups_for(int rows, int64_t row_units, bool sparse, int64_t key_tiles, int sm_count) {
  const int need = (rows + 63) / 64;
  if (need == 3 && sparse && key_tiles <= kShortKeyTiles && row_units < sm_count) return 2;
  return need == 3 ? 3 : 2;  // (rows > 64: need >= 2)
}

}  // namespace

Splits plan_splits(int64_t max_keys, int64_t ctas_per_split, int64_t target_ctas, int min_tiles) {
  const int64_t tiles = key_tiles_of(max_keys);
  const int64_t max_splits = std::max<int64_t>(1, tiles / min_tiles);
  // Rounded down: all CTAs in one wave. Rounding up left a few CTAs for a second wave (SDAR at
  // batch 1: 8 heads x 17 splits = 136 CTAs on 132 SMs), which cost a whole CTA's time again
  // (measured: SDAR dense 128K 306 -> 175 us, 1.5B batch 8 at 128K 728 -> 429 us).
  const int64_t want = std::max<int64_t>(1, target_ctas / ctas_per_split);
  const int64_t splits = std::clamp<int64_t>(want, 1, std::min<int64_t>(max_splits, 65535));
  const int64_t tiles_per_split = (tiles + splits - 1) / splits;
  return {static_cast<int>((tiles + tiles_per_split - 1) / tiles_per_split),
          static_cast<int>(tiles_per_split * kKeyTile)};
}

AttentionPlan plan_attention(int rows, int64_t units, int64_t max_keys, bool sparse, int sm_count,
                             bool wgmma) {
  // One wave of equal splits: one CTA per SM (the kernel fills an SM's shared memory; two for
  // narrow warpgroup CTAs). Wide CTAs when the key tiles can fill the GPU with them; else narrow
  // ones (64 rows), so a short key list (the sparse step at small batch) still spreads over many
  // SMs. On sm_90a builds both are the warpgroup (wgmma) kernel, with 64-row groups.
  const int64_t key_tiles = key_tiles_of(max_keys);
  const int groups = wgmma ? wgmma_groups_for(rows, units, sparse, key_tiles, sm_count) : 0;
  const int wide_rows = groups > 0 ? 64 * groups : kRowsWide;
  const int64_t wide_ctas = key_tiles * units * ((rows + wide_rows - 1) / wide_rows);
  // (Narrow also when the rows fit in one narrow CTA, e.g. SDAR's block 4: no idle m-tiles.)
  const bool wide = wide_ctas >= sm_count && rows > kRowsNarrow;
  AttentionPlan plan;
  plan.rows_per_cta = wide ? wide_rows : kRowsNarrow;
  // Narrow CTAs are one warpgroup on sm_90a: a 64-key tile takes a fraction of the 4 mma.sync
  // warps' time, which is most of a short split's critical path.
  plan.wgmma_groups = wide ? groups : (wgmma ? 1 : 0);
  const int64_t row_tiles = (rows + plan.rows_per_cta - 1) / plan.rows_per_cta;
  const int ctas_per_sm = plan.wgmma_groups == 1 ? kNarrowWgmmaCtasPerSm : 1;
  // One key tile per split where the GPU has room: a split's time at batch 1 is mostly the
  // latency of its first tile (measured: each further tile of a split added ~1.6-3.6 us).
  plan.splits = plan_splits(max_keys, row_tiles * units,
                            static_cast<int64_t>(sm_count) * ctas_per_sm, /*min_tiles=*/1);
  return plan;
}

}  // namespace mage::cuda
