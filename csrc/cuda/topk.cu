// Top-k selection per (sequence, KV head) = one "row" of scores.
//
// One thread-block cluster of C CTAs x 1024 threads per row (Hopper distributed shared memory).
// C = 1, 2, 4 or 8 is picked at launch from the cache capacity (the bound of every row's length;
// no device sync, so graph capturable): the fewest CTAs that hold a full row in registers, so
// short caches don't pay 8 CTA slots (1 per SM) per row. CTA r takes the r-th C-th of the row;
// each thread keeps 16 order-preserving integer keys in registers (rows up to C x 16K positions
// stay resident; longer ones, capacity above 8 x 16K, are cut into 16K tiles that every phase
// re-reads from global memory). A 3-pass radix select on key bits 31..20, 19..10 and 9..0
// finds T, the k-th largest key. The 12-bit first pass (sign, exponent, 3 mantissa bits)
// spreads scores of one exponent over 8 bins and saves the fourth pass.
//  - A pass counts the keys that still match the prefix into a CTA histogram (one atomic per
//    run of equal bins in a thread; in pass 1 two bank-shifted copies, by lane parity, since
//    scores crowd into few bins), then adds it into the cluster histogram, whose bins are
//    spread over the C CTAs (remote atomics). After one cluster barrier every CTA reads the
//    totals back and finds the bin with one block scan. Rescanning the register-resident keys
//    costs a compare each, so later passes need no candidate list. With C = 1 the CTA
//    histogram is the row's: no cluster histogram, block barriers only.
//  - The scans also carry, per bin, this CTA's count (passes 1, 2) or the count of the CTAs
//    before it (pass 3, whose cluster histogram keeps one column per CTA). So each CTA knows,
//    without another barrier, how many keys above T and equal to T the CTAs before it hold:
//    its output offset, and the ties left to it (ties go to the earliest positions).
//  - The write: a warp takes 32 consecutive positions at a time (ballots); one block scan of
//    the (above, equal) counts of these 32-position segments gives each selected position its
//    slot, so the output is ascending.
// NaN ranks lowest and ties at T go to the earliest positions, exactly as the CPU kernel does.
#include <cooperative_groups.h>

#include <cmath>

#include "cuda/device_utils.cuh"

namespace mage::cuda {
namespace {

namespace cg = cooperative_groups;

constexpr int kMaxCtas = 8;  // CTAs per row (cluster size) for the longest rows
constexpr int kTopkThreads = 1024;
constexpr int kWarps = kTopkThreads / 32;
constexpr int kPer = 16;                       // keys per thread
constexpr int kTile = kTopkThreads * kPer;     // positions per CTA held in registers
constexpr int kSegs = kWarps * kPer;           // 32-position segments of a tile
constexpr int kBins1 = 4096, kBins2 = 1024;    // pass 1: key bits 31..20; passes 2, 3: 10 bits
constexpr int kCopy = kBins1 + 1;              // offset of pass 1's second copy: one bank over
constexpr uint32_t kForced = 0xffffffffu;      // sinks and recents: above every real score
static_assert(kWarps == 32 && kBins2 == kTopkThreads && kSegs <= kTopkThreads && kTile < 65536,
              "one warp total per lane in block_scan; one bin per thread in passes 2, 3; "
              "segment counts pack into 16 bits");

// Result of a pass: the prefix extended by the chosen bin, the keys still needed from it, and
// the keys of the bins above it / in it counted by the second scanned values.
struct Found {
  uint32_t prefix;
  int remaining, above, equal;
};

// Monotone float -> uint32 (larger float, larger key); NaN ranks lowest.
MAGE_DEVICE uint32_t order_key(float x) {
  if (isnan(x)) return 0u;
  const uint32_t u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Inclusive scan of the pairs (x, y) in thread order; returns the block totals. Hand-written:
// cub's 64-bit scan cost ~20 registers, more than the 16 resident keys leave.
MAGE_DEVICE int2 block_scan(int& x, int& y, int2* s_warp) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int px = __shfl_up_sync(0xffffffffu, x, o), py = __shfl_up_sync(0xffffffffu, y, o);
    if (lane >= o) {
      x += px;
      y += py;
    }
  }
  if (lane == 31) s_warp[warp] = make_int2(x, y);
  __syncthreads();
  const int2 w = s_warp[lane];  // one lane per warp
  x += __reduce_add_sync(0xffffffffu, lane < warp ? w.x : 0);
  y += __reduce_add_sync(0xffffffffu, lane < warp ? w.y : 0);
  return make_int2(__reduce_add_sync(0xffffffffu, w.x), __reduce_add_sync(0xffffffffu, w.y));
}

// Adds the keys for which bin_of gives a bin >= 0 into h, one atomic per run of equal bins.
template <typename BinOf>
MAGE_DEVICE void count_runs(const uint32_t (&keys)[kPer], int nvalid, int* h, BinOf bin_of) {
  int run_bin = -1, run = 0;
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    const int bin = j < nvalid ? bin_of(keys[j]) : -1;
    if (bin < 0) continue;
    if (bin != run_bin) {
      if (run > 0) atomicAdd(&h[run_bin], run);
      run_bin = bin;
      run = 0;
    }
    ++run;
  }
  if (run > 0) atomicAdd(&h[run_bin], run);
}

