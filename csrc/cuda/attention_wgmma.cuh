// Hopper (sm_90a) warpgroup attention kernel: the same work split as attention_tile_kernel
// (one CTA = the packed G*B query rows of one (sequence, KV head), or a tile of them, against one
// split of its key list; flash-decoding partials merged by merge.cuh), with the matrix products
// on wgmma instead of mma.sync.
//
// kWG consumer warpgroups of 64 rows each (Q in shared memory) + producer warps that stream
// 64-key K/V tiles through a kStages ring in the 128-byte-swizzled layout wgmma reads (whole
// dense cache tiles by TMA, the rest by cp.async; per-stage mbarriers). Per tile a warpgroup
// issues S = Q K^T (D/16 async MMAs, both operands in shared memory), runs the online softmax
// on S in registers (the accumulator layout of S is the A-fragment layout of P), then
// O += P V (4 async MMAs, P from registers, V from shared memory). One group's softmax overlaps
// another's MMAs: the groups drift apart, or take turns at issuing them (wgmma_ping_pong).
#pragma once

#include <cmath>

#include "cuda/attention_parts.cuh"
#include "cuda/wgmma.cuh"

namespace mage::cuda {

// CTAs per SM: narrow (one-warpgroup) CTAs take short splits, whose time is mostly memory
// latency, so two share an SM (more splits in flight, half the stages each); the wider ones
// fill an SM's shared memory with kStages of K/V.
template <int kWG>
constexpr int wgmma_ctas_per_sm() {
  return kWG == 1 ? kNarrowWgmmaCtasPerSm : 1;
}
template <int kWG>
constexpr int wgmma_stages() {
  return kWG == 1 ? 2 : 4;
}

template <int D, int kWG>
constexpr int wgmma_smem_bytes() {
  // 1024 bytes of slack to align the tiles to the swizzle atom.
  return 1024 + (kWG * 64 * D + 2 * wgmma_stages<kWG>() * kKeyTile * D) * 2;
}

// S (+)= Q K^T for one 64-key tile, issued asynchronously (the caller waits): D/16 MMAs with
// both operands in shared memory (this warpgroup's 64 Q rows, the swizzled K tile).
template <typename T, int D, int kRows>
MAGE_DEVICE void wgmma_qk(float (&s)[32], const unsigned char* q_wg, const unsigned char* kt) {
#pragma unroll
  for (int i = 0; i < 32; ++i) s[i] = 0.f;
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    const uint64_t da = wgmma_desc(q_wg + (ks >> 2) * kRows * 128 + (ks & 3) * 32, 16, 1024);
    const uint64_t db = wgmma_desc(kt + (ks >> 2) * kKeyTile * 128 + (ks & 3) * 32, 16, 1024);
    WgmmaOps<T>::ss_n64(s, da, db, ks > 0);
  }
  wgmma_commit();
}

// How far (log2 units) a row's tile max may exceed its running max before the running max moves
// (see softmax_pv): exponentials stay below 2^8 = 256, representable in bf16 / fp16 P.
constexpr float kRescaleSlack = 8.f;

// The consumer warpgroups' turns at issuing one kind of MMA (ping-pong, see
// wgmma_ping_pong): group g waits on named barrier `mine` (its 128 threads + the 128 of the
// group before it, which arrive there when done) and passes the turn on by arriving at `next`.
// mine < 0: no turns.
struct MmaTurn {
  int mine = -1, next = -1;
  bool pass = false;  // false on the ring's very last turn: every arrival then has its wait
  MAGE_DEVICE void take() const {
    if (mine >= 0) named_bar_sync(mine, 256);
  }
  MAGE_DEVICE void hand_on() const {
    if (mine >= 0 && pass) named_bar_arrive(next, 256);
  }
};

// Online softmax of one tile's S (keys t .. t + 63; those >= k_end masked) into the running
// max m / sum l / output o, then O += P V issued asynchronously (the caller waits) in this
// group's turn `pv`.
template <typename T, int D>
MAGE_DEVICE void softmax_pv(float (&s)[32], float (&o)[D / 8][4], float (&m)[2], float (&l)[2],
                            int t, int k_end, float scale_log2, const unsigned char* vt,
                            int tig, const MmaTurn& pv) {
  // Keys past the list only occur in a split's last tile (a warp-uniform branch). The scale is
  // positive (checked on the host), so the max is taken on the raw logits and the scaling folds
  // into the exponent's FMA.
  if (t + kKeyTile > k_end) {
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      if (t + (i >> 2) * 8 + tig * 2 + (i & 1) >= k_end) s[i] = -INFINITY;
    }
  }
  float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int i = 0; i < 32; ++i) mx[(i >> 1) & 1] = fmaxf(mx[(i >> 1) & 1], s[i]);
  // Lazy rescaling (FlashAttention-4): a warp moves its rows' running max only when a row's tile
  // max exceeds it by more than kRescaleSlack (log2 units), so the exponentials stay below
  // 2^kRescaleSlack and most tiles skip the output's rescale (64 multiplies a thread): the
  // softmax's instructions are the kernel's critical path (Nsight Compute; adding some
  // measured slower in proportion).
  float tile_max[2];
  bool grow = false;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
    mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
    tile_max[i] = mx[i] * scale_log2;  // every tile has a valid key: finite
    grow |= tile_max[i] > m[i] + kRescaleSlack;  // always on the first tile (m = -inf)
  }
  if (__any_sync(0xffffffffu, grow)) {  // warp-uniform
    float alpha[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float m_new = fmaxf(m[i], tile_max[i]);
      alpha[i] = fast_exp2(m[i] - m_new);  // m = -inf on the first tile: alpha = 0
      m[i] = m_new;
      l[i] *= alpha[i];
    }
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      o[dt][0] *= alpha[0];
      o[dt][1] *= alpha[0];
      o[dt][2] *= alpha[1];
      o[dt][3] *= alpha[1];
    }
  }
  const float neg_m[2] = {-m[0], -m[1]};
