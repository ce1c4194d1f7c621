// fp16 instantiations of the tensor-core attention, score and merge kernels.
#include "cuda/launch_tc.cuh"

namespace mage::cuda {

cudaError_t launch_attention_f16(bool sparse, const AttentionArgs& a, cudaStream_t stream) {
  return launch_tc<__half>(sparse, a, stream);
}
cudaError_t launch_scores_f16(const ScoresArgs& a, cudaStream_t stream) {
  return launch_tc_scores<__half>(a, stream);
}
cudaError_t launch_merge_f16(const MergeArgs& a, cudaStream_t stream) {
  return launch_merge_typed<__half>(a, stream);
}

}  // namespace mage::cuda
