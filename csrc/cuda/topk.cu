// Top-k selection per (sequence, KV head) = one "row" of scores.
//
// One thread-block cluster of C CTAs x 1024 threads per row (Hopper distributed shared memory).
// C = 1, 2, 4, 8 or 16 is picked at launch from the cache capacity (the bound of every row's
// length) and the row count (no device sync, so graph capturable): the fewest CTAs that hold a
// full row in registers, 16 keys per thread; then, if that is a cluster, twice as many (up to
// 8) while a CTA would hold more than 8K positions and all the rows' clusters fit on the GPU at
// once (at small batch most SMs are idle; 16 is non-portable, used only for rows past 8 x 16K
// and where the occupancy query allows it). Rows longer than 16 x 16K positions are cut into 16K tiles that every phase re-reads from
// global memory. CTA r takes the r-th C-th of the row (rounded up to 32 positions); within a
// tile of nt positions each warp takes S = ceil(nt / 1024) consecutive 32-position segments,
// key j of a lane being segment j's lane-th position. So loads coalesce, a warp's keys are
// contiguous (the output order is warp order), and every per-key loop stops after the warp's
// segments: short rows and tails cost in proportion. A 3-pass radix select on key bits 31..20,
// 19..10 and 9..0 finds T, the k-th largest key. The 12-bit first pass (sign, exponent, 3
// mantissa bits) spreads scores of one exponent over 8 bins and saves the fourth pass.
//  - A pass counts the keys that still match the prefix into a CTA histogram (one atomic per
//    run of a thread's keys in one bin, since scores crowd into few bins; pass 1 branch-free,
//    into two bank-shifted copies by lane parity), then adds it into the cluster histogram,
//    whose bins are spread over the C CTAs (remote atomics). After one cluster barrier every
//    CTA reads the totals back; warp sums and one barrier locate the warp holding the bin, and
//    only that warp scans its lanes. Rescanning the register-resident keys costs a compare
//    each, so later passes need no candidate list (pass 3 skips warps without a pass-2 match).
//    With C = 1 the CTA histogram is the row's: no cluster histogram.
//  - The scans also carry, per bin, this CTA's count (passes 1, 2) or the count of the CTAs
//    before it (pass 3, whose cluster histogram keeps one column per CTA). So each CTA knows,
//    without another barrier, how many keys above T and equal to T the CTAs before it hold:
//    its output offset, and the ties left to it (ties go to the earliest positions).
//  - The write: each lane flags its keys above / equal to T; warp sums and one barrier give
//    each warp its offset, and only the segments holding a flagged key (few) are revisited,
//    ballots ordering the lanes, so the output is ascending.
// The row's length is itself a global load that the score addresses wait for; at small batch,
// thread 0 first asks L2 (bulk prefetch) for the CTA's part of a full-capacity row.
// Ranks as the CPU kernel: NaN counts as -inf and -0 as +0 (ties), ties go to the earliest
// positions. Positions past the row end that a warp's last segment covers load as -inf; they
// come after every real position, so they never displace one and are never selected.
#include <cooperative_groups.h>

#include <atomic>
#include <cmath>
#include <type_traits>

#include "cuda/device_utils.cuh"

