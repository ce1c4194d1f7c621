// Pieces shared by the two tensor-core attention kernels (attention_tc.cuh: mma.sync,
// attention_wgmma.cuh: sm_90a wgmma): the empty-split rows, the producer warp's K/V tile copy,
// and the per-row epilogue. Both kernels keep each thread's output rows in the mma C-fragment
// layout: frag[dt][e] is row g + 8 * (e >> 1), column 8 * dt + 2 * tig + (e & 1) of a 16-row tile.
#pragma once

#include <cmath>

#include "cuda/key_list.cuh"

namespace mage::cuda {

// What one CTA of grid (row tiles, splits, batch * Hkv) works on: rows row0 .. row0 + cta_rows
// of KV head h of sequence b (head_row0: the head's first row in [batch * Hq * B]) against keys
// [k_begin, k_end) of its key list (empty when the list ends before this split).
template <typename T, bool kSparse>
struct CtaWork {
  int b, h, split, row0;
  KeyList<T, kSparse> keys;
  int k_begin, k_end;
  int64_t head_row0;

  MAGE_DEVICE CtaWork(const AttentionArgs& a, int cta_rows)
      : b(blockIdx.z / a.hkv), h(blockIdx.z % a.hkv), split(blockIdx.y),
        row0(blockIdx.x * cta_rows), keys(a, b, h), k_begin(split * a.keys_per_split),
        k_end(min(keys.n_total, k_begin + a.keys_per_split)),
        head_row0((static_cast<int64_t>(b) * a.hq + h * a.group) * a.block) {}
};

// The producer / consumer ring's barriers: `full` counts the producer warps' lanes (their
// copies landing), `empty` one arrival per consumer warp.
template <int kStages>
MAGE_DEVICE void init_ring(uint64_t (&full)[kStages], uint64_t (&empty)[kStages], int consumers,
                           int producer_lanes = 32) {
  for (int i = 0; i < kStages; ++i) {
    mbar_init(&full[i], producer_lanes);
    mbar_init(&empty[i], consumers);
  }
}

// Issues the cp.async copies of this CTA's Q rows (row0 .. row0 + cta_rows of the head's rows;
// rows past a.rows zero-filled) into s_q at element offsets offset(row, 16-byte chunk), and
// commits them. Needs no key count, so it is issued before that arrives.
template <typename T, int D, typename Offset>
MAGE_DEVICE void copy_q_rows(const AttentionArgs& a, int64_t head_row0, int row0, int cta_rows,
                             T* s_q, Offset offset, int tid, int n_threads) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  const T* q = static_cast<const T*>(a.q) + head_row0 * D;
  for (int c = tid; c < cta_rows * kChunks; c += n_threads) {
    const int r = c / kChunks, ch = c % kChunks;
    const bool valid = row0 + r < a.rows;
    cp_async_16(s_q + offset(r, ch), q + (valid ? (row0 + r) * D + ch * 8 : 0), valid);
  }
  cp_async_commit();
}

// A split that starts past this sequence's keys (num_splits > 1): its rows get partial lse
// -inf, weight 0 in the merge. Waits for the CTA's Q copies first (they land in shared memory
// this CTA owns until it exits).
MAGE_DEVICE void mark_empty_split(const AttentionArgs& a, int split, int64_t head_row0, int row0,
                                  int cta_rows, int tid, int n_threads) {
  cp_async_wait<0>();
  const int64_t total_rows = static_cast<int64_t>(a.batch) * a.hq * a.block;
  for (int r = tid; r < cta_rows; r += n_threads) {
    if (row0 + r < a.rows) a.lse_part[split * total_rows + head_row0 + row0 + r] = -INFINITY;
  }
}

// A tile's 64 rows as four 16-row groups; with kWarps producer warps, warp pw (0 .. kWarps-1)
// copies groups pw, pw + kWarps, ... (kGroups of them), lane pair (2i, 2i + 1) row i of each.
template <int kWarps>
constexpr int producer_groups() {
  static_assert(kWarps == 1 || kWarps == 2 || kWarps == 4, "4 row groups per tile");
  return 4 / kWarps;
}

// This producer warp's rows of key-list tile t (see producer_groups): loads their positions
// (the selected indices); the first tile's before the key count is known.
template <typename T, bool kSparse, int kWarps = 1>
MAGE_DEVICE void load_tile_positions(const KeyList<T, kSparse>& keys, int t, int lane,
                                     int (&pos)[4], int pw = 0) {
#pragma unroll
  for (int j = 0; j < producer_groups<kWarps>(); ++j) {
    pos[j] = keys.load_position(t + (lane >> 1) + 16 * (pw + kWarps * j));
  }
}