#pragma unroll
  for (int i = 0; i < 32; ++i) {
    s[i] = fast_exp2(fmaf(s[i], scale_log2, neg_m[(i >> 1) & 1]));
    l[(i >> 1) & 1] += s[i];
  }
  // P as A fragments: keys 16j .. 16j + 15 are two adjacent 8-key accumulator blocks. All
  // converted before the MMAs (registers written between them would make ptxas wait).
  uint32_t pa[4][4];
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int r = 0; r < 4; ++r) pa[j][r] = pack2<T>(s[8 * j + 2 * r], s[8 * j + 2 * r + 1]);
  pv.take();
  wgmma_fence();
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    // V as the MN-major B operand: 8-key groups 1024 bytes apart (stride), the two 64-column
    // halves kKeyTile * 128 bytes apart (leading).
    wgmma_pv<T, D>(reinterpret_cast<float(&)[D / 2]>(o), pa[j],
                   wgmma_desc(vt + j * 16 * 128, kKeyTile * 128, 1024));
  }
  wgmma_commit();
  pv.hand_on();
}

// Producer warps: the dense cache comes mostly through TMA (one lane issues a tile), the
// sparse step's gathered rows through cp.async, a share of each tile per warp (2 for the narrow
// CTAs, two of which share an SM's registers).
template <int kWG, bool kSparse>
constexpr int wgmma_producer_warps() {
  return kSparse ? (kWG == 1 ? 2 : 4) : 1;
}

// Ping-pong (FlashAttention-3's warpgroup scheduler barriers): the consumer warpgroups issue
// their Q K^T MMAs in turn and their P V MMAs in turn (two token rings of named barriers), so
// one group's softmax overlaps the others' MMAs instead of the groups drifting into step.
// Measured on the H200 (benchmarks/results/pingpong_probe_h200.json): 3 groups 2-6% faster
// (1.5B dense and sparse), the sparse step's 2 groups within -3% .. +1%; the dense step's 2
// groups 5-14% slower, so they issue freely. Q K^T alone in turn: within 1%.
template <int kWG, bool kSparse>
constexpr bool wgmma_ping_pong() {
  return kWG == 3 || (kSparse && kWG == 2);
}

// Threads per CTA: kWG consumer warpgroups (1 for narrow CTAs, else 2 or 3: at 4 the 64 fp32
// output accumulators per thread no longer fit the register file next to S) + the producers.
template <int kWG, bool kSparse>
constexpr int wgmma_threads() {
  return kWG * 128 + 32 * wgmma_producer_warps<kWG, kSparse>();
}

