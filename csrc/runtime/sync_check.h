// MAGE_SYNC_CHECK=1 on CUDA: inside a generation, any host synchronisation other than the
// marked ones (the per-step "any [MASK] left" read, reading a finished block, graph capture,
// timing at block boundaries) raises an error, through c10's sync debug mode. This is how the
// GPU tests prove the loop free of hidden synchronisations. A no-op on the CPU or without CUDA.
#pragma once

#ifdef MAGE_WITH_CUDA
#include <c10/cuda/CUDAFunctions.h>
#endif

#include <cstdlib>
#include <cstring>

namespace mage::runtime {

#ifdef MAGE_WITH_CUDA
// Sets the sync debug mode for a scope and restores the previous one.
class SyncMode {
 public:
  explicit SyncMode(c10::cuda::SyncDebugMode mode) : prev_(c10::cuda::warning_state().get_sync_debug_mode()) {
    c10::cuda::warning_state().set_sync_debug_mode(mode);
  }
  ~SyncMode() { c10::cuda::warning_state().set_sync_debug_mode(prev_); }
  SyncMode(const SyncMode&) = delete;
  SyncMode& operator=(const SyncMode&) = delete;

 private:
  c10::cuda::SyncDebugMode prev_;
};

// Errors on synchronisations for a scope when MAGE_SYNC_CHECK=1 (and `cuda`).
class SyncCheck {
 public:
  explicit SyncCheck(bool cuda) {
    const char* env = std::getenv("MAGE_SYNC_CHECK");
    if (cuda && env && std::strcmp(env, "1") == 0)
      mode_ = new SyncMode(c10::cuda::SyncDebugMode::L_ERROR);
  }
  ~SyncCheck() { delete mode_; }
  SyncCheck(const SyncCheck&) = delete;
  SyncCheck& operator=(const SyncCheck&) = delete;

 private:
  SyncMode* mode_ = nullptr;
};

// A synchronisation the loop means to make. MAGE_SYNC_CHECK_STRICT=1 exempts none (the tests
// use it to show the check is live).
class AllowSync : public SyncMode {
 public:
  AllowSync() : SyncMode(strict() ? c10::cuda::warning_state().get_sync_debug_mode()
                                  : c10::cuda::SyncDebugMode::L_DISABLED) {}

 private:
  static bool strict() {
    const char* env = std::getenv("MAGE_SYNC_CHECK_STRICT");
    return env && std::strcmp(env, "1") == 0;
  }
};
#else
class SyncCheck {
 public:
  explicit SyncCheck(bool) {}
};
class AllowSync {
 public:
  AllowSync() {}
};
#endif

}  // namespace mage::runtime
