// Host side of the per-device error record (ops/device_errors.h): its address per device, for
// the launchers, and the reader behind torch.ops.mage.take_error / check_errors on CUDA.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <atomic>

#include "cuda/kernel_args.h"

namespace mage::cuda {
namespace {

constexpr int kMaxDevices = 64;
// Each device's record address once a launcher asked for it; null: no MAGE kernel has run on
// that device, so its record is clean.
std::atomic<int32_t*> g_records[kMaxDevices];

int current_device() {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  return device;
}

std::vector<int64_t> read_and_clear(int device) {
  if (device < 0) device = current_device();
  if (device >= kMaxDevices) return {};
  int32_t* record = g_records[device].load(std::memory_order_acquire);
  if (record == nullptr) return {};
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(device);
  cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capturing));
  TORCH_CHECK(capturing == cudaStreamCaptureStatusNone,
              "mage.check_errors / take_error: cuda:", device,
              "'s current stream is capturing a CUDA graph; read the error record after the "
              "capture (it synchronises the stream)");
  int32_t host[kErrorWords];
  C10_CUDA_CHECK(cudaMemcpyAsync(host, record, sizeof(host), cudaMemcpyDeviceToHost, stream));
  C10_CUDA_CHECK(cudaStreamSynchronize(stream));
  if (host[kErrCode] == 0) return {};
  C10_CUDA_CHECK(cudaMemsetAsync(record, 0, sizeof(host), stream));
  return std::vector<int64_t>(host, host + kErrorWords);
}

const bool g_installed = (set_cuda_error_reader(&read_and_clear), true);

}  // namespace

int32_t* device_error_record() {
  const int device = current_device();
  TORCH_CHECK(device < kMaxDevices, "mage: device index ", device, " is past the ", kMaxDevices,
              " devices the error records are kept for");
  int32_t* record = g_records[device].load(std::memory_order_acquire);
  if (record != nullptr) return record;
  // First launch on this device (possibly under graph capture: the lookup may load the module,
  // which a global-mode capture forbids, so this thread relaxes the mode for the call).
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  C10_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));
  const cudaError_t err = error_record_address(&record);
  C10_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));
  C10_CUDA_CHECK(err);
  g_records[device].store(record, std::memory_order_release);
  return record;
}

}  // namespace mage::cuda
