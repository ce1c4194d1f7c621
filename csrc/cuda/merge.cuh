// Merges the per-split partial results of a flash-decoding attention: each split holds its
// normalised output and log-sum-exp; the final row is their softmax-weighted sum.
#pragma once

#include <cmath>

#include "cuda/device_utils.cuh"

namespace mage::cuda {

constexpr int kMergeWarps = 8;

template <typename T, int D>
__global__ void __launch_bounds__(kMergeWarps * 32)
    merge_splits_kernel(const __grid_constant__ MergeArgs a) {
  constexpr int kPerLane = D / 32;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kMergeWarps + warp;
  if (row >= a.total_rows) return;
  float mx = -INFINITY;
  bool poisoned = false;
  for (int s = lane; s < a.num_splits; s += 32) {
    const float v = a.lse_part[s * static_cast<int64_t>(a.total_rows) + row];
    poisoned |= isnan(v);
    mx = fmaxf(mx, v);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  poisoned = __any_sync(0xffffffffu, poisoned);
  float acc[kPerLane] = {};
  float wsum = 0.f;
  for (int s = 0; s < a.num_splits; ++s) {
    const int64_t prow = s * static_cast<int64_t>(a.total_rows) + row;
    const float v = a.lse_part[prow];
    if (v == -INFINITY) continue;  // an empty split (past this sequence's keys)
    const float w = expf(v - mx);
    wsum += w;
    const float* o = a.o_part + prow * D;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) acc[e] += w * o[lane + 32 * e];
  }
  const float inv = poisoned ? NAN : 1.f / wsum;
  T* out = static_cast<T*>(a.out) + row * D;
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) out[lane + 32 * e] = from_float<T>(acc[e] * inv);
  if (lane == 0) a.lse[row] = poisoned ? NAN : mx + logf(wsum);
}

}  // namespace mage::cuda
