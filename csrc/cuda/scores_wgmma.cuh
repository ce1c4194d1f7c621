// Hopper (sm_90a) importance scores, the first step's second pass (see scores_kernel in
// attention_tc.cuh for the portable one): score[j] = mean over the G*B rows r of the KV head of
// exp(q_r . k_j * scale - lse_r).
//
// One CTA per (split of the cache, KV head, sequence): all G*B rows (<= kScoreWgRows) of Q and
// their lse in shared memory; a producer warp streams 64-key K tiles through a ring (TMA;
// cp.async for a split's partial last tile); each of the kScoreWg consumer warpgroups takes
// every kScoreWg-th tile and computes S^T = K Q^T for it
// (keys as the 64-row M side, query rows as N in chunks of 64), so a thread holds 2 keys x 16
// rows per chunk: the row sum is 16 adds in registers and 2 shuffles across the 4 lanes of a
// key, no cross-warp reduction, and a fixed summation order (deterministic).
#pragma once

#include <cmath>

#include "cuda/key_list.cuh"
#include "cuda/wgmma.cuh"

namespace mage::cuda {

constexpr int kScoreWg = 4;         // consumer warpgroups
constexpr int kScoreWgStages = 8;   // K tiles in flight
constexpr int kScoreWgRows = 256;   // rows per KV head this kernel takes (more: scores_kernel)

template <int D>
constexpr int scores_wgmma_smem_bytes() {
  return 1024 + (kScoreWgRows * D + kScoreWgStages * kKeyTile * D) * 2 + kScoreWgRows * 4;
}

template <typename T, int D>
__global__ void __launch_bounds__(kScoreWg * 128 + 32, 1)
    scores_wgmma_kernel(const __grid_constant__ ScoresArgs a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int kChunks = D / 8;
  constexpr int kThreads = kScoreWg * 128 + 32;
  constexpr int kTileBytes = kKeyTile * D * 2;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* s_q = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~static_cast<uintptr_t>(1023));
  unsigned char* s_k = s_q + kScoreWgRows * D * 2;
  float* s_lse = reinterpret_cast<float*>(s_k + kScoreWgStages * kTileBytes);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const ScoresSplit work(a, tid, kThreads);
  const int h = work.h, b = work.b, range_begin = work.range_begin, k_end = work.k_end;
  float* const scores = work.scores;
  if (range_begin >= k_end) return;

  __shared__ uint64_t full_bar[kScoreWgStages];
  __shared__ uint64_t empty_bar[kScoreWgStages];
  if (tid == 0) {
    for (int i = 0; i < kScoreWgStages; ++i) {
      mbar_init(&full_bar[i], 32);
      mbar_init(&empty_bar[i], 4);  // the 4 warps of the warpgroup that took the tile
    }
  }
  const int64_t head_row0 = (static_cast<int64_t>(b) * a.hq + h * a.group) * a.block;
  const T* q = static_cast<const T*>(a.q) + head_row0 * D;
  const int row_chunks = (a.rows + 63) / 64;
  for (int c = tid; c < row_chunks * 64 * kChunks; c += kThreads) {
    const int r = c / kChunks, ch = c % kChunks;
    const bool valid = r < a.rows;
    cp_async_16(s_q + sw128_offset(r, ch, kScoreWgRows), q + (valid ? r * D + ch * 8 : 0), valid);
  }
  for (int r = tid; r < row_chunks * 64; r += kThreads) {
    // Rows past the head's get +inf: exp2(s - inf) = 0.
    s_lse[r] = r < a.rows ? a.lse[head_row0 + r] * kLog2e : INFINITY;
  }
  cp_async_commit();
  cp_async_wait<0>();
  fence_proxy_async();
  __syncthreads();