template <typename T, int D, bool kSparse, int kWG>
__global__ void __launch_bounds__(wgmma_threads<kWG, kSparse>(), wgmma_ctas_per_sm<kWG>())
    attention_wgmma_kernel(const __grid_constant__ AttentionArgs a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int kWgStages = wgmma_stages<kWG>();
  constexpr int kRows = kWG * 64;
  constexpr int kThreads = wgmma_threads<kWG, kSparse>();
  constexpr int kProducers = wgmma_producer_warps<kWG, kSparse>();
  constexpr int kTileBytes = kKeyTile * D * 2;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* s_q = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~static_cast<uintptr_t>(1023));
  unsigned char* s_k = s_q + kRows * D * 2;
  unsigned char* s_v = s_k + kWgStages * kTileBytes;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const CtaWork<T, kSparse> work(a, kRows);
  const auto& keys = work.keys;
  const int split = work.split, row0 = work.row0, k_begin = work.k_begin, k_end = work.k_end;
  const int64_t head_row0 = work.head_row0;

  // Q, the key count and the producer's first positions in flight together (as in
  // attention_tile_kernel).
  copy_q_rows<T, D>(a, head_row0, row0, kRows, reinterpret_cast<T*>(s_q),
                    [](int r, int ch) { return sw128_offset(r, ch, kRows) / 2; }, tid, kThreads);
  // Warpgroup index, made warp-uniform for the compiler (a per-thread value would put the
  // wgmma loop on a "divergent path", where ptxas serialises the async MMAs).
  const int wg = __shfl_sync(0xffffffffu, tid / 128, 0);
  const int pw = warp - 4 * kWG;  // producer warp index (wg == kWG)
  int pos[4];
  if (wg == kWG) load_tile_positions<T, kSparse, kProducers>(keys, k_begin, lane, pos, pw);

  if (k_begin >= k_end) {  // this sequence's keys end before this split (num_splits > 1)
    mark_empty_split(a, split, head_row0, row0, kRows, tid, kThreads);
    return;
  }

  __shared__ uint64_t full_bar[kWgStages];   // tile landed (32 producer lanes arrive)
  __shared__ uint64_t empty_bar[kWgStages];  // tile consumed (each compute warp arrives)
  __shared__ int s_bad;
  const int n_wg = min(kWG, (a.rows - row0 + 63) / 64);  // warpgroups with rows
  if (tid == 0) {
    init_ring(full_bar, empty_bar, 4 * n_wg, 32 * kProducers);
    s_bad = 0;
  }
  cp_async_wait<0>();
  fence_proxy_async();  // Q is read by wgmma (async proxy)
  __syncthreads();      // Q in shared memory, barriers initialised

  const bool active = wg < n_wg;  // (the producer warps have wg == kWG)
  if (wg == kWG) {  // the producer warps: K/V tiles into the ring
    TmaCache tma;
    if (!kSparse && a.use_tma) tma = {&a.k_map, &a.v_map, work.b, work.h};
    if (produce_kv_tiles<T, D, kSparse, kWgStages, /*kAhead=*/4, kProducers>(
            keys, k_begin, k_end, lane, pos, reinterpret_cast<T*>(s_k),
            reinterpret_cast<T*>(s_v), kKeyTile * D,
            [](int r, int ch) { return sw128_offset(r, ch, kKeyTile) / 2; }, full_bar,
            empty_bar, tma, pw)) {
      s_bad = 1;
    }
  }

  const int warp_row0 = wg * 64 + (warp & 3) * 16;  // this warp's 16 rows of the CTA
  const unsigned char* q_wg = s_q + wg * 64 * 128;
  // The accumulators of wgmma (per warp) have mma.sync's C layout (see attention_parts.cuh).
  float o[D / 8][4];
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // log2 units; this thread's share
  const int g = lane >> 2, tig = lane & 3;

  const int n_tiles = active ? (k_end - k_begin + kKeyTile - 1) / kKeyTile : 0;
  // Ping-pong turns: named barriers 1 + group (Q K^T) and 1 + kWG + group (P V); group 0 starts
  // (the last group hands it both first turns).
  const bool ping_pong = wgmma_ping_pong<kWG, kSparse>() && n_wg > 1 && active;
  const int next_wg = wg + 1 == n_wg ? 0 : wg + 1;
  MmaTurn qk_turn, pv_turn;
  if (ping_pong) {
    qk_turn = {1 + wg, 1 + next_wg, true};
    pv_turn = {1 + kWG + wg, 1 + kWG + next_wg, true};
    if (n_tiles > 0 && wg == n_wg - 1) {
      named_bar_arrive(1, 256);
      named_bar_arrive(1 + kWG, 256);
    }
  }
  for (int it = 0; it < n_tiles; ++it) {
    if (wg == n_wg - 1 && it == n_tiles - 1) qk_turn.pass = pv_turn.pass = false;
    const int buf = it % kWgStages;
    mbar_wait(&full_bar[buf], (it / kWgStages) & 1);
    fence_proxy_async();  // the producer's cp.async writes, acquired above, for wgmma
    // (Issuing the next tile's Q K^T before this softmax, FlashAttention-3 style, needs a
    // second S accumulator: past the registers of 2-3 groups, ptxas then serialises the MMAs.)
    float s[32];
    qk_turn.take();
    wgmma_qk<T, D, kRows>(s, q_wg, s_k + buf * kTileBytes);
    qk_turn.hand_on();
    wgmma_wait<0>();
    wgmma_fence_operands(s);
    softmax_pv<T, D>(s, o, m, l, k_begin + it * kKeyTile, k_end, a.scale_log2,
                     s_v + buf * kTileBytes, tig, pv_turn);
    wgmma_wait<0>();
    wgmma_fence_operands(reinterpret_cast<float(&)[D / 2]>(o));
    __syncwarp();
    if (lane == 0) mbar_arrive(&empty_bar[buf]);  // this warp is done with the tile
  }

  const bool poisoned = finish_key_loop(s_bad);
  if (tid == 0) {
    report_key_list_errors<kSparse>(a, work.b, work.h, split == 0 && row0 == 0, poisoned);
  }
  if (!active) return;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    store_rows<T, D>(a, split, head_row0, row0 + warp_row0 + g + i * 8, o, i, m[i], l[i],
                     poisoned, tig);
  }
#else
  __trap();  // built without sm_90a: the host never launches this kernel (see use_wgmma())
#endif
}

}  // namespace mage::cuda
