// Appends a block's keys/values to the cache at each sequence's current length. A sequence whose
// block does not fit (cache_lens[b] < 0 or cache_lens[b] + B > capacity; the host checks lengths
// only on the CPU: no sync) gets nothing written and raises the device error record.
#include "cuda/device_utils.cuh"

namespace mage::cuda {
namespace {

__global__ void append_kernel(const __grid_constant__ AppendArgs a) {
  const int i = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int len = a.cache_lens[b];
  if (len < 0 || len > a.capacity - a.block) {
    if (i == 0 && h == 0 && threadIdx.x == 0) {
      report_error(a.err, DeviceError::kAppendOverflow, b, -1, a.block, len, a.capacity);
    }
    return;
  }
  const int pos = len + i;
  const int64_t dst = b * a.cache_stride_b_bytes + h * a.cache_stride_h_bytes +
                      static_cast<int64_t>(pos) * a.row_bytes;
  const int64_t src = ((static_cast<int64_t>(b) * a.hkv + h) * a.block + i) * a.row_bytes;
  const auto* ks = static_cast<const char*>(a.k_block) + src;
  const auto* vs = static_cast<const char*>(a.v_block) + src;
  auto* kd = static_cast<char*>(a.k_cache) + dst;
  auto* vd = static_cast<char*>(a.v_cache) + dst;
  if (a.vec16) {  // the usual case
    for (int c = threadIdx.x; c < a.row_bytes / 16; c += blockDim.x) {
      reinterpret_cast<uint4*>(kd)[c] = reinterpret_cast<const uint4*>(ks)[c];
      reinterpret_cast<uint4*>(vd)[c] = reinterpret_cast<const uint4*>(vs)[c];
    }
  } else {
    for (int c = threadIdx.x; c < a.row_bytes / 2; c += blockDim.x) {
      reinterpret_cast<uint16_t*>(kd)[c] = reinterpret_cast<const uint16_t*>(ks)[c];
      reinterpret_cast<uint16_t*>(vd)[c] = reinterpret_cast<const uint16_t*>(vs)[c];
    }
  }
}

}  // namespace

cudaError_t launch_append(const AppendArgs& a, cudaStream_t stream) {
  const dim3 grid(a.block, a.hkv, a.batch);
  append_kernel<<<grid, 32, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace mage::cuda
