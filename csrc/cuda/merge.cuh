// Merges the per-split partial results of a flash-decoding attention: each split holds its
// normalised output and log-sum-exp; the final row is their softmax-weighted sum. Two kernels:
// merge_few_splits_kernel (up to kFewSplits splits, e.g. batch 8-32 or the sparse step) and
// merge_splits_kernel (many splits: long caches at small batch).
//
// merge_splits_kernel: one CTA of kMergeWarps warps per row, each warp summing a contiguous
// quarter of the splits. The loop is latency-bound (a row may have 100+ splits): the weights of
// 32 splits are computed at once (one per lane) and broadcast, the partial rows are read 8
// splits at a time as 16/8-byte vectors with no data-dependent branch, so each lane keeps eight
// loads in flight and a row has 4 x 32 x 8 in flight (one warp per row kept a quarter of that:
// 17 us of a 66 us dense step at 32K under Nsight Compute). Every warp takes the max over all
// splits itself, so the warps' sums share one reference and add up in shared memory.
#pragma once

#include <cmath>

#include "cuda/device_utils.cuh"

namespace mage::cuda {

constexpr int kMergeWarps = 4;

template <int D>
struct MergeVec;  // the columns one lane owns
template <>
struct MergeVec<128> {
  using type = float4;
};
template <>
struct MergeVec<64> {
  using type = float2;
};

MAGE_DEVICE void fma_vec(float4& acc, float w, const float4& v) {
  acc.x += w * v.x; acc.y += w * v.y; acc.z += w * v.z; acc.w += w * v.w;
}
MAGE_DEVICE void fma_vec(float2& acc, float w, const float2& v) {
  acc.x += w * v.x; acc.y += w * v.y;
}

// A lane's kPer (2 or 4) merged columns, scaled by inv, as one 4- or 8-byte store of 16-bit
// values (fp32: per element).
template <typename T, int kPer>
MAGE_DEVICE void store_lane_columns(T* out, const float* acc, float inv) {
  if constexpr (sizeof(T) == 2) {
    uint32_t packed[kPer / 2];
#pragma unroll
    for (int e = 0; e < kPer / 2; ++e) packed[e] = pack2<T>(acc[2 * e] * inv, acc[2 * e + 1] * inv);
    if constexpr (kPer == 4) {
      *reinterpret_cast<uint2*>(out) = make_uint2(packed[0], packed[1]);
    } else {
      *reinterpret_cast<uint32_t*>(out) = packed[0];
    }
  } else {
#pragma unroll
    for (int e = 0; e < kPer; ++e) out[e] = from_float<T>(acc[e] * inv);
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kMergeWarps * 32)
    merge_splits_kernel(const __grid_constant__ MergeArgs a) {
  using Vec = typename MergeVec<D>::type;
  constexpr int kPer = D / 32;  // floats per lane
  constexpr int kUnroll = 8;
  __shared__ Vec s_acc[kMergeWarps][32];
  __shared__ float s_wsum[kMergeWarps];
  pdl_wait();  // the partials come from the attention kernel just before (PDL launch)
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t row = blockIdx.x;
  const int64_t rows = a.total_rows;
  float mx = -INFINITY;
  bool poisoned = false;
  for (int s = lane; s < a.num_splits; s += 32) {
    const float v = a.lse_part[s * rows + row];
    poisoned |= isnan(v);
    mx = fmaxf(mx, v);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  poisoned = __any_sync(0xffffffffu, poisoned);

  const int per_warp = (a.num_splits + kMergeWarps - 1) / kMergeWarps;
  const int lo = warp * per_warp, hi = min(a.num_splits, lo + per_warp);
  Vec acc{};
  float wsum = 0.f;
  for (int base = lo; base < hi; base += 32) {
    const int s = base + lane;
    // An empty split (past this sequence's keys) has lse -inf: weight 0, its row unread.
    const float v = s < hi ? a.lse_part[s * rows + row] : -INFINITY;
    const float w = v == -INFINITY ? 0.f : expf(v - mx);
    wsum += w;
    const int n = min(32, hi - base);
    for (int j0 = 0; j0 < n; j0 += kUnroll) {
      Vec part[kUnroll];
      float wj[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        wj[u] = __shfl_sync(0xffffffffu, w, (j0 + u) & 31);
        const int sj = min(base + j0 + u, hi - 1);
        part[u] = reinterpret_cast<const Vec*>(a.o_part + (sj * rows + row) * D)[lane];
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        // Splits past n, or empty ones, may hold anything (even NaN): select, don't multiply.
        if (j0 + u < n && wj[u] != 0.f) fma_vec(acc, wj[u], part[u]);
      }
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) wsum += __shfl_xor_sync(0xffffffffu, wsum, o);
  s_acc[warp][lane] = acc;
  if (lane == 0) s_wsum[warp] = wsum;
  __syncthreads();
  if (warp != 0) return;
  wsum = 0.f;
  acc = Vec{};
#pragma unroll
  for (int w = 0; w < kMergeWarps; ++w) {  // fixed order: deterministic
    wsum += s_wsum[w];
    fma_vec(acc, 1.f, s_acc[w][lane]);
  }
  const float inv = poisoned ? NAN : 1.f / wsum;
  store_lane_columns<T, kPer>(static_cast<T*>(a.out) + row * D + lane * kPer,
                              reinterpret_cast<const float*>(&acc), inv);
  if (lane == 0) a.lse[row] = poisoned ? NAN : mx + logf(wsum);
}

// Up to this many splits a row is one warp's work: every partial of the row is requested at
// once (kFewSplits vectors per lane), together with the split weights, so a row costs one memory
// latency. One CTA per row (merge_splits_kernel) measured 21.4 us for 2 splits x 12288 rows
// (the 1.5B sparse step at batch 32; the attention itself took 16), this kernel 10.7: 12288
// CTAs each a chain of dependent loads, three of four warps idle.
constexpr int kFewSplits = 16;
constexpr int kFewSplitRowsPerCta = 8;  // one warp per row

template <typename T, int D>
__global__ void __launch_bounds__(kFewSplitRowsPerCta * 32)
    merge_few_splits_kernel(const __grid_constant__ MergeArgs a) {
  using Vec = typename MergeVec<D>::type;
  constexpr int kPer = D / 32;  // floats per lane
  pdl_wait();  // the partials come from the attention kernel just before (PDL launch)
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kFewSplitRowsPerCta + (threadIdx.x >> 5);
  const int64_t rows = a.total_rows;
  if (row >= rows) return;
  const int n = a.num_splits;  // <= kFewSplits (host)
  const float v = lane < n ? a.lse_part[lane * rows + row] : -INFINITY;
  Vec part[kFewSplits];
#pragma unroll
  for (int s = 0; s < kFewSplits; ++s) {
    if (s < n) part[s] = reinterpret_cast<const Vec*>(a.o_part + (s * rows + row) * D)[lane];
  }
  float mx = v;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  const bool poisoned = __any_sync(0xffffffffu, isnan(v));
  // An empty split (past this sequence's keys) has lse -inf: weight 0.
  const float w = v == -INFINITY ? 0.f : expf(v - mx);
  float wsum = w;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) wsum += __shfl_xor_sync(0xffffffffu, wsum, o);
  Vec acc{};
#pragma unroll
  for (int s = 0; s < kFewSplits; ++s) {
    const float ws = __shfl_sync(0xffffffffu, w, s);
    // An empty split's row may hold anything (even NaN): select, don't multiply.
    if (s < n && ws != 0.f) fma_vec(acc, ws, part[s]);
  }
  const float inv = poisoned ? NAN : 1.f / wsum;
  store_lane_columns<T, kPer>(static_cast<T*>(a.out) + row * D + lane * kPer,
                              reinterpret_cast<const float*>(&acc), inv);
  if (lane == 0) a.lse[row] = poisoned ? NAN : mx + logf(wsum);
}

}  // namespace mage::cuda
