// Tensor-core (mma.sync m16n8k16, fp16/bf16 in, fp32 accumulate) attention kernels.
//
// attention_tile_kernel: one CTA = up to 224 query rows (7 compute warps x 32; or 64 rows,
//   4 x 16, see TcShape) of one (sequence, KV head) against one split of its key list. A
//   producer warp streams the keys through shared memory in tiles of 64 (cp.async, kStages
//   tiles in flight, mbarrier handshakes); the compute warps run an online softmax in registers
//   (FlashAttention-2 style). The G*B rows of a KV head are packed (G*B <= 224 for the usual
//   shapes), so each K/V tile is read from memory once for the whole GQA group.
//   Grid: (row tiles, splits, batch * Hkv).
// scores_kernel: second pass of the first step. Recomputes Q K^T for the cache keys and sums
//   exp(logit - lse) over the G*B rows of each key (deterministic order: no atomics).
#pragma once

#include <cmath>

#include "cuda/attention_parts.cuh"

namespace mage::cuda {

constexpr int kStages = 4;  // K/V tiles in flight: hides HBM latency at one CTA per SM

// CTA shapes (host picks one per call, AttentionArgs::rows_per_cta): kConsumers warps of kMT
// 16-row m-tiles each compute, one more warp loads K/V tiles (warp specialisation: the compute
// warps wait on per-stage mbarriers, not on CTA barriers, so they drift apart and one warp's
// softmax overlaps another's MMAs). Wide: 7 x 32 rows = 224 (each K/V fragment read from
// shared memory feeds 4 MMAs; for long key lists). Narrow: 4 x 16 rows = 64 (when the key
// tiles are too few to fill the GPU with wide CTAs, e.g. the sparse step at batch 1: 4x the
// CTAs, each with a shorter critical path).
template <int kConsumers, int kMT>
struct TcShape {
  static constexpr int kConsumerWarps = kConsumers;
  static constexpr int kWarpsPerCta = kConsumers + 1;  // + the producer
  static constexpr int kMTiles = kMT;
  static constexpr int kRows = kConsumers * kMT * 16;
};
using TcWide = TcShape<7, 2>;
using TcNarrow = TcShape<4, 1>;
static_assert(TcWide::kRows == kRowsWide && TcNarrow::kRows == kRowsNarrow,
              "host launch plan and kernel disagree");

template <int D, int kRows>
constexpr int attention_smem_bytes() {
  return (kRows * D + 2 * kStages * kKeyTile * D) * 2;  // Q + kStages of K and V (16-bit)
}

// Loads the A fragments (16 rows x D) of one m-tile from a swizzled smem tile.
template <typename T, int D>
MAGE_DEVICE void load_q_fragments(uint32_t (&qf)[D / 16][4], const T* s_q, int row_base,
                                  int lane) {
  const int row = row_base + (lane & 15);
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    ldmatrix_x4(qf[ks], s_q + swizzled<D>(row, ks * 2 + (lane >> 4)));
  }
}

// s (16 rows x 64 keys, fp32) = Q fragments x K tile^T.
template <typename T, int D>
MAGE_DEVICE void qk_tile(float (&s)[8][4], const uint32_t (&qf)[D / 16][4], const T* s_k,
                         int lane) {
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
#pragma unroll
    for (int np = 0; np < 4; ++np) {
      const int key = np * 16 + (lane & 7) + ((lane >> 4) << 3);
      uint32_t r[4];
      ldmatrix_x4(r, s_k + swizzled<D>(key, ks * 2 + ((lane >> 3) & 1)));
      mma_16816<T>(s[2 * np], qf[ks], r[0], r[1]);
      mma_16816<T>(s[2 * np + 1], qf[ks], r[2], r[3]);
    }
  }
}

