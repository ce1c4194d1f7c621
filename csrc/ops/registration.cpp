// Every MAGE op schema, defined once. Backends register kernels in their own files:
// csrc/cpu (CPU), csrc/cuda (CUDA); the allocating forms live in ops/functional.cpp.
// The *_out forms write into preallocated outputs and allocate nothing, so a decoding step
// built from them can be captured in a CUDA graph.
// Autograd (csrc/autograd): attention_with_scores, dense_attention, sparse_attention and
// block_sparse_attention are differentiable (out and lse; never scores, lengths or selections)
// through the *_backward ops, whose dlse may be None (lse unused). The *_out forms and the
// *_backward ops refuse inputs that require grad (not differentiable; no double backward).
// take_error / check_errors read the device's error record (ops/device_errors.h; implemented for every device in ops/device_errors.cpp).
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
      "block_sparse_attention(Tensor q, Tensor k_ctx, Tensor v_ctx, Tensor indices, "
      "Tensor counts, Tensor k_own, Tensor v_own, int block_size, float? scale=None) -> "
      "(Tensor out, Tensor lse)");
  m.def(
      "dense_attention_backward(Tensor dout, Tensor? dlse, Tensor q, Tensor k_cache, "
      "Tensor v_cache, Tensor cache_lens, Tensor k_block, Tensor v_block, Tensor out, "
      "Tensor lse, float? scale) -> (Tensor dq, Tensor dk_cache, Tensor dv_cache, "
      "Tensor dk_block, Tensor dv_block)");
  m.def(
      "sparse_attention_backward(Tensor dout, Tensor? dlse, Tensor q, Tensor k_cache, "
      "Tensor v_cache, Tensor indices, Tensor counts, Tensor k_block, Tensor v_block, "
      "Tensor out, Tensor lse, float? scale) -> (Tensor dq, Tensor dk_cache, Tensor dv_cache, "
      "Tensor dk_block, Tensor dv_block)");
  m.def(
      "block_sparse_attention_backward(Tensor dout, Tensor? dlse, Tensor q, Tensor k_ctx, "
      "Tensor v_ctx, Tensor indices, Tensor counts, Tensor k_own, Tensor v_own, Tensor out, "
      "Tensor lse, int block_size, float? scale) -> (Tensor dq, Tensor dk_ctx, Tensor dv_ctx, "
      "Tensor dk_own, Tensor dv_own)");
  m.def(
      "topk_select(Tensor scores, Tensor cache_lens, int k, int n_sink=0, int n_recent=0) "
      "-> (Tensor indices, Tensor counts)");
  m.def(
      "topk_select_out(Tensor scores, Tensor cache_lens, int k, int n_sink, int n_recent, "
      "Tensor(a!) indices, Tensor(b!) counts) -> ()");
  m.def(
      "append_kv(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cache_lens, Tensor k_block, "
      "Tensor v_block) -> ()");

  // Fused elementwise ops of a Qwen2/Qwen3 layer, the values of the transformers modules they
  // replace (include/mage/ops.h).
  m.def(
      "rms_norm(Tensor x, Tensor weight, float eps, Tensor? residual=None) -> (Tensor out, "
      "Tensor new_residual)");
  m.def(
      "rms_norm_out(Tensor x, Tensor weight, float eps, Tensor? residual, Tensor(a!) out, "
      "Tensor(b!) residual_out) -> ()");
  m.def(
      "qkv_rope(Tensor qkv, Tensor positions, Tensor inv_freq, int n_q_heads, int n_kv_heads, "
      "int head_dim, Tensor? q_norm_weight=None, Tensor? k_norm_weight=None, float eps=1e-06) "
      "-> (Tensor q, Tensor k, Tensor v)");
  m.def(
      "qkv_rope_out(Tensor qkv, Tensor positions, Tensor inv_freq, int n_q_heads, "
      "int n_kv_heads, int head_dim, Tensor? q_norm_weight, Tensor? k_norm_weight, float eps, "
      "Tensor(a!) q, Tensor(b!) k, Tensor(c!) v) -> ()");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("silu_mul_out(Tensor gate_up, Tensor(a!) out) -> ()");
  // y = x W^T + b (torch.nn.functional.linear); a few-row GEMM kernel on CUDA (ops/linear.cpp).
  m.def("linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
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
  m.def("take_error(Device device) -> int[]");
  m.def("check_errors(Device device) -> ()");
}
