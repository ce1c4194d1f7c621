#include "cuda/tma_maps.h"

#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled_v12000
#include <cuda_runtime_api.h>

#include "ops/launch_plan.h"  // kKeyTile

namespace mage::cuda {
namespace {

using EncodeTiled = PFN_cuTensorMapEncodeTiled_v12000;

// The driver's cuTensorMapEncodeTiled through the runtime (no link against libcuda); null
// when the driver predates it.
EncodeTiled encoder() {
  static const EncodeTiled fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault,
                                         &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      cudaGetLastError();  // not sticky; clear it for the callers' error checks
      return EncodeTiled{nullptr};
    }
    return reinterpret_cast<EncodeTiled>(p);
  }();
  return fn;
}

}  // namespace

bool encode_cache_map(CUtensorMap* map, const void* base, int64_t batch, int64_t hkv,
                      int64_t capacity, int64_t dim, int64_t stride_b, int64_t stride_h) {
  const EncodeTiled encode = encoder();
  if (encode == nullptr) return false;
  constexpr int64_t kBytes = 2;  // 16-bit elements (a plain copy: the type does not matter)
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(dim), static_cast<cuuint64_t>(capacity),
                              static_cast<cuuint64_t>(hkv), static_cast<cuuint64_t>(batch)};
  const cuuint64_t strides[3] = {static_cast<cuuint64_t>(dim * kBytes),
                                 static_cast<cuuint64_t>(stride_h * kBytes),
                                 static_cast<cuuint64_t>(stride_b * kBytes)};
  const cuuint32_t box[4] = {64, static_cast<cuuint32_t>(kKeyTile), 1, 1};
  const cuuint32_t unit[4] = {1, 1, 1, 1};
  return encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT16, 4, const_cast<void*>(base), dims, strides,
                box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

}  // namespace mage::cuda
