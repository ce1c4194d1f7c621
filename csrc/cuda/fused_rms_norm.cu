// Residual add + RMSNorm, one CTA per row: h = x + residual (rounded to the dtype as torch's
// add), written to residual_out and kept in shared memory; the sum of squares of h in the order
// torch's mean uses, by the first warp (fused_common.cuh); out = weight * (h * rsqrt(mean +
// eps)).to(dtype). The same values as transformers' `residual + hidden` followed by
// Qwen2RMSNorm on the GPU.
//
// Each thread reads and writes its own 16-byte chunks of the row (pass 1) and of the output
// (pass 2), so residual_out may be the residual tensor itself and out may be x (in place). The
// chunks are handled kUnroll at a time, all loads first: the stores between them could alias the
// next loads, so the compiler would otherwise wait for each load in turn. The launch gives each
// thread at most kUnroll chunks up to 16384 bf16 elements, so x, residual and weight are read in
// one round trip.
#include <algorithm>

#include "cuda/fused_common.cuh"

namespace mage::cuda {
namespace {

constexpr int kUnroll = 4;

template <typename T, bool kResidual>
__global__ void __launch_bounds__(kMaxRmsThreads)
    rms_norm_kernel(const __grid_constant__ RmsNormArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float inv_shared;
  constexpr int E = kVec<T>;
  const int chunks = a.n / E;
  const int threads = blockDim.x;
  T* h_row = reinterpret_cast<T*>(smem);
  float* scratch = reinterpret_cast<float*>(h_row + a.n);  // a.order.threads floats if > 32
  const int64_t offset = static_cast<int64_t>(blockIdx.x) * a.n;
  const T* x = static_cast<const T*>(a.x) + offset;
  const T* res = static_cast<const T*>(a.residual) + offset;
  T* res_out = static_cast<T*>(a.residual_out) + offset;
  T* out = static_cast<T*>(a.out) + offset;
  const T* weight = static_cast<const T*>(a.weight);

  // The weight chunks of the first pass-2 round, loaded with the row: one memory round trip.
  Vec<T> w_first[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int c = threadIdx.x + u * threads;
    if (c < chunks) w_first[u] = load_vec(weight + c * E);
  }

  for (int base = threadIdx.x; base < chunks; base += kUnroll * threads) {
    Vec<T> h[kUnroll], r[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = base + u * threads;
      if (c < chunks) {
        h[u] = load_vec(x + c * E);
        if constexpr (kResidual) r[u] = load_vec(res + c * E);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = base + u * threads;
      if (c >= chunks) break;
      if constexpr (kResidual) {
#pragma unroll
        for (int j = 0; j < E; ++j) {
          h[u].v[j] = from_float<T>(__fadd_rn(to_float(r[u].v[j]), to_float(h[u].v[j])));
        }
      }
      store_vec(res_out + c * E, h[u]);
      store_vec(h_row + c * E, h[u]);
    }
  }
  __syncthreads();
  if (threadIdx.x < 32) {
    const float sum = torch_row_sum_sq(h_row, a.n, a.order, scratch);
    if (threadIdx.x == 0) inv_shared = rms_inverse(sum, a.mean_factor, a.eps);
  }
  __syncthreads();
  const float inv = inv_shared;

  for (int base = threadIdx.x; base < chunks; base += kUnroll * threads) {
    Vec<T> w[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = base + u * threads;
      if (base == threadIdx.x) {
        w[u] = w_first[u];
      } else if (c < chunks) {
        w[u] = load_vec(weight + c * E);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = base + u * threads;
      if (c >= chunks) break;
      const Vec<T> h = load_vec(h_row + c * E);
      Vec<T> o;
#pragma unroll
      for (int j = 0; j < E; ++j) {
        o.v[j] = from_float<T>(rms_apply<T>(to_float(h.v[j]), inv, to_float(w[u].v[j])));
      }
      store_vec(out + c * E, o);
    }
  }
}

template <typename T>
cudaError_t launch_typed(const RmsNormArgs& a, cudaStream_t stream) {
  const int64_t smem = static_cast<int64_t>(a.n) * sizeof(T) +
                       (a.order.threads > 32 ? a.order.threads * 4 : 0);
  const auto kernel = a.residual != nullptr ? rms_norm_kernel<T, true> : rms_norm_kernel<T, false>;
  const cudaError_t err = allow_dynamic_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  // Threads for about kUnroll chunks each: every load of a row in flight at once up to
  // kMaxRmsThreads * kUnroll chunks (16384 bf16 elements).
  const int chunks = a.n / kVec<T>;
  const int threads = std::clamp((chunks / kUnroll + 31) / 32 * 32, 32, kMaxRmsThreads);
  kernel<<<static_cast<unsigned>(a.rows), threads, smem, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_rms_norm(Dtype dtype, const RmsNormArgs& a, cudaStream_t stream) {
  return with_element_type(dtype,
                           [&](auto t) { return launch_typed<decltype(t)>(a, stream); });
}

}  // namespace mage::cuda
