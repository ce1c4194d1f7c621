// Launch helpers for the tensor-core kernels, instantiated once per 16-bit element type by
// attention_f16.cu and attention_bf16.cu.
#pragma once

#include "cuda/attention_tc.cuh"
#include "cuda/attention_wgmma.cuh"
#include "cuda/merge.cuh"
#include "cuda/scores_wgmma.cuh"
#include "ops/once_per_device.h"

namespace mage::cuda {

// Kernels with more than 48 KB of dynamic shared memory must opt in, on each device (the
// attribute belongs to the device's context): each call site keeps a function-local
// OncePerDevice, so this sets it once per kernel instantiation and device, and tries again
// after a failure.
template <typename Kernel>
cudaError_t allow_smem(OncePerDevice& once, Kernel kernel, int bytes) {
  int device = -1;
  const cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  return once.run(device, [&] {
    const cudaError_t set =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    if (set != cudaSuccess) (void)cudaGetLastError();  // returned here; not left for a later check
    return set;
  });
}

template <typename T, int D, bool kSparse, typename Shape>
cudaError_t launch_tc_attention(const AttentionArgs& a, cudaStream_t stream) {
  constexpr int smem = attention_smem_bytes<D, Shape::kRows>();
  auto kernel = attention_tile_kernel<T, D, kSparse, Shape>;
  static OncePerDevice smem_set;
  if (const cudaError_t err = allow_smem(smem_set, kernel, smem); err != cudaSuccess) return err;
  const dim3 grid((a.rows + Shape::kRows - 1) / Shape::kRows, a.num_splits, a.batch * a.hkv);
  kernel<<<grid, Shape::kWarpsPerCta * 32, smem, stream>>>(a);
  return cudaGetLastError();
}

template <typename T, int D, bool kSparse, int kWG>
cudaError_t launch_wgmma_attention(const AttentionArgs& a, cudaStream_t stream) {
  constexpr int smem = wgmma_smem_bytes<D, kWG>();
  auto kernel = attention_wgmma_kernel<T, D, kSparse, kWG>;
  static OncePerDevice smem_set;
  if (const cudaError_t err = allow_smem(smem_set, kernel, smem); err != cudaSuccess) return err;
  const dim3 grid((a.rows + kWG * 64 - 1) / (kWG * 64), a.num_splits, a.batch * a.hkv);
  kernel<<<grid, wgmma_threads<kWG, kSparse>(), smem, stream>>>(a);
  return cudaGetLastError();
}

template <typename T, int D, bool kSparse>
cudaError_t launch_tc_shape(const AttentionArgs& a, cudaStream_t stream) {
#ifdef MAGE_WGMMA  // built for sm_90a (setup.py / CMake define it; the host checks it too)
  switch (a.wgmma_groups) {
    case 1: return launch_wgmma_attention<T, D, kSparse, 1>(a, stream);
    case 2: return launch_wgmma_attention<T, D, kSparse, 2>(a, stream);
    case 3: return launch_wgmma_attention<T, D, kSparse, 3>(a, stream);
    default: break;
  }
#endif
  return a.rows_per_cta == kRowsNarrow ? launch_tc_attention<T, D, kSparse, TcNarrow>(a, stream)
                                       : launch_tc_attention<T, D, kSparse, TcWide>(a, stream);
}

template <typename T>
cudaError_t launch_tc(bool sparse, const AttentionArgs& a, cudaStream_t stream) {
  if (a.dim == 64) {
    return sparse ? launch_tc_shape<T, 64, true>(a, stream)
                  : launch_tc_shape<T, 64, false>(a, stream);
  }
  return sparse ? launch_tc_shape<T, 128, true>(a, stream)
                : launch_tc_shape<T, 128, false>(a, stream);
}

template <typename T, int D>
cudaError_t launch_tc_scores_d(const ScoresArgs& a, cudaStream_t stream) {
#ifdef MAGE_WGMMA
  if (a.wgmma) {
    constexpr int smem = scores_wgmma_smem_bytes<D>();
    auto kernel = scores_wgmma_kernel<T, D>;
    static OncePerDevice smem_set;
    if (const cudaError_t err = allow_smem(smem_set, kernel, smem); err != cudaSuccess) return err;
    kernel<<<dim3(a.num_splits, a.hkv, a.batch), kScoreWg * 128 + 32, smem, stream>>>(a);
    return cudaGetLastError();
  }
#endif
  constexpr int smem = scores_smem_bytes<D>();
  auto kernel = scores_kernel<T, D>;
  static OncePerDevice smem_set;
  if (const cudaError_t err = allow_smem(smem_set, kernel, smem); err != cudaSuccess) return err;
  const dim3 grid(a.num_splits, a.hkv, a.batch);
  kernel<<<grid, kScoreWarps * 32, smem, stream>>>(a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_tc_scores(const ScoresArgs& a, cudaStream_t stream) {
  return a.dim == 64 ? launch_tc_scores_d<T, 64>(a, stream) : launch_tc_scores_d<T, 128>(a, stream);
}

template <typename T>
cudaError_t launch_merge_typed(const MergeArgs& a, cudaStream_t stream) {
  if (a.num_splits <= kFewSplits) {  // one warp per row
    const dim3 grid((a.total_rows + kFewSplitRowsPerCta - 1) / kFewSplitRowsPerCta);
    auto kernel = a.dim == 64 ? merge_few_splits_kernel<T, 64> : merge_few_splits_kernel<T, 128>;
    return launch_dependent(a.pdl, kernel, grid, kFewSplitRowsPerCta * 32, 0, stream, a);
  }
  const dim3 grid(a.total_rows);  // one CTA per row
  auto kernel = a.dim == 64 ? merge_splits_kernel<T, 64> : merge_splits_kernel<T, 128>;
  return launch_dependent(a.pdl, kernel, grid, kMergeWarps * 32, 0, stream, a);
}

}  // namespace mage::cuda