  const T* k_cache = static_cast<const T*>(a.k_cache) + b * a.cache_stride_b + h * a.cache_stride_h;
  const int wg = __shfl_sync(0xffffffffu, tid / 128, 0);  // warp-uniform (see attention_wgmma)
  if (wg == kScoreWg) {  // the producer warp
    for (int it = 0, t = range_begin; t < k_end; ++it, t += kKeyTile) {
      const int buf = it % kScoreWgStages;
      if (it >= kScoreWgStages) mbar_wait(&empty_bar[buf], ((it / kScoreWgStages) - 1) & 1);
      unsigned char* dk = s_k + buf * kTileBytes;
      if (a.use_tma && t + kKeyTile <= k_end) {  // a whole tile of valid keys: TMA
        if (lane == 0) {
          mbar_arrive_expect_tx(&full_bar[buf], kTileBytes);
#pragma unroll
          for (int half = 0; half < D / 64; ++half) {
            tma_load_4d(dk + half * kKeyTile * 128, &a.k_map, half * 64, t, h, b, &full_bar[buf]);
          }
        } else {
          mbar_arrive(&full_bar[buf]);
        }
        continue;
      }
#pragma unroll
      for (int g = 0; g < 4; ++g) {
        const int r = (lane >> 1) + 16 * g;
        const bool valid = t + r < k_end;
        const T* src = k_cache + (valid ? static_cast<int64_t>(t + r) * D : 0);
#pragma unroll
        for (int j = 0; j < kChunks / 2; ++j) {
          const int ch = 2 * j + (lane & 1);
          cp_async_16(dk + sw128_offset(r, ch, kKeyTile), src + ch * 8, valid);
        }
      }
      mbar_arrive_on_copies(&full_bar[buf]);
    }
    return;
  }

  const int g = lane >> 2, tig = lane & 3;
  const float inv_rows = 1.f / static_cast<float>(a.rows);
  const int key_lo = (warp & 3) * 16 + g;  // this thread's keys in a tile: key_lo, key_lo + 8
  for (int it = wg, t = range_begin + wg * kKeyTile; t < k_end;
       it += kScoreWg, t += kScoreWg * kKeyTile) {
    const int buf = it % kScoreWgStages;
    mbar_wait(&full_bar[buf], (it / kScoreWgStages) & 1);
    fence_proxy_async();
    const unsigned char* kt = s_k + buf * kTileBytes;
    float sum[2] = {0.f, 0.f};
    for (int rc = 0; rc < row_chunks; ++rc) {
      float s[32];
#pragma unroll
      for (int i = 0; i < 32; ++i) s[i] = 0.f;
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) {
        const uint64_t da = wgmma_desc(kt + (ks >> 2) * kKeyTile * 128 + (ks & 3) * 32, 16, 1024);
        const uint64_t db = wgmma_desc(
            s_q + (ks >> 2) * kScoreWgRows * 128 + rc * 64 * 128 + (ks & 3) * 32, 16, 1024);
        WgmmaOps<T>::ss_n64(s, da, db, ks > 0);
      }
      wgmma_commit();
      wgmma_wait<0>();
      wgmma_fence_operands(s);
      // s[4 * nt + e]: key key_lo + 8 * (e >> 1), row rc * 64 + 8 * nt + 2 * tig + (e & 1).
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        const float2 lse = *reinterpret_cast<const float2*>(s_lse + rc * 64 + nt * 8 + tig * 2);
        sum[0] += fast_exp2(fmaf(s[4 * nt + 0], a.scale_log2, -lse.x)) +
                  fast_exp2(fmaf(s[4 * nt + 1], a.scale_log2, -lse.y));
        sum[1] += fast_exp2(fmaf(s[4 * nt + 2], a.scale_log2, -lse.x)) +
                  fast_exp2(fmaf(s[4 * nt + 3], a.scale_log2, -lse.y));
      }
    }
    __syncwarp();
    if (lane == 0) mbar_arrive(&empty_bar[buf]);  // K tile no longer read
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      sum[i] += __shfl_xor_sync(0xffffffffu, sum[i], 1);
      sum[i] += __shfl_xor_sync(0xffffffffu, sum[i], 2);
    }
    if (tig == 0) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int j = t + key_lo + 8 * i;
        if (j < k_end) scores[j] = sum[i] * inv_rows;
      }
    }
  }
#else
  __trap();  // built without sm_90a: the host never launches this kernel
#endif
}

}  // namespace mage::cuda
