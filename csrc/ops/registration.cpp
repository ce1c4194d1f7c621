// Every MAGE op schema, defined once. Backends register kernels in their own files:
// csrc/cpu (CPU), csrc/cuda (CUDA); the allocating forms live in ops/functional.cpp.
// The *_out forms write into preallocated outputs and allocate nothing, so a decoding step
// built from them can be captured in a CUDA graph.
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
  // Block-causal attention over a context plus the own block (chunked prefill, block-diffusion
  // training); lse carries no gradient. See ops/block_attention.h.
  m.def(
      "block_attention(Tensor q, Tensor k_ctx, Tensor v_ctx, Tensor k_own, Tensor v_own, "
      "int block_size, int[] start, float? scale=None) -> (Tensor out, Tensor lse)");
  m.def(
      "block_attention_backward(Tensor dout, Tensor q, Tensor k_ctx, Tensor v_ctx, "
      "Tensor k_own, Tensor v_own, Tensor out, Tensor lse, int block_size, int[] start, "
      "float? scale=None) -> (Tensor dq, Tensor dk_ctx, Tensor dv_ctx, Tensor dk_own, "
      "Tensor dv_own)");
}