namespace mage::cuda {
namespace {

namespace cg = cooperative_groups;

constexpr int kMaxCtas = 16;  // CTAs per row (cluster size) at most; 16 is non-portable
constexpr int kTopkThreads = 1024;
constexpr int kWarps = kTopkThreads / 32;
constexpr int kPer = 16;                       // keys per thread at most
constexpr int kTile = kTopkThreads * kPer;     // positions per CTA held in registers
constexpr int kSpreadAbove = 8192;             // launch: more CTAs while a CTA holds more
// ... up to 8 CTAs: measured on the H200, a 16-CTA cluster costs ~5 us more than an 8-CTA one
// at the same keys per CTA (128K x 2 rows: 24.3 vs 19.3 us), so 16 only holds rows past 128K.
constexpr int kMaxSpread = 8;
constexpr int kBins1 = 4096, kBins2 = 1024;    // pass 1: key bits 31..20; passes 2, 3: 10 bits
constexpr int kCopy = kBins1 + 4;  // pass 1's second copy: 4 banks over, 16-byte aligned
constexpr uint32_t kForced = 0xffffffffu;      // sinks and recents: above every real score
static_assert(kWarps == 32 && kBins2 == kTopkThreads && kPer <= 32 && kTile < 65536,
              "one warp sum per lane; one bin per thread in passes 2, 3; one segment per lane; "
              "a tile's counts pack into 16 bits");

// Result of a pass: the prefix extended by the chosen bin, the keys still needed from it, and
// the keys of the bins above it / in it counted by the second scanned values.
struct Found {
  uint32_t prefix;
  int remaining, above, equal;
};

// Monotone float -> uint32 (larger float, larger key). fmaxf turns NaN into -inf and + 0 turns
// -0 into +0, the CPU kernel's ties; keys span [key(-inf), key(+inf)] = [0x007fffff, 0xff800000].
MAGE_DEVICE uint32_t order_key(float x) {
  const uint32_t u = __float_as_uint(fmaxf(x, -INFINITY) + 0.0f);
  return u ^ (static_cast<uint32_t>(static_cast<int32_t>(u) >> 31) | 0x80000000u);
}

// f(std::integral_constant<int, J>) for J = 0, 1, .. while J < n (at most kPer): the index is a
// constant, so keys[J] stays in a register. n is warp-uniform: the exits cost no divergence.
template <int J = 0, typename F>
MAGE_DEVICE void for_keys(int n, F&& f) {
  if constexpr (J < kPer) {
    if (J >= n) return;
    f(std::integral_constant<int, J>{});
    for_keys<J + 1>(n, f);
  }
}

// keys[j] = raw bits of base[32 j] for j < n, -inf past rest (32 j >= rest). Only the last
// key (j = n - 1) can lie past rest, so the others load unconditionally.
template <int J = 0>
MAGE_DEVICE void load_scores(uint32_t (&keys)[kPer], const float* base, int n, int rest) {
  if constexpr (J < kPer) {
    if (J + 1 < n) {
      keys[J] = __float_as_uint(__ldg(base + 32 * J));
      load_scores<J + 1>(keys, base, n, rest);
    } else if (J + 1 == n) {
      keys[J] = __float_as_uint(32 * J < rest ? __ldg(base + 32 * J) : -INFINITY);
    }
  }
}

MAGE_DEVICE void red_add_shared(uint32_t addr, int v) {
  asm volatile("red.shared.add.u32 [%0], %1;" ::"r"(addr), "r"(v) : "memory");
}

// Pass 1: adds the first nvw keys (key(j) makes key j) into the shared histogram at byte address
// base + 4 (key >> 20). Scores crowd into few bins, and same-address atomics of a warp
// serialize, so a thread adds runs of consecutive keys in one bin with one atomic. Branch-free:
// every key issues one atomic, of the run it ends, or else into the lane's own dummy word.
template <typename Key>
MAGE_DEVICE void count_pass1(int nvw, uint32_t base, uint32_t dummy, Key key) {
  uint32_t run_addr = dummy;
  int run = 0;
  for_keys(nvw, [&](auto j) {
    const uint32_t addr = base + (key(j) >> 20) * 4u;
    if constexpr (decltype(j)::value == 0) {
      run = 1;
    } else {
      const bool other = addr != run_addr;
      red_add_shared(other ? run_addr : dummy, run);
      run = other ? 1 : run + 1;
    }
    run_addr = addr;
  });
  red_add_shared(run_addr, run);
}

// Passes 2, 3: adds the first nvw keys that match the prefix (mask) into the histogram at byte
// address base + 4 ((key >> shift) & 1023), one atomic per run. Few keys match: a branch skips
// the rest, and keys j whose bit in the warp-uniform `slots` is clear are known not to match.
// Returns this lane's matches, bit j for key j.
MAGE_DEVICE uint32_t count_matching(const uint32_t (&keys)[kPer], int nvw, uint32_t slots,
                                    uint32_t base, uint32_t dummy, uint32_t mask,
                                    uint32_t prefix, int shift) {
  uint32_t run_addr = dummy, matched = 0;
  int run = 0;
  for_keys(nvw, [&](auto j) {
    if (((slots >> j) & 1u) && (keys[j] & mask) == prefix) {
      matched |= 1u << j;
      const uint32_t addr = base + ((keys[j] >> shift) & 1023u) * 4u;
      if (addr != run_addr) {
        red_add_shared(run_addr, run);
        run_addr = addr;
        run = 0;
      }
      ++run;
    }
  });
  red_add_shared(run_addr, run);
  return matched;
}

// Thread t holds, for bins hi_bin - t*B - e (e < B: descending over the block), the cluster
// count g and (kX) a second count x. Exactly one bin holds the remaining-th key counted from
// the top; its thread fills *f, with the x of the bins above it and its own x. Warp sums and
// one barrier tell each warp whether it holds that bin; only that warp scans its lanes.
template <int B, bool kX>
MAGE_DEVICE void find_bin(const int (&g)[B], const int (&x)[B], int hi_bin, int remaining,
                          uint32_t prefix, int shift, int2* s_warp, Found* f) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int g_own = 0, x_own = 0;
#pragma unroll
  for (int e = 0; e < B; ++e) {
    g_own += g[e];
    if (kX) x_own += x[e];
  }
  const int g_warp = __reduce_add_sync(0xffffffffu, g_own);
  const int x_warp = kX ? __reduce_add_sync(0xffffffffu, x_own) : 0;
  if (lane == 0) s_warp[warp] = make_int2(g_warp, x_warp);
  __syncthreads();
  const int2 w = s_warp[lane];  // one lane per warp
  int g_acc = __reduce_add_sync(0xffffffffu, lane < warp ? w.x : 0);  // warps before this one
  if (remaining <= g_acc || g_acc + g_warp < remaining) return;      // warp-uniform
  int x_acc = kX ? __reduce_add_sync(0xffffffffu, lane < warp ? w.y : 0) : 0;
  int g_in = g_own, x_in = x_own;  // inclusive scan over the lanes
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int pg = __shfl_up_sync(0xffffffffu, g_in, o);
    const int px = kX ? __shfl_up_sync(0xffffffffu, x_in, o) : 0;
    if (lane >= o) {
      g_in += pg;
      x_in += px;
    }
  }
  g_acc += g_in - g_own;
  x_acc += x_in - x_own;
#pragma unroll
  for (int e = 0; e < B; ++e) {
    if (g_acc < remaining && remaining <= g_acc + g[e]) {
      const int bin = hi_bin - static_cast<int>(threadIdx.x) * B - e;
      *f = {prefix | (static_cast<uint32_t>(bin) << shift), remaining - g_acc, x_acc,
            kX ? x[e] : 0};
    }
    g_acc += g[e];
    if (kX) x_acc += x[e];
  }
}

