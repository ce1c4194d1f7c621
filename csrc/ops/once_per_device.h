// Setup that belongs to one device's context (a kernel's shared-memory attribute, ...), done
// once per device and remembered only when it succeeded: a failed attempt (or one on a device
// not seen before) runs again at the next launch instead of being cached for the process. Plain
// C++ without CUDA, so it is unit-tested on every machine (tests/cpp/test_once_per_device.cpp);
// csrc/cuda/launch_tc.cuh uses it.
#pragma once

#include <atomic>
#include <cstdint>

namespace mage::cuda {

class OncePerDevice {
 public:
  static constexpr int kMaxDevices = 64;

  // Runs fn() unless it already returned success (a value-initialised result: cudaSuccess, 0)
  // on `device`; returns fn()'s result, or success when it was skipped. Devices past
  // kMaxDevices run fn() every time. Thread-safe: racing first calls may both run fn().
  template <typename Fn>
  auto run(int device, Fn&& fn) -> decltype(fn()) {
    using Result = decltype(fn());
    if (device < 0 || device >= kMaxDevices) return fn();
    const uint64_t bit = uint64_t{1} << device;
    if (done_.load(std::memory_order_acquire) & bit) return Result{};
    const Result result = fn();
    if (result == Result{}) done_.fetch_or(bit, std::memory_order_acq_rel);
    return result;
  }

  bool done(int device) const {
    return device >= 0 && device < kMaxDevices &&
           (done_.load(std::memory_order_acquire) >> device & 1);
  }

 private:
  std::atomic<uint64_t> done_{0};
};

}  // namespace mage::cuda
