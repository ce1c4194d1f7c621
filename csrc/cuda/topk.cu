// Top-k selection per (sequence, KV head) = one "row" of scores.
//
// One thread-block cluster of 8 CTAs per row (Hopper distributed shared memory): CTA r holds
// the order-preserving integer keys of the r-th eighth of the row in shared memory (rows up to
// 8 x 16K = 128K positions stay resident; longer rows re-read global memory each pass). A 4-pass
// radix select (8 bits a pass; histograms summed across the cluster through DSMEM) finds the
// k-th largest key; then each CTA writes its selected positions in index order at an offset
// given by the counts of the CTAs before it, so the output is ascending. Ties at the threshold
// go to the earliest positions and NaN ranks lowest, exactly as the CPU kernel does.
#include <cooperative_groups.h>
#include <cub/block/block_scan.cuh>

#include <cmath>

#include "cuda/device_utils.cuh"

namespace mage::cuda {
namespace {

namespace cg = cooperative_groups;

constexpr int kClusterCtas = 8;
constexpr int kTopkThreads = 1024;
constexpr int kResident = 16384;            // keys per CTA kept in shared memory (64 KB)
constexpr uint32_t kForced = 0xffffffffu;  // sinks and recents: above every real score

// Monotone float -> uint32 (larger float, larger key); NaN ranks lowest.
MAGE_DEVICE uint32_t order_key(float x) {
  if (isnan(x)) return 0u;
  const uint32_t u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__global__ void __cluster_dims__(kClusterCtas, 1, 1) __launch_bounds__(kTopkThreads, 1)
    topk_cluster_kernel(const __grid_constant__ TopkArgs a) {
  using Scan = cub::BlockScan<int, kTopkThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  extern __shared__ uint32_t s_keys[];  // [kResident], dynamic (over the 48 KB static limit)
  __shared__ int s_hist[256];   // this CTA's histogram of the current pass
  __shared__ int s_warp_sum[8];  // scan of the cluster's histogram: per-warp totals
  __shared__ int s_counts[2];  // this CTA's keys above / equal to the threshold
  __shared__ uint32_t s_prefix;
  __shared__ int s_remaining;

  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int tid = threadIdx.x;
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

  const float* scores = a.scores + static_cast<int64_t>(row) * a.capacity;
  const int chunk = (len + kClusterCtas - 1) / kClusterCtas;
  const int begin = min(len, rank * chunk);
  const int n = min(len, begin + chunk) - begin;  // this CTA's positions [begin, begin + n)
  const bool resident = n <= kResident;
  const int recent_begin = len - a.n_recent;
  auto key_from_global = [&](int i) {
    const int j = begin + i;
    return (j < a.n_sink || j >= recent_begin) ? kForced : order_key(scores[j]);
  };
  if (resident) {
    for (int i = tid; i < n; i += kTopkThreads) s_keys[i] = key_from_global(i);
  }
  auto key_at = [&](int i) { return resident ? s_keys[i] : key_from_global(i); };

  uint32_t prefix = 0, mask = 0;
  int remaining = a.k;  // keys matching `prefix` that still belong to the top k
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = tid; i < 256; i += kTopkThreads) s_hist[i] = 0;
    __syncthreads();
    // Run-length aggregation per thread: the scores crowd into few bins (most of all in the
    // first pass), so consecutive keys of a thread usually share one; one atomic per run.
    uint32_t run_bin = 0;
    int run = 0;
    for (int i = tid; i < n; i += kTopkThreads) {
      const uint32_t key = key_at(i);
      if ((key & mask) != prefix) continue;
      const uint32_t bin = (key >> shift) & 255u;
      if (run > 0 && bin != run_bin) {
        atomicAdd(&s_hist[run_bin], run);
        run = 0;
      }
      run_bin = bin;
      ++run;
    }
    if (run > 0) atomicAdd(&s_hist[run_bin], run);
    cluster.sync();  // every CTA's histogram is complete
    // The bin holding the remaining-th largest key, found by 256 threads at once (a serial
    // loop on one thread cost ~5 us a pass with 1023 threads waiting at the barrier): thread t
    // owns bin 255 - t, so an inclusive scan over t counts the keys in this bin and above.
    int total = 0, incl = 0;
    if (tid < 256) {
      for (int r = 0; r < kClusterCtas; ++r) total += cluster.map_shared_rank(s_hist, r)[255 - tid];
      incl = total;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int v = __shfl_up_sync(0xffffffffu, incl, o);
        if ((tid & 31) >= o) incl += v;
      }
      if ((tid & 31) == 31) s_warp_sum[tid >> 5] = incl;
    }
    cluster.sync();  // remote reads done before anyone clears its histogram; warp sums visible
    if (tid < 256) {
      for (int w = 0; w < (tid >> 5); ++w) incl += s_warp_sum[w];
      const int excl = incl - total;  // keys in the bins above this one
      if (excl < remaining && remaining <= incl) {  // exactly one bin
        s_prefix = prefix | (static_cast<uint32_t>(255 - tid) << shift);
        s_remaining = remaining - excl;
      }
    }
    __syncthreads();
    prefix = s_prefix;
    remaining = s_remaining;
    mask |= 255u << shift;
    __syncthreads();
  }

