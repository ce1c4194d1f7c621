// The CUDA attention kernels' launch plan: which kernel and CTA shape (64-row warpgroups of the
// sm_90a kernel, or the mma.sync kernel's two shapes) and how each key list is split across
// CTAs (flash-decoding), from the problem's sizes and the GPU's SM count. Plain C++ without
// CUDA, so it is built and unit-tested on every machine (tests/cpp/test_launch_plan.cpp);
// csrc/cuda/ops_cuda.cpp applies it.
#pragma once

#include <cstdint>

namespace mage::cuda {

// Keys per CTA tile of the tensor-core kernels (split sizes are multiples of it), and the query
// rows per CTA of the mma.sync attention kernel's two shapes (see TcShape).
constexpr int kKeyTile = 64;
constexpr int kRowsWide = 224;
constexpr int kRowsNarrow = 64;
// Narrow (one-warpgroup) sm_90a attention CTAs resident per SM (attention_wgmma.cuh).
constexpr int kNarrowWgmmaCtasPerSm = 2;
// Key lists of at most this many tiles count as short for the sparse step's CTA shape.
constexpr int64_t kShortKeyTiles = 16;

struct Splits {
  int num_splits;
  int keys_per_split;  // a multiple of kKeyTile
};

// Splits of a key list of at most `max_keys` keys so that the grid has at most `target_ctas`
// CTAs (one wave) where it can; every split holds at least `min_tiles` key tiles.
Splits plan_splits(int64_t max_keys, int64_t ctas_per_split, int64_t target_ctas, int min_tiles);

struct AttentionPlan {
  int rows_per_cta;  // kRowsWide / kRowsNarrow (mma.sync kernel) or 64 * wgmma_groups
  int wgmma_groups;  // 64-row warpgroups per CTA of the sm_90a kernel; 0: the mma.sync kernel
  Splits splits;
};

// The 16-bit attention kernels' plan for `rows` = G * B query rows per KV head, `units` =
// batch * Hkv, key lists of at most `max_keys` keys; `wgmma`: the sm_90a kernel is available.
AttentionPlan plan_attention(int rows, int64_t units, int64_t max_keys, bool sparse, int sm_count,
                             bool wgmma);

}  // namespace mage::cuda