// A producer warp's share of key-list rows t .. t + 63 (kKeyTile; its row groups as in
// producer_groups), at positions `pos` from load_tile_positions, into the K and V tiles at
// element offsets offset(row, 16-byte chunk). Lane pair (2i, 2i + 1) copies row i of each
// group, the even / odd chunks: each cp.async instruction moves 16 rows x 32 contiguous bytes
// (whole sectors). Rows past k_end are zero-filled (P = 0 there, and 0 * V must stay finite).
template <typename T, int D, bool kSparse, int kWarps = 1, typename Offset>
MAGE_DEVICE void copy_kv_tile(const KeyList<T, kSparse>& keys, int t, int k_end, int lane,
                              const int (&pos)[4], T* dk, T* dv, Offset offset, bool& bad,
                              int pw = 0) {
  static_assert(kKeyTile == 64, "the lane mapping covers 64-row tiles");
  constexpr int kChunks = D / 8;
  constexpr int kGroups = producer_groups<kWarps>();
  const T* ksrc[kGroups];
  const T* vsrc[kGroups];
  bool valid[kGroups];
#pragma unroll
  for (int g = 0; g < kGroups; ++g) {
    const int v = t + (lane >> 1) + 16 * (pw + kWarps * g);
    valid[g] = v < k_end;
    bool in_block = true;
    const int64_t off = valid[g] ? keys.row_offset(v, pos[g], in_block, bad) : 0;
    ksrc[g] = (in_block ? keys.k_block : keys.k_cache) + off;
    vsrc[g] = (in_block ? keys.v_block : keys.v_cache) + off;
  }
#pragma unroll
  for (int g = 0; g < kGroups; ++g) {
    const int r = (lane >> 1) + 16 * (pw + kWarps * g);
#pragma unroll
    for (int j = 0; j < kChunks / 2; ++j) {
      const int ch = 2 * j + (lane & 1);
      cp_async_16(dk + offset(r, ch), ksrc[g] + ch * 8, valid[g]);
      cp_async_16(dv + offset(r, ch), vsrc[g] + ch * 8, valid[g]);
    }
  }
}

// The dense cache through TMA (tma_maps.h; the warpgroup kernel when a.use_tma): the K / V
// descriptors in kernel parameter space (null: no TMA) and this CTA's (sequence, KV head).
struct TmaCache {
  const CUtensorMap* k_map = nullptr;
  const CUtensorMap* v_map = nullptr;
  int b = 0, h = 0;
};

// A producer warp's loop: key-list tiles k_begin, k_begin + 64, ... < k_end into a kStages
// ring of K / V tiles (tile_elems elements apart from s_k / s_v; element offsets offset(row,
// 16-byte chunk)), `full` arrived on by each tile's copies, `empty` waited on before a stage is
// reused. first_pos: tile 0's positions (load_tile_positions, issued in the prologue). Returns
// whether a selected index was out of range. With `tma` set (dense only), a tile wholly inside the
// cache's valid prefix is loaded by lane 0 as D/64 boxes each of K and V (the other lanes just
// arrive); the rest (the block's keys, the tile across the cache's end, whose rows past k_end
// must be zeros) keep cp.async.
//
// kAhead: tiles whose positions are in flight (the loads of tile t + kAhead are issued with
// tile t's copies). With 1, a multi-tile sparse split of the warpgroup kernel waited a memory
// latency per tile on its index loads (Nsight Compute, sparse step at batch 32: the top stall,
// 36%); 4 made those steps 5% faster (H200, median) but the 224-row mma.sync CTAs (7B, batch 8)
// 7-9% slower, so that kernel keeps 1.
//
// kWarps producer warps (this one is pw) share each tile's rows (see producer_groups): one warp
// issuing a whole gathered tile's cp.async was the sparse step's bound at batch 32 (its loads
// alone took 43 of the 50 us, SDAR, H200).
template <typename T, int D, bool kSparse, int kStages, int kAhead, int kWarps = 1,
          typename Offset>
