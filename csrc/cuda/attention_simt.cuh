// fp32 attention (no tensor cores: their fp32 mode, tf32, would round the inputs to 10-bit
// mantissas). One warp per query row walks the key list with an online softmax; a second kernel
// computes the importance scores with one warp per cache key. Correct and simple; the fast
// paths are the fp16/bf16 tensor-core kernels.
#pragma once

#include <cmath>

#include "cuda/key_list.cuh"

namespace mage::cuda {

constexpr int kSimtWarps = 4;

// Keys are taken 32 at a time, one per lane: each lane computes its key's logit, the chunk's
// max and sum are warp reductions (a tree, so the running sum gets one addition per 32 keys,
// which keeps fp32 rounding of long caches small), and lane d accumulates output dims d + 32e.
template <int D, bool kSparse>
__global__ void __launch_bounds__(kSimtWarps * 32)
    simt_attention_kernel(const __grid_constant__ AttentionArgs a) {
  constexpr int kPerLane = D / 32;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row = blockIdx.x * kSimtWarps + warp;
  const int h = blockIdx.y, b = blockIdx.z;
  if (row >= a.rows) return;
  const KeyList<float, kSparse> keys(a, b, h);
  const int64_t grow = (static_cast<int64_t>(b) * a.hq + h * a.group) * a.block + row;
  const float* q = static_cast<const float*>(a.q) + grow * D;
  float acc[kPerLane] = {};
  float m = -INFINITY, l = 0.f;
  bool bad = false;
  for (int base = 0; base < keys.n_total; base += 32) {
    const int v = base + lane;
    float s = -INFINITY;
    const float* my_v = nullptr;
    if (v < keys.n_total) {
      bool in_block;
      const int64_t off = keys.row_offset(v, in_block, bad);
      const float* k = (in_block ? keys.k_block : keys.k_cache) + off;
      my_v = (in_block ? keys.v_block : keys.v_cache) + off;
      float dot = 0.f;
#pragma unroll 8
      for (int c = 0; c < D; ++c) dot += q[c] * k[c];
      s = dot * a.scale_log2;
    }
    float chunk_max = s;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) chunk_max = fmaxf(chunk_max, __shfl_xor_sync(0xffffffffu, chunk_max, o));
    const float m_new = fmaxf(m, chunk_max);
    const float alpha = exp2f(m - m_new);
    const float p = exp2f(s - m_new);
    l = l * alpha + warp_sum(p);
    m = m_new;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) acc[e] *= alpha;
    const int n = min(32, keys.n_total - base);
    for (int j = 0; j < n; ++j) {
      const float pj = __shfl_sync(0xffffffffu, p, j);
      const float* vj = reinterpret_cast<const float*>(
          __shfl_sync(0xffffffffu, reinterpret_cast<uintptr_t>(my_v), j));
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) acc[e] += pj * vj[lane + 32 * e];
    }
  }
  bad = __any_sync(0xffffffffu, bad);
  if (lane == 0) report_key_list_errors<kSparse>(a, b, h, blockIdx.x == 0 && warp == 0, bad);
  float* out = static_cast<float*>(a.out) + grow * D;
  const float inv = bad ? NAN : 1.f / l;
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) out[lane + 32 * e] = acc[e] * inv;
  if (lane == 0) a.lse[grow] = bad ? NAN : (m + log2f(l)) * kLn2;
}

template <int D>
__global__ void __launch_bounds__(kSimtWarps * 32)
    simt_scores_kernel(const __grid_constant__ ScoresArgs a) {
  constexpr int kPerLane = D / 32;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int j = blockIdx.x * kSimtWarps + warp;
  const int h = blockIdx.y, b = blockIdx.z;
  if (j >= a.capacity) return;
  float* score = a.scores + (static_cast<int64_t>(b) * a.hkv + h) * a.capacity + j;
  if (j >= min(max(a.cache_lens[b], 0), a.capacity)) {
    if (lane == 0) *score = 0.f;
    return;
  }
  const float* k = static_cast<const float*>(a.k_cache) + b * a.cache_stride_b +
                   h * a.cache_stride_h + static_cast<int64_t>(j) * D;
  float kv[kPerLane];
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) kv[e] = k[lane + 32 * e] * a.scale_log2;
  const int64_t head_row0 = (static_cast<int64_t>(b) * a.hq + h * a.group) * a.block;
  float total = 0.f;
  for (int r = 0; r < a.rows; ++r) {
    const float* q = static_cast<const float*>(a.q) + (head_row0 + r) * D;
    float s = 0.f;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) s += kv[e] * q[lane + 32 * e];
    s = warp_sum(s);
    total += exp2f(s - a.lse[head_row0 + r] * kLog2e);
  }
  if (lane == 0) *score = total / static_cast<float>(a.rows);
}

}  // namespace mage::cuda