// s[mt] (kMT m-tiles of 16 rows x 64 keys) = Q rows x K tile^T; Q fragments are re-read from
// shared memory per k-step (keeping them in registers for the whole loop would spill).
template <typename T, int D, int kMT>
MAGE_DEVICE void qk_tile_m(float (&s)[kMT][8][4], const T* s_q, int row_base, const T* s_k,
                           int lane) {
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.f;
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    uint32_t qf[kMT][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
      const int row = row_base + mt * 16 + (lane & 15);
      ldmatrix_x4(qf[mt], s_q + swizzled<D>(row, ks * 2 + (lane >> 4)));
    }
#pragma unroll
    for (int np = 0; np < 4; ++np) {
      const int key = np * 16 + (lane & 7) + ((lane >> 4) << 3);
      uint32_t r[4];
      ldmatrix_x4(r, s_k + swizzled<D>(key, ks * 2 + ((lane >> 3) & 1)));
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        mma_16816<T>(s[mt][2 * np], qf[mt], r[0], r[1]);
        mma_16816<T>(s[mt][2 * np + 1], qf[mt], r[2], r[3]);
      }
    }
  }
}

template <typename T, int D, bool kSparse, typename Shape>
__global__ void __launch_bounds__(Shape::kWarpsPerCta * 32, 1)
    attention_tile_kernel(const __grid_constant__ AttentionArgs a) {
  constexpr int kThreads = Shape::kWarpsPerCta * 32;
  constexpr int kMT = Shape::kMTiles;
  constexpr int kTcRows = Shape::kRows;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* s_q = reinterpret_cast<T*>(smem_raw);
  T* s_k = s_q + kTcRows * D;
  T* s_v = s_k + kStages * kKeyTile * D;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const CtaWork<T, kSparse> work(a, kTcRows);
  const auto& keys = work.keys;
  const int split = work.split, row0 = work.row0, k_begin = work.k_begin, k_end = work.k_end;
  const int64_t head_row0 = work.head_row0;

  // Q, the key count (in CtaWork) and the producer's first positions are requested together,
  // before anything waits for the count: one memory latency instead of a chain of three (what
  // the sparse step at batch 1 mostly consists of).
  copy_q_rows<T, D>(a, head_row0, row0, kTcRows, s_q,
                    [](int r, int ch) { return swizzled<D>(r, ch); }, tid, kThreads);
  const bool producer = warp == Shape::kConsumerWarps;
  int pos[4];
  if (producer) load_tile_positions(keys, k_begin, lane, pos);

  if (k_begin >= k_end) {  // this sequence's keys end before this split (num_splits > 1)
    mark_empty_split(a, split, head_row0, row0, kTcRows, tid, kThreads);
    return;
  }

  __shared__ uint64_t full_bar[kStages];   // tile landed (32 producer lanes arrive)
  __shared__ uint64_t empty_bar[kStages];  // tile consumed (each compute warp arrives)
  __shared__ int s_bad;
  const int warp_row0 = warp * kMT * 16;
  const int n_compute = min(Shape::kConsumerWarps, (a.rows - row0 + kMT * 16 - 1) / (kMT * 16));
  if (tid == 0) {
    init_ring(full_bar, empty_bar, n_compute);
    s_bad = 0;
  }
  cp_async_wait<0>();
  __syncthreads();  // Q in shared memory, barriers initialised

  if (producer) {  // K/V tiles into a kStages ring
    if (produce_kv_tiles<T, D, kSparse, kStages, /*kAhead=*/1>(
            keys, k_begin, k_end, lane, pos, s_k, s_v, kKeyTile * D,
            [](int r, int ch) { return swizzled<D>(r, ch); }, full_bar, empty_bar)) {
      s_bad = 1;
    }
  }

  // Per thread: rows g and g + 8 of each of the warp's m-tiles (index 2 * mt + i).
  float o[kMT][D / 8][4];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int i = 0; i < D / 8; ++i) o[mt][i][0] = o[mt][i][1] = o[mt][i][2] = o[mt][i][3] = 0.f;
  float m[2 * kMT], l[2 * kMT];  // running max (log2 units), this thread's share of the sums