// N ints from shared memory (this CTA's or another's) in vector loads: 16-byte aligned for
// N % 4 == 0, 8-byte aligned for N == 2.
template <int N>
MAGE_DEVICE void load_ints(const int* p, int (&v)[N]) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int i = 0; i < N / 4; ++i) {
      const int4 q = reinterpret_cast<const int4*>(p)[i];
      v[4 * i] = q.x;
      v[4 * i + 1] = q.y;
      v[4 * i + 2] = q.z;
      v[4 * i + 3] = q.w;
    }
  } else {
    static_assert(N == 2, "cluster sizes are powers of two");
    const int2 q = *reinterpret_cast<const int2*>(p);
    v[0] = q.x;
    v[1] = q.y;
  }
}

// C: CTAs per row, the cluster size of the launch (1, 2, 4, 8 or 16).
template <int C>
__global__ void __launch_bounds__(kTopkThreads, 1)
    topk_cluster_kernel(const __grid_constant__ TopkArgs a, bool prefetch) {
  constexpr bool kDsmem = C > 1;  // C == 1: the CTA histograms are the row's
  constexpr int kSlice1 = kBins1 / C, kSlice2 = kBins2 / C;  // cluster histogram bins per CTA
  static_assert(C >= 1 && C <= kMaxCtas && (C & (C - 1)) == 0 && kSlice1 % 4 == 0,
                "pass 1 pushes and reads 4 bins of one CTA's slice with one 16-byte access");
  // This CTA's pass-1 histogram (two copies); pass 3 reuses its first 1024 ints.
  __shared__ __align__(16) int s_h1[2 * kCopy];
  __shared__ int s_h2[kBins2];  // this CTA's pass-2 histogram
  // The cluster histograms (C > 1): this CTA's slice of the bins. Pass 3 keeps a column per CTA
  // in pass 1's space: its remote writes follow the pass-2 cluster barrier, which follows
  // every CTA's reads of pass 1's totals. The sizes keep C = 2 within 48 KB of static memory.
  __shared__ __align__(16) int s_g13[kDsmem ? (kSlice1 > kBins2 ? kSlice1 : kBins2) : 4];
  __shared__ __align__(16) int s_g2[kDsmem ? kSlice2 : 4];
  int* const s_g1 = s_g13;
  int* const s_g3 = s_g13;
  __shared__ int2 s_warp[kWarps];      // find_bin's warp sums
  __shared__ uint32_t s_wsum[kWarps];  // the write's packed (above, equal) per warp
  __shared__ Found s_found;
  __shared__ int s_above12;         // this CTA's keys above T decided in passes 1, 2
  __shared__ int s_above_earlier;   // the same, summed over the CTAs before this one
  __shared__ int s_dummy[32];       // per lane: the counting's atomics that add nothing

  cg::cluster_group cluster = cg::this_cluster();
  const int rank = kDsmem ? static_cast<int>(cluster.block_rank()) : 0;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int b = blockIdx.z, row = b * a.hkv + blockIdx.y;  // grid (C, Hkv, batch)
  const float* scores = a.scores + static_cast<int64_t>(row) * a.capacity;
  const int len_raw = a.cache_lens[b];  // used after the clearing below, which hides its latency
  if (prefetch && tid == 0) {
    // The row's length comes from global memory, and the scores' addresses depend on it: two
    // DRAM round trips in a row. So first ask L2 for this CTA's part of a full-capacity row (the
    // same part when the row is full), in 16-byte units; a hint, so the rounding inwards is
    // harmless.
    const int cchunk = ((a.capacity + C - 1) / C + 31) & ~31;
    const int cb = min(a.capacity, rank * cchunk);
    const int ce = min(min(a.capacity, cb + cchunk), cb + kTile);  // the first tile
    const uint64_t lo = (reinterpret_cast<uint64_t>(scores + cb) + 15) & ~uint64_t{15};
    const uint64_t hi = reinterpret_cast<uint64_t>(scores + ce) & ~uint64_t{15};
    if (lo < hi)
      asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(lo),
                   "r"(static_cast<uint32_t>(hi - lo))
                   : "memory");
  }
  // Clear the histograms while the length loads.
  constexpr int kH1Vecs = 2 * kCopy / 4;  // s_h1 in 16-byte stores
