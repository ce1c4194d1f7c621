// fp32 attention and score kernels (SIMT) and the fp32 merge; plus the per-dtype dispatch.
#include "cuda/attention_simt.cuh"
#include "cuda/launch_tc.cuh"

namespace mage::cuda {

cudaError_t launch_attention_f32(bool sparse, const AttentionArgs& a, cudaStream_t stream) {
  const dim3 grid((a.rows + kSimtWarps - 1) / kSimtWarps, a.hkv, a.batch);
  const int threads = kSimtWarps * 32;
  if (a.dim == 64) {
    sparse ? simt_attention_kernel<64, true><<<grid, threads, 0, stream>>>(a)
           : simt_attention_kernel<64, false><<<grid, threads, 0, stream>>>(a);
  } else {
    sparse ? simt_attention_kernel<128, true><<<grid, threads, 0, stream>>>(a)
           : simt_attention_kernel<128, false><<<grid, threads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

cudaError_t launch_scores_f32(const ScoresArgs& a, cudaStream_t stream) {
  const dim3 grid((a.capacity + kSimtWarps - 1) / kSimtWarps, a.hkv, a.batch);
  if (a.dim == 64) {
    simt_scores_kernel<64><<<grid, kSimtWarps * 32, 0, stream>>>(a);
  } else {
    simt_scores_kernel<128><<<grid, kSimtWarps * 32, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

cudaError_t launch_merge_f32(const MergeArgs& a, cudaStream_t stream) {
  return launch_merge_typed<float>(a, stream);
}

cudaError_t launch_attention(Dtype dtype, bool sparse, const AttentionArgs& a,
                             cudaStream_t stream) {
  switch (dtype) {
    case Dtype::kFloat16: return launch_attention_f16(sparse, a, stream);
    case Dtype::kBFloat16: return launch_attention_bf16(sparse, a, stream);
    default: return launch_attention_f32(sparse, a, stream);
  }
}

cudaError_t launch_scores(Dtype dtype, const ScoresArgs& a, cudaStream_t stream) {
  switch (dtype) {
    case Dtype::kFloat16: return launch_scores_f16(a, stream);
    case Dtype::kBFloat16: return launch_scores_bf16(a, stream);
    default: return launch_scores_f32(a, stream);
  }
}

cudaError_t launch_merge(Dtype dtype, const MergeArgs& a, cudaStream_t stream) {
  switch (dtype) {
    case Dtype::kFloat16: return launch_merge_f16(a, stream);
    case Dtype::kBFloat16: return launch_merge_bf16(a, stream);
    default: return launch_merge_f32(a, stream);
  }
}

}  // namespace mage::cuda
