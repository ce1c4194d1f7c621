// take_error / check_errors (schemas in registration.cpp): the device-side error record of
// ops/device_errors.h, read through the reader a CUDA build installs. CPU devices, and builds
// without the CUDA kernels, have no record: always clean.
#include "ops/device_errors.h"

#include <torch/library.h>

#include <atomic>
#include <sstream>

namespace mage {
namespace {

std::atomic<DeviceErrorReader> g_cuda_reader{nullptr};

const char* op_name(int64_t op) {
  switch (static_cast<DeviceErrorOp>(op)) {
    case DeviceErrorOp::kDenseAttention: return "mage.dense_attention";
    case DeviceErrorOp::kAttentionWithScores: return "mage.attention_with_scores";
    case DeviceErrorOp::kSparseAttention: return "mage.sparse_attention";
    case DeviceErrorOp::kTopkSelect: return "mage.topk_select";
    case DeviceErrorOp::kAppendKv: return "mage.append_kv";
    default: return "mage (unknown op)";
  }
}

std::vector<int64_t> take_error(c10::Device device) {
  if (!device.is_cuda()) return {};
  const DeviceErrorReader reader = g_cuda_reader.load();
  if (reader == nullptr) return {};  // no CUDA kernels in this build: nothing ran there
  return reader(device.has_index() ? device.index() : -1);
}

void check_errors(c10::Device device) {
  const auto record = take_error(device);
  TORCH_CHECK(record.empty(), describe_device_error(record), " [found on ", device,
              " by a kernel; reported at the first check after it ran]");
}

}  // namespace

void set_cuda_error_reader(DeviceErrorReader reader) { g_cuda_reader.store(reader); }

std::string describe_device_error(const std::vector<int64_t>& r) {
  if (r.size() < kErrorWords || r[kErrCode] == 0) return "";
  std::ostringstream s;
  const int64_t seq = r[kErrSeq], head = r[kErrHead], slot = r[kErrSlot];
  const int64_t value = r[kErrValue], limit = r[kErrLimit];
  s << op_name(r[kErrOp]) << ": sequence " << seq;
  switch (static_cast<DeviceError>(r[kErrCode])) {
    case DeviceError::kCacheLength:
      s << ": cache_lens[" << seq << "] = " << value << " is outside [0, capacity=" << limit
        << "]; the kernels used it clamped to that range";
      break;
    case DeviceError::kAppendOverflow:
      s << ": cache_lens[" << seq << "] = " << value << " plus the block (B=" << slot
        << ") does not fit the cache capacity " << limit
        << " (expected 0 <= cache_lens[b] + B <= capacity); nothing was written for this "
           "sequence";
      break;
    case DeviceError::kSelectedIndex:
      s << ", KV head " << head << ": indices[" << seq << ", " << head << ", " << slot
        << "] = " << value << " is outside the cache (expected 0 <= index < capacity=" << limit
        << "); the rows of this head were not computed (NaN)";
      break;
    case DeviceError::kCount:
      s << ", KV head " << head << ": counts[" << seq << ", " << head << "] = " << value
        << " is outside [0, k=" << limit << "]; it was clamped to that range";
      break;
    default:
      s << ": unknown device error code " << r[kErrCode] << " (value " << value << ")";
  }
  return s.str();
}

TORCH_LIBRARY_IMPL(mage, CompositeExplicitAutograd, m) {
  m.impl("take_error", &take_error);
  m.impl("check_errors", &check_errors);
}

}  // namespace mage
