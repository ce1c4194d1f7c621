// bf16 instantiations of the tensor-core attention, score and merge kernels.
#include "cuda/launch_tc.cuh"

namespace mage::cuda {

cudaError_t launch_attention_bf16(bool sparse, const AttentionArgs& a, cudaStream_t stream) {
  return launch_tc<__nv_bfloat16>(sparse, a, stream);
}
cudaError_t launch_scores_bf16(const ScoresArgs& a, cudaStream_t stream) {
  return launch_tc_scores<__nv_bfloat16>(a, stream);
}
cudaError_t launch_merge_bf16(const MergeArgs& a, cudaStream_t stream) {
  return launch_merge_typed<__nv_bfloat16>(a, stream);
}

}  // namespace mage::cuda
