// The device-side error record: what the CUDA kernels find wrong in input VALUES that the host
// cannot check without a synchronisation (cache lengths past the capacity, an append that does
// not fit, selected indices outside the cache, counts outside [0, k]). The CPU kernels check
// those values on the host (ops/checks.h) and raise at once.
//
// One record per device (a __device__ array in csrc/cuda/device_errors.cu), zero when clean.
// A kernel that finds a bad value skips the work the value would make out of bounds (see each
// code) and claims the record with one atomicCAS on its code word: the first error is kept,
// later ones are dropped until the record is read. torch.ops.mage.take_error(device) reads and
// clears it, torch.ops.mage.check_errors(device) raises with a message naming the op, sequence
// and value; both synchronise the device's current stream, so callers use them where they
// synchronise anyway (the generation loop: once per block). Flag writes are plain stores inside
// the kernels, so they are captured by and replayed with CUDA graphs.
//
// Plain C++ (no CUDA): included by the kernels (through cuda/kernel_args.h) and the host code.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace mage {

// What went wrong (the record's kCode word).
enum class DeviceError : int32_t {
  kNone = 0,
  // cache_lens[seq] = value is outside [0, capacity = limit]: the attention / top-k kernels
  // use the length clamped to that range (nothing is read out of bounds).
  kCacheLength = 1,
  // append_kv: cache_lens[seq] = value plus the block (slot = B) does not fit the capacity
  // (limit), or value < 0: nothing of this sequence is written.
  kAppendOverflow = 2,
  // sparse_attention: indices[seq, head, slot] = value is outside [0, capacity = limit): the
  // rows of (seq, head) are not computed (NaN) and the entry is not read.
  kSelectedIndex = 3,
  // sparse_attention: counts[seq, head] = value is outside [0, k = limit]: clamped to it.
  kCount = 4,
};

// Which op found it (the record's kOp word).
enum class DeviceErrorOp : int32_t {
  kNone = 0,
  kDenseAttention = 1,
  kAttentionWithScores = 2,
  kSparseAttention = 3,
  kTopkSelect = 4,
  kAppendKv = 5,
};

// The record: kErrorWords int32 words, indexed by these.
enum DeviceErrorField : int { kErrCode = 0, kErrOp, kErrSeq, kErrHead, kErrSlot, kErrValue,
                              kErrLimit };
constexpr int kErrorWords = 8;

// Where a kernel reports (set by the host launcher): the device's record and the op.
struct ErrorSink {
  int32_t* record = nullptr;
  int32_t op = 0;  // a DeviceErrorOp
};

// "mage.sparse_attention: sequence 1, KV head 0: indices[1, 0, 3] = 70 is outside the cache
// [0, capacity=64); ..." for a record read by take_error (empty string for a clean one).
std::string describe_device_error(const std::vector<int64_t>& record);

// CUDA builds install the reader of a device's record (csrc/cuda/device_error_reader.cpp): returns
// the record (kErrorWords values) and clears it, or an empty vector when it is clean.
using DeviceErrorReader = std::vector<int64_t> (*)(int device_index);
void set_cuda_error_reader(DeviceErrorReader reader);

}  // namespace mage
