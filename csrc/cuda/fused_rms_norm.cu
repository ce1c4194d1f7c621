// Residual add + RMSNorm, one warp per row: h = x + residual (rounded to the dtype as torch's
// add), written to residual_out and kept in shared memory; the sum of squares of h in the order
// torch's mean uses (fused_common.cuh); out = weight * (h * rsqrt(mean + eps)).to(dtype). The
// same values as transformers' `residual + hidden` followed by Qwen2RMSNorm on the GPU.
//
// Each lane reads and writes its own 16-byte chunks of the row (pass 1) and of the output
// (pass 2), so residual_out may be the residual tensor itself and out may be x (in place).
#include <algorithm>

#include "cuda/fused_common.cuh"

namespace mage::cuda {
namespace {

template <typename T, bool kResidual>
__global__ void __launch_bounds__(128) rms_norm_kernel(const __grid_constant__ RmsNormArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * a.rows_per_cta + warp;
  if (row >= a.rows) return;  // the kernel synchronises warps only, never the CTA
  constexpr int E = kVec<T>;
  const int chunks = a.n / E;
  T* h_row = reinterpret_cast<T*>(smem) + static_cast<int64_t>(warp) * a.n;
  float* scratch = reinterpret_cast<float*>(reinterpret_cast<T*>(smem) +
                                            static_cast<int64_t>(a.rows_per_cta) * a.n) +
                   warp * a.order.threads;
  const int64_t offset = row * a.n;
  const T* x = static_cast<const T*>(a.x) + offset;
  const T* res = static_cast<const T*>(a.residual) + offset;
  T* res_out = static_cast<T*>(a.residual_out) + offset;
  T* out = static_cast<T*>(a.out) + offset;
  const T* weight = static_cast<const T*>(a.weight);

  for (int c = lane; c < chunks; c += 32) {
    Vec<T> h = load_vec(x + c * E);
    if constexpr (kResidual) {
      const Vec<T> r = load_vec(res + c * E);
#pragma unroll
      for (int j = 0; j < E; ++j) {
        h.v[j] = from_float<T>(__fadd_rn(to_float(r.v[j]), to_float(h.v[j])));
      }
    }
    store_vec(res_out + c * E, h);
    store_vec(h_row + c * E, h);
  }
  __syncwarp();

  const float inv = rms_inverse(torch_row_sum_sq(h_row, a.n, a.order, scratch), a.mean_factor,
                                a.eps);
  for (int c = lane; c < chunks; c += 32) {
    const Vec<T> h = load_vec(h_row + c * E);
    const Vec<T> w = load_vec(weight + c * E);
    Vec<T> o;
#pragma unroll
    for (int j = 0; j < E; ++j) {
      o.v[j] = from_float<T>(rms_apply<T>(to_float(h.v[j]), inv, to_float(w.v[j])));
    }
    store_vec(out + c * E, o);
  }
}

template <typename T>
cudaError_t launch_typed(const RmsNormArgs& a, cudaStream_t stream) {
  const int64_t smem = a.rows_per_cta * (static_cast<int64_t>(a.n) * sizeof(T) +
                                         (a.order.threads > 32 ? a.order.threads * 4 : 0));
  const auto kernel = a.residual != nullptr ? rms_norm_kernel<T, true> : rms_norm_kernel<T, false>;
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  const int64_t ctas = (a.rows + a.rows_per_cta - 1) / a.rows_per_cta;
  kernel<<<static_cast<unsigned>(ctas), 32 * a.rows_per_cta, smem, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_rms_norm(Dtype dtype, const RmsNormArgs& a, cudaStream_t stream) {
  return with_element_type(dtype,
                           [&](auto t) { return launch_typed<decltype(t)>(a, stream); });
}

}  // namespace mage::cuda