#pragma unroll
  for (int i = 0; i < (kH1Vecs + kTopkThreads - 1) / kTopkThreads; ++i)
    if (i * kTopkThreads + tid < kH1Vecs)
      reinterpret_cast<int4*>(s_h1)[i * kTopkThreads + tid] = make_int4(0, 0, 0, 0);
  s_h2[tid] = 0;
  if constexpr (kDsmem) {
#pragma unroll
    for (int i = 0; i < (kSlice1 + kTopkThreads - 1) / kTopkThreads; ++i)
      if (i * kTopkThreads + tid < kSlice1) s_g1[i * kTopkThreads + tid] = 0;
    if (tid < kSlice2) s_g2[tid] = 0;
  }
  const int len = clamp_int(len_raw, 0, a.capacity);
  if (len != len_raw && rank == 0 && tid == 0 && blockIdx.y == 0) {  // error path only
    report_error(a.err, DeviceError::kCacheLength, b, -1, 0, len_raw, a.capacity);
  }
  int32_t* out = a.indices + static_cast<int64_t>(row) * a.k;
  if (len <= a.k) {  // every valid position is selected (uniform over the cluster)
    if (rank == 0) {
      for (int i = tid; i < a.k; i += kTopkThreads) out[i] = i < len ? i : -1;
      if (tid == 0) a.counts[row] = len;
    }
    return;
  }
  // Remote adds into s_g1 / s_g2 wait for this; s_g3 is fully overwritten, so never cleared.
  if constexpr (kDsmem) cluster.barrier_arrive();

  // Chunks of whole segments: only the row's last segment runs past its end.
  const int chunk = ((len + C - 1) / C + 31) & ~31;
  const int begin = min(len, rank * chunk);
  const int n = min(len, begin + chunk) - begin;  // this CTA's positions [begin, begin + n)
  const int ntiles = max(1, (n + kTile - 1) / kTile);
  const int recent_begin = len - a.n_recent;
  // Tile t: its nt positions from begin + t * kTile; warp w takes segments w*S .. w*S + S - 1
  // (S = ceil(nt / 1024) <= kPer), of which the first nvw exist; key j of a lane is position
  // pos0 + 32 j, real while 32 j < rest.
  int nvw = 0, pos0 = 0, rest = 0;
  auto view = [&](int t) {
    const int nt = max(0, min(kTile, n - t * kTile));
    const int s = (nt + kTopkThreads - 1) / kTopkThreads;
    const int first = warp * s * 32;
    nvw = min(s, max(0, (nt - first + 31) >> 5));
    pos0 = begin + t * kTile + first + lane;
    rest = nt - first - lane;
  };
  uint32_t keys[kPer];
  auto fetch = [&](int t) {  // raw score bits; -inf past the end
    view(t);
    load_scores(keys, scores + pos0, nvw, rest);
  };
  // Key j from its raw score bits. Sinks and recents are forced above every score; only the
  // tiles that hold some (kEdge) test the positions.
  auto edge_tile = [&](int t) {
    const int tile_begin = begin + t * kTile;
    return tile_begin < a.n_sink || min(begin + n, tile_begin + kTile) > recent_begin;
  };
  auto to_key = [&](auto edge, auto j) {
    if constexpr (decltype(edge)::value) {
      const int p = pos0 + 32 * j;
      if (p < a.n_sink || (p >= recent_begin && p < len)) return kForced;
    }
    return order_key(__uint_as_float(keys[j]));
  };
  auto make_keys = [&](int t) {
    auto run = [&](auto edge) { for_keys(nvw, [&](auto j) { keys[j] = to_key(edge, j); }); };
    if (edge_tile(t)) run(std::true_type{}); else run(std::false_type{});
  };

  // Pass 1 (bits 31..20), counted while converting: all loads of a tile are in flight at once.
  fetch(0);
  __syncthreads();  // histograms cleared
  const uint32_t h1_base = smem_addr(s_h1 + (lane & 1) * kCopy);
  const uint32_t dummy = smem_addr(s_dummy + lane);
  for (int t = 0; t < ntiles; ++t) {
    if (t > 0) fetch(t);
    auto run = [&](auto edge) {
      count_pass1(nvw, h1_base, dummy, [&](auto j) { return keys[j] = to_key(edge, j); });
    };
    if (edge_tile(t)) run(std::true_type{}); else run(std::false_type{});
  }
  __syncthreads();
  {
    constexpr int B = kBins1 / kTopkThreads;
    const int lo = kBins1 - B * (tid + 1);  // this thread's bins: lo .. lo + B - 1
    const int4 c0 = *reinterpret_cast<const int4*>(s_h1 + lo);
    const int4 c1 = *reinterpret_cast<const int4*>(s_h1 + kCopy + lo);
    const int ls[B] = {c0.w + c1.w, c0.z + c1.z, c0.y + c1.y, c0.x + c1.x};  // descending
    if constexpr (kDsmem) {
      cluster.barrier_wait();  // every CTA's s_g1 / s_g2 cleared
      int* const g1 = cluster.map_shared_rank(s_g1, lo / kSlice1) + lo % kSlice1;
#pragma unroll
      for (int e = 0; e < B; ++e)
        if (ls[e] > 0) atomicAdd(g1 + B - 1 - e, ls[e]);
      cluster.sync();  // cluster histogram complete
      const int4 g = *reinterpret_cast<const int4*>(g1);
      const int gs[B] = {g.w, g.z, g.y, g.x};
      find_bin<B, true>(gs, ls, kBins1 - 1, a.k, 0u, 20, s_warp, &s_found);
    } else {
      find_bin<B, false>(ls, ls, kBins1 - 1, a.k, 0u, 20, s_warp, &s_found);
    }
  }
  __syncthreads();
  uint32_t prefix = s_found.prefix;
  int remaining = s_found.remaining;
  int above = s_found.above;  // this CTA's keys above T so far (C > 1)

  // Pass 2 (bits 19..10) over the keys matching the 12-bit prefix.
  s_h1[tid] = 0;  // pass 3 counts into s_h1[0, 1024); the barriers of pass 2 order this
  uint32_t slots3 = ~0u;  // the warp's keys that can match in pass 3 (one tile: pass 2's)
  for (int t = 0; t < ntiles; ++t) {
    if (ntiles > 1) {
      fetch(t);
      make_keys(t);
    }
    const uint32_t m =
        count_matching(keys, nvw, ~0u, smem_addr(s_h2), dummy, 0xfff00000u, prefix, 10);
    if (ntiles == 1) slots3 = __reduce_or_sync(0xffffffffu, m);
  }
  __syncthreads();
  {
    const int bin = kBins2 - 1 - tid;
    const int ls[1] = {s_h2[bin]};
    if constexpr (kDsmem) {
      if (s_h2[tid] > 0)
        atomicAdd(cluster.map_shared_rank(s_g2, tid / kSlice2) + tid % kSlice2, s_h2[tid]);
      cluster.sync();
      const int gs[1] = {cluster.map_shared_rank(s_g2, bin / kSlice2)[bin % kSlice2]};
      find_bin<1, true>(gs, ls, kBins2 - 1, remaining, prefix, 10, s_warp, &s_found);
    } else {
      find_bin<1, false>(ls, ls, kBins2 - 1, remaining, prefix, 10, s_warp, &s_found);
    }
  }
  __syncthreads();
  prefix = s_found.prefix;
  remaining = s_found.remaining;
  above += s_found.above;

  // Pass 3 (bits 9..0). Each CTA writes its whole column, so the owners see every CTA's
  // count per bin and can tell the CTAs before the reader from the rest.
  if (kDsmem && tid == 0) s_above12 = above;
  for (int t = 0; t < ntiles; ++t) {
    if (ntiles > 1) {
      fetch(t);
      make_keys(t);
    }
    if (slots3 != 0)  // warp-uniform: often no key of the warp matched in pass 2
      count_matching(keys, nvw, slots3, smem_addr(s_h1), dummy, 0xfffffc00u, prefix, 0);
  }
  __syncthreads();
  {
    const int bin = kBins2 - 1 - tid;
    if constexpr (kDsmem) {
      cluster.map_shared_rank(s_g3, tid / kSlice2)[(tid % kSlice2) * C + rank] = s_h1[tid];
      cluster.sync();
      if (warp == 0) {
        const int x = lane < rank ? *cluster.map_shared_rank(&s_above12, lane) : 0;
        const int sum = __reduce_add_sync(0xffffffffu, x);
        if (lane == 0) s_above_earlier = sum;
      }
      int c[C];
      load_ints(cluster.map_shared_rank(s_g3, bin / kSlice2) + (bin % kSlice2) * C, c);
      int gs[1] = {0}, es[1] = {0};  // all CTAs, the CTAs before this one
#pragma unroll
      for (int r = 0; r < C; ++r) {
        gs[0] += c[r];
        es[0] += r < rank ? c[r] : 0;
      }
      find_bin<1, true>(gs, es, kBins2 - 1, remaining, prefix, 0, s_warp, &s_found);
    } else {
      const int gs[1] = {s_h1[bin]};
      find_bin<1, false>(gs, gs, kBins2 - 1, remaining, prefix, 0, s_warp, &s_found);
    }
  }
  // Every remote read of this CTA is done (their values are used); the matching wait keeps this
  // CTA's shared memory alive until the other CTAs have done theirs. Relaxed: nothing to
  // publish, so no fence.
  if constexpr (kDsmem) asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
  __syncthreads();
  const uint32_t thresh = s_found.prefix;  // T, the k-th largest key of the row
  remaining = s_found.remaining;           // keys equal to T in the top k
  const int eq_earlier = kDsmem ? s_found.equal : 0;  // keys equal to T in earlier CTAs
  const int offset = kDsmem ? s_above_earlier + s_found.above + min(remaining, eq_earlier) : 0;
  const int tie_budget = max(0, remaining - eq_earlier);  // ties left to this CTA

  // The write. Each lane flags its keys above T (fa) and equal to T (fe), bit j for key j;
  // (above, equal) counts pack into 16 bits each (a tile holds < 65536 positions). Warp sums
  // and one barrier give each warp its offset; only segments holding a flagged key (rare) are
  // revisited, with ballots for the order inside the segment and sums for the segments before.
  const uint32_t lt_mask = (1u << lane) - 1u;
  int above_carry = 0, equal_carry = 0;  // over earlier tiles of this CTA
  for (int t = 0; t < ntiles; ++t) {
    if (ntiles > 1) {
      fetch(t);
      make_keys(t);
    }
    uint32_t fa = 0, fe = 0;
    for_keys(nvw, [&](auto j) {
      if (keys[j] > thresh) fa |= 1u << j;
      if (keys[j] == thresh) fe |= 1u << j;
    });
    const uint32_t warp_sum =
        __reduce_add_sync(0xffffffffu, static_cast<uint32_t>(__popc(fa)) << 16 | __popc(fe));
    if (lane == 0) s_wsum[warp] = warp_sum;
    __syncthreads();
    const uint32_t ws = s_wsum[lane];
    const uint32_t tile_sum = __reduce_add_sync(0xffffffffu, ws);
    if (warp_sum != 0) {  // warp-uniform: most warps hold no selected key
      const uint32_t warp_before = __reduce_add_sync(0xffffffffu, lane < warp ? ws : 0u);
      for (uint32_t busy = __reduce_or_sync(0xffffffffu, fa | fe); busy != 0; busy &= busy - 1) {
        const int j = __ffs(busy) - 1;
        const uint32_t below = (1u << j) - 1u;  // this warp's segments before segment j
        const uint32_t pre =
            warp_before + __reduce_add_sync(0xffffffffu, static_cast<uint32_t>(__popc(fa & below))
                                                             << 16 | __popc(fe & below));
        const uint32_t gt = __ballot_sync(0xffffffffu, (fa >> j) & 1u);
        const uint32_t eq = __ballot_sync(0xffffffffu, (fe >> j) & 1u);
        const int above_before = above_carry + static_cast<int>(pre >> 16);
        const int equal_before = equal_carry + static_cast<int>(pre & 0xffffu);
        const int ties = max(0, tie_budget - equal_before);  // of this segment's equal keys
        const int eq_rank = __popc(eq & lt_mask);
        if (((gt >> lane) & 1u) || (((eq >> lane) & 1u) && eq_rank < ties)) {
          out[offset + above_before + min(equal_before, tie_budget) + __popc(gt & lt_mask) +
              min(eq_rank, ties)] = pos0 + 32 * j;
        }
      }
    }
    above_carry += static_cast<int>(tile_sum >> 16);
    equal_carry += static_cast<int>(tile_sum & 0xffffu);
    if (ntiles > 1) __syncthreads();  // s_wsum is rewritten by the next tile
  }
  if (rank == 0 && tid == 0) a.counts[row] = a.k;
  if constexpr (kDsmem) cluster.barrier_wait();  // pairs with the arrive after pass 3's reads
}