MAGE_DEVICE bool produce_kv_tiles(const KeyList<T, kSparse>& keys, int k_begin, int k_end,
                                  int lane, const int (&first_pos)[4], T* s_k, T* s_v,
                                  int tile_elems, Offset offset, uint64_t* full_bar,
                                  uint64_t* empty_bar, TmaCache tma = {}, int pw = 0) {
  int pos[kAhead][4];  // indexed by compile-time constants only (fully unrolled)
#pragma unroll
  for (int g = 0; g < 4; ++g) pos[0][g] = first_pos[g];
#pragma unroll
  for (int j = 1; j < kAhead; ++j) {
    const int t = k_begin + j * kKeyTile;
    if (t < k_end) load_tile_positions<T, kSparse, kWarps>(keys, t, lane, pos[j], pw);
  }
  bool bad = false;
  for (int it0 = 0;; it0 += kAhead) {
#pragma unroll
    for (int j = 0; j < kAhead; ++j) {
      const int it = it0 + j;
      const int t = k_begin + it * kKeyTile;
      if (t >= k_end) return bad;
      const int buf = it % kStages;
      if (it >= kStages) mbar_wait(&empty_bar[buf], ((it / kStages) - 1) & 1);
      if (!kSparse && tma.k_map != nullptr && t + kKeyTile <= keys.n_cache) {
        if (lane == 0 && pw == 0) {
          mbar_arrive_expect_tx(&full_bar[buf], 2 * tile_elems * sizeof(T));
#pragma unroll
          for (int half = 0; half < D / 64; ++half) {
            const int dst = buf * tile_elems + half * kKeyTile * 64;  // sw128_offset's halves
            tma_load_4d(s_k + dst, tma.k_map, half * 64, t, tma.h, tma.b, &full_bar[buf]);
            tma_load_4d(s_v + dst, tma.v_map, half * 64, t, tma.h, tma.b, &full_bar[buf]);
          }
        } else {
          mbar_arrive(&full_bar[buf]);
        }
      } else {
        copy_kv_tile<T, D, kSparse, kWarps>(keys, t, k_end, lane, pos[j], s_k + buf * tile_elems,
                                            s_v + buf * tile_elems, offset, bad, pw);
        mbar_arrive_on_copies(&full_bar[buf]);
      }
      const int t_ahead = t + kAhead * kKeyTile;
      if (t_ahead < k_end) {
        load_tile_positions<T, kSparse, kWarps>(keys, t_ahead, lane, pos[j], pw);
      }
    }
  }
}

// After the consumer loop, every thread: waits until every warp is past it (then s_bad, the
// producer's out-of-range flag, is final) and lets the split merge, a programmatic dependent
// launch, be placed (not earlier: its waiting CTAs would take issue slots from the main loop;
// measured 10% slower at batch 32). Returns whether the rows are poisoned.
MAGE_DEVICE bool finish_key_loop(const int& s_bad) {
  __syncthreads();
  pdl_release();
  return s_bad != 0;
}

// Writes this thread's half (i = 0: row g, 1: row g + 8) of a 16-row output tile: the final
// row (normalised, 16-bit) and lse when there is one split, else the split's fp32 partials.
// `row` is the row within the KV head (grow = the global row); rows past a.rows are skipped.
template <typename T, int D>
MAGE_DEVICE void store_rows(const AttentionArgs& a, int split, int64_t head_row0, int row,
                            const float (&frag)[D / 8][4], int i, float m_log2, float l_part,
                            bool poisoned, int tig) {
  float li = l_part;  // the 4 lanes of a row hold a quarter of its sum each
  li += __shfl_xor_sync(0xffffffffu, li, 1);
  li += __shfl_xor_sync(0xffffffffu, li, 2);
  if (row >= a.rows) return;
  const float inv = poisoned ? NAN : 1.f / li;
  const float lse = poisoned ? NAN : (m_log2 + log2f(li)) * kLn2;
  const int64_t grow = head_row0 + row;
  if (a.num_splits == 1) {
    T* out = static_cast<T*>(a.out) + grow * D;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      *reinterpret_cast<uint32_t*>(out + dt * 8 + tig * 2) =
          pack2<T>(frag[dt][2 * i] * inv, frag[dt][2 * i + 1] * inv);
    }
    if (tig == 0) a.lse[grow] = lse;
  } else {
    const int64_t total_rows = static_cast<int64_t>(a.batch) * a.hq * a.block;
    float* out = a.o_part + (split * total_rows + grow) * D;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      *reinterpret_cast<float2*>(out + dt * 8 + tig * 2) =
          make_float2(frag[dt][2 * i] * inv, frag[dt][2 * i + 1] * inv);
    }
    if (tig == 0) a.lse_part[split * total_rows + grow] = lse;
  }
}

}  // namespace mage::cuda
