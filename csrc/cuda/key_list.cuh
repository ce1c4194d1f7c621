// The key list one (sequence, KV head) attends to: its cache keys (a dense prefix, or the
// selected indices) followed by the block's own B keys. Shared by every attention kernel; and
// the scores kernels' cache split.
#pragma once

#include "cuda/device_utils.cuh"

namespace mage::cuda {

template <typename T, bool kSparse>
struct KeyList {
  const T* k_cache;
  const T* v_cache;
  const T* k_block;
  const T* v_block;
  const int32_t* indices;
  int n_cache;  // cache keys in the list
  int n_total;  // n_cache + B
  int capacity;
  int dim;
  int kmax;  // sparse: entries per indices row

  MAGE_DEVICE KeyList(const AttentionArgs& a, int b, int h) {
    const int64_t cache_off = b * a.cache_stride_b + h * a.cache_stride_h;
    const int64_t block_off = (static_cast<int64_t>(b) * a.hkv + h) * a.block * a.dim;
    k_cache = static_cast<const T*>(a.k_cache) + cache_off;
    v_cache = static_cast<const T*>(a.v_cache) + cache_off;
    k_block = static_cast<const T*>(a.k_block) + block_off;
    v_block = static_cast<const T*>(a.v_block) + block_off;
    capacity = a.capacity;
    dim = a.dim;
    kmax = a.kmax;
    if constexpr (kSparse) {
      indices = a.indices + (static_cast<int64_t>(b) * a.hkv + h) * a.kmax;
      n_cache = clamp_int(a.counts[b * a.hkv + h], 0, a.kmax);
    } else {
      indices = nullptr;
      // Lengths are not validated on the GPU (no host sync): clamp so nothing reads past.
      n_cache = clamp_int(a.cache_lens[b], 0, a.capacity);
    }
    n_total = n_cache + a.block;
  }

  // The cache position of list entry v as far as the indices know it (sparse; dense: v). It
  // does not look at the key count, so the load can be issued before the count arrives
  // (entries past the count are read but never used); asm volatile keeps it where it is
  // written instead of next to its first use.
  MAGE_DEVICE int load_position(int v) const {
    int pos = v;
    if constexpr (kSparse) {
      if (v < kmax) asm volatile("ld.global.nc.s32 %0, [%1];\n" : "=r"(pos) : "l"(indices + v));
    }
    return pos;
  }

  // Offset (in elements) of key v's row in its cache or block tensor, `pos` being
  // load_position(v); `in_block` says which tensor. An out-of-range selected index reads row 0
  // and raises `bad` (the output becomes NaN; report_key_list_errors records it).
  MAGE_DEVICE int64_t row_offset(int v, int pos, bool& in_block, bool& bad) const {
    in_block = v >= n_cache;
    if (in_block) return static_cast<int64_t>(v - n_cache) * dim;
    if (kSparse && (pos < 0 || pos >= capacity)) {
      bad = true;
      pos = 0;
    }
    return static_cast<int64_t>(pos) * dim;
  }
  MAGE_DEVICE int64_t row_offset(int v, bool& in_block, bool& bad) const {
    const int pos = kSparse && v < n_cache ? __ldg(indices + v) : v;
    return row_offset(v, pos, in_block, bad);
  }
};

// After a CTA's key loop, one of its threads: reports what was out of range in the key list of
// (sequence b, KV head h) to the device's error record (ops/device_errors.h). `first`: the first
// CTA of (b, h), which checks the length (dense; KV head 0 only) or the count (sparse);
// `poisoned`: the loop met a selected index outside the cache, found again here by a scan (an
// error path: the loop itself keeps only a flag). Lengths and counts are re-read rather than
// kept from the KeyList, so nothing stays live across the loop for this.
template <bool kSparse>
MAGE_DEVICE void report_key_list_errors(const AttentionArgs& a, int b, int h, bool first,
                                        bool poisoned) {
  if (!first && !poisoned) return;  // the usual case: nothing to read
  const int64_t row = static_cast<int64_t>(b) * a.hkv + h;
  if constexpr (kSparse) {
    const int given = a.counts[row];
    if (given < 0 || given > a.kmax) {
      // Every CTA of (b, h) names the count, the cause: a count past k makes the loop read the
      // -1 padding, which would otherwise race the first CTA's report as a bad index.
      report_error(a.err, DeviceError::kCount, b, h, 0, given, a.kmax);
      return;
    }
    if (!poisoned) return;
    const int32_t* indices = a.indices + row * a.kmax;
    for (int i = 0; i < given; ++i) {
      const int pos = indices[i];
      if (pos < 0 || pos >= a.capacity) {
        report_error(a.err, DeviceError::kSelectedIndex, b, h, i, pos, a.capacity);
        return;
      }
    }
  } else if (h == 0) {  // the length is per sequence: checked once
    const int given = a.cache_lens[b];
    if (given < 0 || given > a.capacity) {
      report_error(a.err, DeviceError::kCacheLength, b, -1, 0, given, a.capacity);
    }
  }
}

// What one scores CTA of grid (splits, Hkv, batch) works on: keys [range_begin, k_end) of KV
// head h of sequence b (empty when the sequence ends before this split), whose scores row is
// `scores`. The constructor writes score 0 at the split's positions past the sequence's length
// (every thread of the CTA calls it, tid of n_threads).
struct ScoresSplit {
  int h, b;
  float* scores;
  int range_begin, k_end;

  MAGE_DEVICE ScoresSplit(const ScoresArgs& a, int tid, int n_threads)
      : h(blockIdx.y), b(blockIdx.z),
        scores(a.scores + (static_cast<int64_t>(b) * a.hkv + h) * a.capacity),
        range_begin(blockIdx.x * a.keys_per_split) {
    const int n_cache = clamp_int(a.cache_lens[b], 0, a.capacity);
    const int range_end = min(a.capacity, range_begin + a.keys_per_split);
    for (int j = max(range_begin, n_cache) + tid; j < range_end; j += n_threads) scores[j] = 0.f;
    k_end = min(n_cache, range_end);
  }
};

}  // namespace mage::cuda