// A launch of kTopkThreads-thread CTAs in clusters of c along x (no cluster attribute for
// c == 1, which uses no cluster operations: a plain launch). Not copyable: cfg points at attr.
struct ClusterLaunch {
  cudaLaunchConfig_t cfg = {};
  cudaLaunchAttribute attr[1];
  ClusterLaunch(int c, dim3 grid, cudaStream_t stream) {
    cfg.gridDim = grid;
    cfg.blockDim = dim3(kTopkThreads);
    cfg.stream = stream;
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = c;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = c > 1 ? 1 : 0;
  }
  ClusterLaunch(const ClusterLaunch&) = delete;
  ClusterLaunch& operator=(const ClusterLaunch&) = delete;
};

template <int C>
cudaError_t launch_ctas(const TopkArgs& a, bool prefetch, cudaStream_t stream) {
  ClusterLaunch l(C, dim3(C, a.hkv, a.batch), stream);
  return cudaLaunchKernelEx(&l.cfg, topk_cluster_kernel<C>, a, prefetch);
}

// How many rows (clusters of C CTAs) the current device runs at once; 0 where the query fails
// or the size does not fit. C = 16 first allows the non-portable size.
template <int C>
int query_resident_rows() {
  int n = 0;
  if constexpr (C == 1) {
    int dev = 0, sms = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, topk_cluster_kernel<1>, kTopkThreads,
                                                      0) != cudaSuccess) {
      (void)cudaGetLastError();
      return 0;
    }
    return n * sms;
  } else {
    if (C > 8 && cudaFuncSetAttribute(topk_cluster_kernel<C>,
                                      cudaFuncAttributeNonPortableClusterSizeAllowed,
                                      1) != cudaSuccess) {
      (void)cudaGetLastError();
      return 0;
    }
    ClusterLaunch l(C, dim3(C, 1), nullptr);
    if (cudaOccupancyMaxActiveClusters(&n, topk_cluster_kernel<C>, &l.cfg) != cudaSuccess) {
      (void)cudaGetLastError();
      return 0;
    }
    return n;
  }
}

