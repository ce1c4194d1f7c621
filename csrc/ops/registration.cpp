// Every MAGE op schema, defined once. Backends register kernels in their own files:
// csrc/cpu (CPU), csrc/cuda (CUDA); the allocating forms live in ops/functional.cpp.
// The *_out forms write into preallocated outputs and allocate nothing, so a decoding step
// built from them can be captured in a CUDA graph. take_error / check_errors read the device's
// error record (ops/device_errors.h; implemented for every device in ops/device_errors.cpp).
#include <torch/library.h>

TORCH_LIBRARY(mage, m) {
  m.def(
      "attention_with_scores(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_lens, "
      "Tensor k_block, Tensor v_block, float? scale=None) -> (Tensor out, Tensor lse, "
      "Tensor scores)");
  m.def(
      "attention_with_scores_out(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_lens, "
      "Tensor k_block, Tensor v_block, float? scale, Tensor(a!) out, Tensor(b!) lse, "
      "Tensor(c!) scores) -> ()");
  m.def(
      "dense_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_lens, "
      "Tensor k_block, Tensor v_block, float? scale=None) -> (Tensor out, Tensor lse)");
  m.def(
      "dense_attention_out(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_lens, "
      "Tensor k_block, Tensor v_block, float? scale, Tensor(a!) out, Tensor(b!) lse) -> ()");
  m.def(
      "sparse_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor indices, "
      "Tensor counts, Tensor k_block, Tensor v_block, float? scale=None) -> (Tensor out, "
      "Tensor lse)");
  m.def(
      "sparse_attention_out(Tensor q, Tensor k_cache, Tensor v_cache, Tensor indices, "
      "Tensor counts, Tensor k_block, Tensor v_block, float? scale, Tensor(a!) out, "
      "Tensor(b!) lse) -> ()");
  m.def(
      "topk_select(Tensor scores, Tensor cache_lens, int k, int n_sink=0, int n_recent=0) "
      "-> (Tensor indices, Tensor counts)");
  m.def(
      "topk_select_out(Tensor scores, Tensor cache_lens, int k, int n_sink, int n_recent, "
      "Tensor(a!) indices, Tensor(b!) counts) -> ()");
  m.def(
      "append_kv(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cache_lens, Tensor k_block, "
      "Tensor v_block) -> ()");
  m.def("take_error(Device device) -> int[]");
  m.def("check_errors(Device device) -> ()");
}