// Thread t holds, for bins hi_bin - t*B - e (e < B: descending over the block), the cluster
// count g and a second count x. A scan counts the keys in and above each bin; exactly one bin
// holds the remaining-th key, and its thread fills *f.
template <int B>
MAGE_DEVICE void find_bin(const int (&g)[B], const int (&x)[B], int hi_bin, int remaining,
                          uint32_t prefix, int shift, int2* s_warp, Found* f) {
  int g_acc = 0, x_acc = 0;
#pragma unroll
  for (int e = 0; e < B; ++e) {
    g_acc += g[e];
    x_acc += x[e];
  }
  const int g_own = g_acc, x_own = x_acc;
  block_scan(g_acc, x_acc, s_warp);
  g_acc -= g_own;
  x_acc -= x_own;
#pragma unroll
  for (int e = 0; e < B; ++e) {
    if (g_acc < remaining && remaining <= g_acc + g[e]) {
      const int bin = hi_bin - static_cast<int>(threadIdx.x) * B - e;
      *f = {prefix | (static_cast<uint32_t>(bin) << shift), remaining - g_acc, x_acc, x[e]};
    }
    g_acc += g[e];
    x_acc += x[e];
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

// C: CTAs per row, the cluster size of the launch (1, 2, 4 or 8).
template <int C>
__global__ void __launch_bounds__(kTopkThreads, 1)
    topk_cluster_kernel(const __grid_constant__ TopkArgs a) {
  constexpr bool kDsmem = C > 1;  // C == 1: the CTA histograms are the row's
  constexpr int kSlice1 = kBins1 / C, kSlice2 = kBins2 / C;  // cluster histogram bins per CTA
  static_assert(C >= 1 && C <= kMaxCtas && kBins2 % C == 0 && kSlice1 % 4 == 0,
                "pass 1 reads 4 bins of one CTA's slice with one 16-byte load");
  __shared__ int s_h1[2 * kCopy];  // this CTA's pass-1 histogram (two copies); pass 3 reuses it
  // This CTA's pass-2 histogram; the write phase reuses it for its packed (above, equal) per
  // segment, then their scan (s_seg). The sharing keeps C = 2 within 48 KB of static memory.
  __shared__ __align__(16) int s_h2[kBins2];
  // The cluster histograms (C > 1): this CTA's slice of the bins. Pass 3 keeps a column per CTA
  // in pass 1's space: its remote writes follow the pass-2 cluster barrier, which follows
  // every CTA's reads of pass 1's totals.
  __shared__ __align__(16) int s_g13[kDsmem ? (kSlice1 > kBins2 ? kSlice1 : kBins2) : 4];
  __shared__ __align__(16) int s_g2[kDsmem ? kSlice2 : 4];
  int* const s_g1 = s_g13;
  int* const s_g3 = s_g13;
  uint32_t* const s_seg = reinterpret_cast<uint32_t*>(s_h2);  // kSegs entries
  __shared__ int2 s_warp[kWarps];    // block_scan's warp totals
  __shared__ Found s_found;
  __shared__ int s_above12;         // this CTA's keys above T decided in passes 1, 2
  __shared__ int s_above_earlier;   // the same, summed over the CTAs before this one

  cg::cluster_group cluster = cg::this_cluster();
  const int rank = kDsmem ? static_cast<int>(cluster.block_rank()) : 0;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int row = blockIdx.y, b = row / a.hkv;
  const int len = clamp_int(a.cache_lens[b], 0, a.capacity);
  int32_t* out = a.indices + static_cast<int64_t>(row) * a.k;
  if (len <= a.k) {  // every valid position is selected (uniform over the cluster)
    if (rank == 0) {
      for (int i = tid; i < a.k; i += kTopkThreads) out[i] = i < len ? i : -1;
      if (tid == 0) a.counts[row] = len;
    }
    return;
  }

  for (int i = tid; i < 2 * kCopy; i += kTopkThreads) s_h1[i] = 0;
  s_h2[tid] = 0;
  if constexpr (kDsmem) {
    for (int i = tid; i < kSlice1; i += kTopkThreads) s_g1[i] = 0;
    if (tid < kSlice2) s_g2[tid] = 0;
    // Remote adds into s_g1 / s_g2 wait for this; s_g3 is fully overwritten, so never cleared.
    cluster.barrier_arrive();
  }

  const float* scores = a.scores + static_cast<int64_t>(row) * a.capacity;
  const int chunk = (len + C - 1) / C;
  const int begin = min(len, rank * chunk);
  const int n = min(len, begin + chunk) - begin;  // this CTA's positions [begin, begin + n)
  const int ntiles = max(1, (n + kTile - 1) / kTile);
  const int recent_begin = len - a.n_recent;
  // Tile t: key j of this thread is position t * kTile + j * kTopkThreads + tid, valid for j
  // below nvalid(t); warp w's keys j are the 32 consecutive positions of segment (j, w).
  auto nvalid = [&](int t) {
    const int rest = n - t * kTile - tid;
    return rest <= 0 ? 0 : min(kPer, (rest + kTopkThreads - 1) / kTopkThreads);
  };
  float raw[kPer];
  uint32_t keys[kPer];
  auto fetch = [&](int t) {
    const int nv = nvalid(t);
#pragma unroll
    for (int j = 0; j < kPer; ++j)
      raw[j] = j < nv ? __ldg(scores + begin + t * kTile + j * kTopkThreads + tid) : 0.f;
  };
  auto make_keys = [&](int t) {
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int p = begin + t * kTile + j * kTopkThreads + tid;
      keys[j] = (p < a.n_sink || p >= recent_begin) ? kForced : order_key(raw[j]);
    }
  };

  // Pass 1 (bits 31..20), counted while loading: all loads of a tile are in flight at once.
  fetch(0);
  __syncthreads();  // histograms cleared
  for (int t = 0; t < ntiles; ++t) {
    if (t > 0) fetch(t);
    make_keys(t);
    count_runs(keys, nvalid(t), s_h1 + (lane & 1) * kCopy,
               [](uint32_t key) { return static_cast<int>(key >> 20); });
  }
  __syncthreads();
  if constexpr (kDsmem) {
    cluster.barrier_wait();  // every CTA's s_g1 / s_g2 cleared
#pragma unroll
    for (int e = 0; e < kBins1 / kTopkThreads; ++e) {
      const int bin = tid + e * kTopkThreads;
      const int c = s_h1[bin] + s_h1[kCopy + bin];
      if (c > 0) atomicAdd(cluster.map_shared_rank(s_g1, bin / kSlice1) + bin % kSlice1, c);
    }
    cluster.sync();  // cluster histogram complete
  }
  {
    constexpr int B = kBins1 / kTopkThreads;
    const int lo = kBins1 - B * (tid + 1);  // this thread's bins: lo .. lo + B - 1
    int ls[B];
#pragma unroll
    for (int e = 0; e < B; ++e) ls[e] = s_h1[lo + B - 1 - e] + s_h1[kCopy + lo + B - 1 - e];
    if constexpr (kDsmem) {
      const int4 g = *reinterpret_cast<const int4*>(
          cluster.map_shared_rank(s_g1, lo / kSlice1) + lo % kSlice1);
      const int gs[B] = {g.w, g.z, g.y, g.x};
      find_bin(gs, ls, kBins1 - 1, a.k, 0u, 20, s_warp, &s_found);
    } else {
      find_bin(ls, ls, kBins1 - 1, a.k, 0u, 20, s_warp, &s_found);
    }
  }
  __syncthreads();
  uint32_t prefix = s_found.prefix;
  int remaining = s_found.remaining;
  int above = s_found.above;  // this CTA's keys above T so far

  // Pass 2 (bits 19..10) over the keys matching the 12-bit prefix.
  s_h1[tid] = 0;  // pass 3 counts into s_h1[0, 1024); the barriers of pass 2 order this
  for (int t = 0; t < ntiles; ++t) {
    if (ntiles > 1) {
      fetch(t);
      make_keys(t);
    }
    count_runs(keys, nvalid(t), s_h2, [prefix](uint32_t key) {
      return (key & 0xfff00000u) == prefix ? static_cast<int>((key >> 10) & 1023u) : -1;
    });
  }
  __syncthreads();
  if constexpr (kDsmem) {
    if (s_h2[tid] > 0)
      atomicAdd(cluster.map_shared_rank(s_g2, tid / kSlice2) + tid % kSlice2, s_h2[tid]);
    cluster.sync();
  }
  {
    const int bin = kBins2 - 1 - tid;
    const int ls[1] = {s_h2[bin]};
    if constexpr (kDsmem) {
      const int gs[1] = {cluster.map_shared_rank(s_g2, bin / kSlice2)[bin % kSlice2]};
      find_bin(gs, ls, kBins2 - 1, remaining, prefix, 10, s_warp, &s_found);
    } else {
      find_bin(ls, ls, kBins2 - 1, remaining, prefix, 10, s_warp, &s_found);
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
    count_runs(keys, nvalid(t), s_h1, [prefix](uint32_t key) {
      return (key & 0xfffffc00u) == prefix ? static_cast<int>(key & 1023u) : -1;
    });
  }
  __syncthreads();
  {
    const int bin = kBins2 - 1 - tid;
    int gs[1] = {0}, es[1] = {0};  // all CTAs, the CTAs before this one
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
#pragma unroll
      for (int r = 0; r < C; ++r) {
        gs[0] += c[r];
        es[0] += r < rank ? c[r] : 0;
      }
    } else {
      gs[0] = s_h1[bin];
    }
    find_bin(gs, es, kBins2 - 1, remaining, prefix, 0, s_warp, &s_found);
  }
  // Every remote read of this CTA is done; the matching wait keeps this CTA's shared memory
  // alive until the other CTAs have done theirs.
  if constexpr (kDsmem) cluster.barrier_arrive();
  __syncthreads();
  const uint32_t thresh = s_found.prefix;  // T, the k-th largest key of the row
  remaining = s_found.remaining;           // keys equal to T in the top k
  const int eq_earlier = s_found.equal;    // keys equal to T in the CTAs before this one
  const int offset = (kDsmem ? s_above_earlier : 0) + s_found.above + min(remaining, eq_earlier);
  const int tie_budget = max(0, remaining - eq_earlier);  // ties left to this CTA

  const uint32_t lt_mask = (1u << lane) - 1u;
  int above_carry = 0, equal_carry = 0;  // over earlier tiles of this CTA
  for (int t = 0; t < ntiles; ++t) {
    if (ntiles > 1) {
      fetch(t);
      make_keys(t);
    }
    const int nv = nvalid(t);
    uint32_t mine = 0;  // lane j: packed counts of segment (j, warp)
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const uint32_t gt = __ballot_sync(0xffffffffu, j < nv && keys[j] > thresh);
      const uint32_t eq = __ballot_sync(0xffffffffu, j < nv && keys[j] == thresh);
      if (lane == j) mine = (static_cast<uint32_t>(__popc(gt)) << 16) | __popc(eq);
    }
    if (lane < kPer) s_seg[lane * kWarps + warp] = mine;
    __syncthreads();
    const uint32_t seg = tid < kSegs ? s_seg[tid] : 0u;
    int above_incl = static_cast<int>(seg >> 16), equal_incl = static_cast<int>(seg & 0xffffu);
    const int2 tile_total = block_scan(above_incl, equal_incl, s_warp);
    if (tid < kSegs) s_seg[tid] = static_cast<uint32_t>(above_incl << 16 | equal_incl) - seg;
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const bool valid = j < nv;
      const uint32_t gt = __ballot_sync(0xffffffffu, valid && keys[j] > thresh);
      const uint32_t eq = __ballot_sync(0xffffffffu, valid && keys[j] == thresh);
      const uint32_t before = s_seg[j * kWarps + warp];
      const int above_before = above_carry + static_cast<int>(before >> 16);
      const int equal_before = equal_carry + static_cast<int>(before & 0xffffu);
      const bool sel = ((gt >> lane) & 1u) ||
                       (((eq >> lane) & 1u) && equal_before + __popc(eq & lt_mask) < tie_budget);
      const uint32_t sel_mask = __ballot_sync(0xffffffffu, sel);
      if (sel) {
        out[offset + above_before + min(equal_before, tie_budget) + __popc(sel_mask & lt_mask)] =
            begin + t * kTile + j * kTopkThreads + tid;
      }
    }
    above_carry += tile_total.x;
    equal_carry += tile_total.y;
    if (ntiles > 1) __syncthreads();  // s_seg and s_warp are rewritten by the next tile
  }
  if (rank == 0 && tid == 0) a.counts[row] = a.k;
  if constexpr (kDsmem) cluster.barrier_wait();  // pairs with the arrive after pass 3's reads
}

