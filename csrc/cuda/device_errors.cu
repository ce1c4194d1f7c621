// The per-device error record (ops/device_errors.h): a __device__ array, so each device's
// context has its own copy, zeroed when the module loads. Kernels get its address in their
// arguments (ErrorSink); device_error_reader.cpp reads and clears it.
#include "cuda/kernel_args.h"

namespace mage::cuda {
namespace {

__device__ int32_t g_error_record[kErrorWords];

}  // namespace

cudaError_t error_record_address(int32_t** address) {
  return cudaGetSymbolAddress(reinterpret_cast<void**>(address), g_error_record);
}

}  // namespace mage::cuda