// query_resident_rows, asked once per device and cluster size: host calls that neither sync
// nor enqueue, so a launch under graph capture may be the first.
int resident_rows(int c) {
  constexpr int kDevices = 64;
  static std::atomic<int> cache[kDevices][5];  // answer + 1; 0: not asked yet
  const int i = c == 1 ? 0 : c == 2 ? 1 : c == 4 ? 2 : c == 8 ? 3 : 4;
  auto query = [i] {
    switch (i) {
      case 0: return query_resident_rows<1>();
      case 1: return query_resident_rows<2>();
      case 2: return query_resident_rows<4>();
      case 3: return query_resident_rows<8>();
      default: return query_resident_rows<16>();
    }
  };
  int dev = -1;
  if (cudaGetDevice(&dev) != cudaSuccess) (void)cudaGetLastError();
  if (dev < 0 || dev >= kDevices) return query();
  int v = cache[dev][i].load(std::memory_order_relaxed);
  if (v == 0) {
    v = query() + 1;
    cache[dev][i].store(v, std::memory_order_relaxed);
  }
  return v - 1;
}

}  // namespace

cudaError_t launch_topk(const TopkArgs& a, cudaStream_t stream) {
  // CTAs per row, a power of two (so the histogram bins split evenly). First the fewest that
  // hold a row of `capacity` scores in registers (16 only where the device runs 16-clusters;
  // else 8 and re-read tiles). Then, for clusters, twice as many (up to kMaxSpread) while a
  // CTA would hold more than kSpreadAbove positions and the rows' clusters all fit at once: at
  // small batch most SMs are idle, and a CTA's per-key work shrinks with its keys. A single CTA
  // stays one: a cluster's barriers and remote traffic cost more than halving its keys saves.
  // cache_lens only bounds the rows by capacity on the device; the kernel handles any length,
  // this only picks the speed.
  const int64_t cap = a.capacity, rows = static_cast<int64_t>(a.batch) * a.hkv;
  auto per_cta = [cap](int c) { return (cap + c - 1) / c; };
  int c = 1;
  while (c < 8 && per_cta(c) > kTile) c *= 2;
  if (per_cta(c) > kTile && resident_rows(16) > 0) c = 16;
  while (c > 1 && c < kMaxSpread && per_cta(c) > kSpreadAbove && rows <= resident_rows(2 * c))
    c *= 2;
  // The L2 prefetch of full-capacity rows: only when all rows run at once, which bounds what
  // rows shorter than the capacity fetch in vain.
  const bool prefetch = rows <= resident_rows(c);
  switch (c) {
    case 1: return launch_ctas<1>(a, prefetch, stream);
    case 2: return launch_ctas<2>(a, prefetch, stream);
    case 4: return launch_ctas<4>(a, prefetch, stream);
    case 8: return launch_ctas<8>(a, prefetch, stream);
    default: return launch_ctas<16>(a, prefetch, stream);
  }
}

}  // namespace mage::cuda