  // `prefix` is the k-th largest key of the row. Each thread owns a contiguous run of
  // positions so that block scans give index order.
  const int per = (n + kTopkThreads - 1) / kTopkThreads;
  const int my_begin = min(n, tid * per), my_end = min(n, my_begin + per);
  int above = 0, equal = 0;
  for (int i = my_begin; i < my_end; ++i) {
    const uint32_t key = key_at(i);
    above += key > prefix;
    equal += key == prefix;
  }
  int above_before, above_total, equal_before, equal_total;
  Scan(scan_storage).ExclusiveSum(above, above_before, above_total);
  __syncthreads();
  Scan(scan_storage).ExclusiveSum(equal, equal_before, equal_total);
  if (tid == 0) {
    s_counts[0] = above_total;
    s_counts[1] = equal_total;
  }
  cluster.sync();
  // Offsets from the CTAs before this one: their keys above, and the ties they take (ties go
  // to the earliest positions, so CTA r takes what is left after CTAs 0..r-1).
  int offset = 0, equal_earlier = 0;
  for (int r = 0; r < rank; ++r) {
    const int* c = cluster.map_shared_rank(s_counts, r);
    const int takes = max(0, min(c[1], remaining - equal_earlier));
    offset += c[0] + takes;
    equal_earlier += c[1];
  }
  cluster.sync();  // remote reads done: CTAs may now exit
  // Within this CTA: thread order = index order.
  int take = 0, ties_left = remaining - equal_earlier - equal_before;
  for (int i = my_begin; i < my_end; ++i) {
    const uint32_t key = key_at(i);
    if (key > prefix) {
      ++take;
    } else if (key == prefix && ties_left > 0) {
      ++take;
      --ties_left;
    }
  }
  __syncthreads();
  int slot, taken;
  Scan(scan_storage).ExclusiveSum(take, slot, taken);
  int pos = offset + slot;
  ties_left = remaining - equal_earlier - equal_before;
  for (int i = my_begin; i < my_end; ++i) {
    const uint32_t key = key_at(i);
    const bool sel = key > prefix || (key == prefix && ties_left-- > 0);
    if (sel) out[pos++] = begin + i;
  }
  if (rank == 0 && tid == 0) a.counts[row] = a.k;
}

}  // namespace

cudaError_t launch_topk(const TopkArgs& a, cudaStream_t stream) {
  constexpr int smem = kResident * sizeof(uint32_t);
  static const cudaError_t attr = cudaFuncSetAttribute(
      topk_cluster_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (attr != cudaSuccess) return attr;
  const dim3 grid(kClusterCtas, a.batch * a.hkv);
  topk_cluster_kernel<<<grid, kTopkThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace mage::cuda
