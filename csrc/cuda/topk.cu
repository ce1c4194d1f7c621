// Top-k selection per (sequence, KV head): one CTA runs a 4-pass radix select (8 bits a pass)
// over the order-preserving integer keys of the scores to find the k-th largest key, then
// writes the selected positions in index order (so the output is ascending) with a block-wide
// scan; ties at the threshold go to the earliest positions, as on the CPU.
#include <cub/block/block_scan.cuh>

#include <cmath>

#include "cuda/device_utils.cuh"

namespace mage::cuda {
namespace {

constexpr int kTopkThreads = 512;
constexpr int kTopkWarps = kTopkThreads / 32;
constexpr uint32_t kForced = 0xffffffffu;  // sinks and recents: above every real score

// Monotone float -> uint32 (larger float, larger key); NaN ranks lowest.
MAGE_DEVICE uint32_t order_key(float x) {
  if (isnan(x)) return 0u;
  const uint32_t u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__global__ void __launch_bounds__(kTopkThreads) topk_kernel(const __grid_constant__ TopkArgs a) {
  using Scan = cub::BlockScan<int, kTopkThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ int hist[kTopkWarps][256];
  __shared__ int bins[256];
  __shared__ uint32_t s_prefix;
  __shared__ int s_remaining;

  const int tid = threadIdx.x, warp = tid >> 5;
  const int bh = blockIdx.x, b = bh / a.hkv;
  const int len = clamp_int(a.cache_lens[b], 0, a.capacity);
  int32_t* out = a.indices + static_cast<int64_t>(bh) * a.k;
  if (len <= a.k) {
    for (int i = tid; i < a.k; i += kTopkThreads) out[i] = i < len ? i : -1;
    if (tid == 0) a.counts[bh] = len;
    return;
  }
  const float* scores = a.scores + static_cast<int64_t>(bh) * a.capacity;
  const int recent_begin = len - a.n_recent;
  auto key_of = [&](int j) {
    return (j < a.n_sink || j >= recent_begin) ? kForced : order_key(scores[j]);
  };

  uint32_t prefix = 0, mask = 0;
  int remaining = a.k;  // how many of the keys matching `prefix` still belong to the top k
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = tid; i < kTopkWarps * 256; i += kTopkThreads) (&hist[0][0])[i] = 0;
    __syncthreads();
    for (int j = tid; j < len; j += kTopkThreads) {
      const uint32_t key = key_of(j);
      if ((key & mask) == prefix) atomicAdd(&hist[warp][(key >> shift) & 255u], 1);
    }
    __syncthreads();
    for (int bin = tid; bin < 256; bin += kTopkThreads) {
      int total = 0;
      for (int w = 0; w < kTopkWarps; ++w) total += hist[w][bin];
      bins[bin] = total;
    }
    __syncthreads();
    if (tid == 0) {
      int above = 0;
      for (int bin = 255; bin >= 0; --bin) {
        if (above + bins[bin] >= remaining) {
          s_prefix = prefix | (static_cast<uint32_t>(bin) << shift);
          s_remaining = remaining - above;
          break;
        }
        above += bins[bin];
      }
    }
    __syncthreads();
    prefix = s_prefix;
    remaining = s_remaining;
    mask |= 255u << shift;
  }

  // `prefix` is now the k-th largest key: take every key above it and the first `remaining`
  // keys equal to it, in position order.
  int written = 0, equal_seen = 0;
  for (int base = 0; base < len; base += kTopkThreads) {
    const int j = base + tid;
    const uint32_t key = j < len ? key_of(j) : 0u;
    const int above = j < len && key > prefix;
    const int equal = j < len && key == prefix;
    int equal_rank, equal_total;
    Scan(scan_storage).ExclusiveSum(equal, equal_rank, equal_total);
    __syncthreads();
    const int take = above || (equal && equal_seen + equal_rank < remaining);
    int slot, taken;
    Scan(scan_storage).ExclusiveSum(take, slot, taken);
    __syncthreads();
    if (take) out[written + slot] = j;
    written += taken;
    equal_seen += equal_total;
  }
  if (tid == 0) a.counts[bh] = a.k;
}

}  // namespace

cudaError_t launch_topk(const TopkArgs& a, cudaStream_t stream) {
  topk_kernel<<<a.batch * a.hkv, kTopkThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace mage::cuda