#pragma unroll
  for (int i = 0; i < 2 * kMT; ++i) m[i] = -INFINITY, l[i] = 0.f;
  const int g = lane >> 2, tig = lane & 3;
  const bool active = warp < n_compute;  // compute warps past the last row only wait

  for (int it = 0, t = k_begin; active && t < k_end; ++it, t += kKeyTile) {
    const int buf = it % kStages;
    mbar_wait(&full_bar[buf], (it / kStages) & 1);
    {
      float s[kMT][8][4];
      qk_tile_m<T, D, kMT>(s, s_q, warp_row0, s_k + buf * kKeyTile * D, lane);
      float mx[2 * kMT];
#pragma unroll
      for (int i = 0; i < 2 * kMT; ++i) mx[i] = m[i];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int v = t + nt * 8 + tig * 2 + (e & 1);
            s[mt][nt][e] = v < k_end ? s[mt][nt][e] * a.scale_log2 : -INFINITY;
            mx[2 * mt + (e >> 1)] = fmaxf(mx[2 * mt + (e >> 1)], s[mt][nt][e]);
          }
      float alpha[2 * kMT];
#pragma unroll
      for (int i = 0; i < 2 * kMT; ++i) {
        mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
        mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
        alpha[i] = exp2f(m[i] - mx[i]);  // m = -inf on the first tile: alpha = 0
        m[i] = mx[i];
        l[i] *= alpha[i];
      }
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            s[mt][nt][e] = exp2f(s[mt][nt][e] - mx[2 * mt + (e >> 1)]);
            l[2 * mt + (e >> 1)] += s[mt][nt][e];
          }
#pragma unroll
        for (int i = 0; i < D / 8; ++i) {
          o[mt][i][0] *= alpha[2 * mt];
          o[mt][i][1] *= alpha[2 * mt];
          o[mt][i][2] *= alpha[2 * mt + 1];
          o[mt][i][3] *= alpha[2 * mt + 1];
        }
      }
      // O += P V: the accumulator layout of two adjacent key n-tiles is the A layout of one
      // 16-key k-step.
      const T* vt = s_v + buf * kKeyTile * D;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        uint32_t pa[kMT][4];
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          pa[mt][0] = pack2<T>(s[mt][2 * j][0], s[mt][2 * j][1]);
          pa[mt][1] = pack2<T>(s[mt][2 * j][2], s[mt][2 * j][3]);
          pa[mt][2] = pack2<T>(s[mt][2 * j + 1][0], s[mt][2 * j + 1][1]);
          pa[mt][3] = pack2<T>(s[mt][2 * j + 1][2], s[mt][2 * j + 1][3]);
        }
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          const int key = j * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
          uint32_t r[4];
          ldmatrix_x4_trans(r, vt + swizzled<D>(key, dp * 2 + (lane >> 4)));
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt) {
            mma_16816<T>(o[mt][2 * dp], pa[mt], r[0], r[1]);
            mma_16816<T>(o[mt][2 * dp + 1], pa[mt], r[2], r[3]);
          }
        }
      }
    }
    __syncwarp();
    if (lane == 0) mbar_arrive(&empty_bar[buf]);  // this warp is done with the tile
  }

  const bool poisoned = finish_key_loop(s_bad);
  if (tid == 0) {
    report_key_list_errors<kSparse>(a, work.b, work.h, split == 0 && row0 == 0, poisoned);
  }
  if (!active) return;
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      store_rows<T, D>(a, split, head_row0, row0 + warp_row0 + mt * 16 + g + i * 8, o[mt], i,
                       m[2 * mt + i], l[2 * mt + i], poisoned, tig);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Scores: one CTA per (split of the cache, KV head, sequence); all G*B rows of the head, in
// groups of up to kScoreRows rows held in shared memory.

constexpr int kScoreWarps = 8;  // (12, one m-tile each for the 1.5B shape, measured slower: 24.5 vs 21.5 us at 32K)
constexpr int kScoreRows = 256;

template <int D>
constexpr int scores_smem_bytes() {
  return (kScoreRows * D + kStages * kKeyTile * D) * 2 + kScoreRows * 4 +
         kScoreWarps * kKeyTile * 4;
}