template <int C>
cudaError_t launch_ctas(const TopkArgs& a, cudaStream_t stream) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(C, a.batch * a.hkv);
  cfg.blockDim = dim3(kTopkThreads);
  cfg.stream = stream;
  cudaLaunchAttribute cluster[1];
  cluster[0].id = cudaLaunchAttributeClusterDimension;
  cluster[0].val.clusterDim.x = C;
  cluster[0].val.clusterDim.y = 1;
  cluster[0].val.clusterDim.z = 1;
  cfg.attrs = cluster;
  cfg.numAttrs = C > 1 ? 1 : 0;  // C == 1 uses no cluster operations: a plain launch
  return cudaLaunchKernelEx(&cfg, topk_cluster_kernel<C>, a);
}

}  // namespace

cudaError_t launch_topk(const TopkArgs& a, cudaStream_t stream) {
  // CTAs per row: the fewest (a power of two, so the histogram bins split evenly) that hold a
  // row of `capacity` scores in registers. cache_lens only bounds the rows by capacity on the
  // device; the kernel handles any length, this only picks the speed.
  const int64_t tiles = (static_cast<int64_t>(a.capacity) + kTile - 1) / kTile;
  if (tiles <= 1) return launch_ctas<1>(a, stream);
  if (tiles <= 2) return launch_ctas<2>(a, stream);
  if (tiles <= 4) return launch_ctas<4>(a, stream);
  return launch_ctas<kMaxCtas>(a, stream);
}

}  // namespace mage::cuda
