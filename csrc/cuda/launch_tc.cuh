// Launch helpers for the tensor-core kernels, instantiated once per 16-bit element type by
// attention_f16.cu and attention_bf16.cu.
#pragma once

#include "cuda/attention_tc.cuh"
#include "cuda/attention_wgmma.cuh"
#include "cuda/merge.cuh"
#include "cuda/scores_wgmma.cuh"

namespace mage::cuda {

// Kernels with more than 48 KB of dynamic shared memory must opt in; the callers keep the
// result in a function-local static, so this runs once per kernel instantiation.
template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, int bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

template <typename T, int D, bool kSparse, typename Shape>
cudaError_t launch_tc_attention(const AttentionArgs& a, cudaStream_t stream) {
  constexpr int smem = attention_smem_bytes<D, Shape::kRows>();
  auto kernel = attention_tile_kernel<T, D, kSparse, Shape>;
  static const cudaError_t attr = allow_smem(kernel, smem);
  if (attr != cudaSuccess) return attr;
  const dim3 grid((a.rows + Shape::kRows - 1) / Shape::kRows, a.num_splits, a.batch * a.hkv);
  kernel<<<grid, Shape::kWarpsPerCta * 32, smem, stream>>>(a);
  return cudaGetLastError();
}

template <typename T, int D, bool kSparse, int kWG>
cudaError_t launch_wgmma_attention(const AttentionArgs& a, cudaStream_t stream) {
  constexpr int smem = wgmma_smem_bytes<D, kWG>();
  auto kernel = attention_wgmma_kernel<T, D, kSparse, kWG>;
  static const cudaError_t attr = allow_smem(kernel, smem);
  if (attr != cudaSuccess) return attr;
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
    static const cudaError_t attr = allow_smem(kernel, smem);
    if (attr != cudaSuccess) return attr;
    kernel<<<dim3(a.num_splits, a.hkv, a.batch), kScoreWg * 128 + 32, smem, stream>>>(a);
    return cudaGetLastError();
  }
#endif
  constexpr int smem = scores_smem_bytes<D>();
  auto kernel = scores_kernel<T, D>;
  static const cudaError_t attr = allow_smem(kernel, smem);
  if (attr != cudaSuccess) return attr;
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