template <typename T, int D>
__global__ void __launch_bounds__(kScoreWarps * 32, 1)
    scores_kernel(const __grid_constant__ ScoresArgs a) {
  constexpr int kChunks = D / 8;
  constexpr int kThreads = kScoreWarps * 32;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* s_q = reinterpret_cast<T*>(smem_raw);
  T* s_k = s_q + kScoreRows * D;
  float* s_lse = reinterpret_cast<float*>(s_k + kStages * kKeyTile * D);
  float* s_red = s_lse + kScoreRows;  // [warps][64] per-warp column sums

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const ScoresSplit work(a, tid, kThreads);
  const int h = work.h, b = work.b, range_begin = work.range_begin, k_end = work.k_end;
  float* const scores = work.scores;
  if (range_begin >= k_end) return;

  const T* k_cache = static_cast<const T*>(a.k_cache) + b * a.cache_stride_b + h * a.cache_stride_h;
  const int64_t head_row0 = (static_cast<int64_t>(b) * a.hq + h * a.group) * a.block;
  const T* q = static_cast<const T*>(a.q) + head_row0 * D;
  const float inv_rows = 1.f / static_cast<float>(a.rows);
  const int g = lane >> 2, tig = lane & 3;

  auto load_k = [&](int start, int buf) {
    T* dst = s_k + buf * kKeyTile * D;
    for (int c = tid; c < kKeyTile * kChunks; c += kThreads) {
      const int r = c / kChunks, ch = c % kChunks;
      const bool valid = start + r < k_end;
      cp_async_16(dst + swizzled<D>(r, ch),
                  k_cache + (valid ? static_cast<int64_t>(start + r) * D + ch * 8 : 0), valid);
    }
  };

  for (int rg0 = 0; rg0 < a.rows; rg0 += kScoreRows) {
    const int nrows = min(kScoreRows, a.rows - rg0);
    const int mtiles = (nrows + 15) / 16;
    __syncthreads();  // the previous row group is done with s_q / s_lse
    for (int c = tid; c < kScoreRows * kChunks; c += kThreads) {
      const int r = c / kChunks, ch = c % kChunks;
      const bool valid = r < nrows;
      cp_async_16(s_q + swizzled<D>(r, ch), q + (valid ? (rg0 + r) * D + ch * 8 : 0), valid);
    }
    for (int r = tid; r < kScoreRows; r += kThreads) {
      // Rows past the group get +inf: exp2(s - inf) = 0.
      s_lse[r] = r < nrows ? a.lse[head_row0 + rg0 + r] * kLog2e : INFINITY;
    }
#pragma unroll
    for (int i = 0; i < kStages - 1; ++i) {
      if (range_begin + i * kKeyTile < k_end) load_k(range_begin + i * kKeyTile, i);
      cp_async_commit();
    }
    for (int it = 0, t = range_begin; t < k_end; ++it, t += kKeyTile) {
      const int buf = it % kStages;
      const int next = t + (kStages - 1) * kKeyTile;
      if (next < k_end) load_k(next, (it + kStages - 1) % kStages);
      cp_async_commit();
      cp_async_wait<kStages - 1>();
      __syncthreads();
      float colsum[8][2];
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) colsum[nt][0] = colsum[nt][1] = 0.f;
      for (int mt = warp; mt < mtiles; mt += kScoreWarps) {
        uint32_t qf[D / 16][4];
        load_q_fragments<T, D>(qf, s_q, mt * 16, lane);
        float s[8][4];
        qk_tile<T, D>(s, qf, s_k + buf * kKeyTile * D, lane);
        const float lse_lo = s_lse[mt * 16 + g], lse_hi = s_lse[mt * 16 + g + 8];
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
          colsum[nt][0] += exp2f(s[nt][0] * a.scale_log2 - lse_lo) +
                           exp2f(s[nt][2] * a.scale_log2 - lse_hi);
          colsum[nt][1] += exp2f(s[nt][1] * a.scale_log2 - lse_lo) +
                           exp2f(s[nt][3] * a.scale_log2 - lse_hi);
        }
      }
      // Sum over the 8 row groups (g) of the warp: lanes with equal tig.
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float v = colsum[nt][e];
          v += __shfl_xor_sync(0xffffffffu, v, 4);
          v += __shfl_xor_sync(0xffffffffu, v, 8);
          v += __shfl_xor_sync(0xffffffffu, v, 16);
          if (g == 0) s_red[warp * kKeyTile + nt * 8 + tig * 2 + e] = v;
        }
      }
      __syncthreads();
      if (tid < kKeyTile && t + tid < k_end) {
        float v = 0.f;
#pragma unroll
        for (int w = 0; w < kScoreWarps; ++w) v += s_red[w * kKeyTile + tid];
        if (rg0 > 0) v += scores[t + tid];  // earlier row groups (same CTA: ordered)
        scores[t + tid] = (rg0 + kScoreRows >= a.rows) ? v * inv_rows : v;
      }
      __syncthreads();
    }
  }
}

}  // namespace mage::cuda
