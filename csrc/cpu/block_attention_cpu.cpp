// CPU kernels of mage.block_attention and its backward: the shared split (ops/block_attention.h)
// with the generic part kernel (chunked ATen matmuls, intra-op parallel BLAS).
#include <torch/library.h>

#include "ops/block_attention.h"

namespace mage::cpu {
namespace {

using T = const at::Tensor&;

std::tuple<at::Tensor, at::Tensor> block_attention(T q, T k_ctx, T v_ctx, T k_own, T v_own,
                                                   int64_t block_size, at::IntArrayRef start,
                                                   std::optional<double> scale) {
  const auto d = check_block_attention_inputs("mage.block_attention", q, k_ctx, v_ctx, k_own,
                                              v_own, block_size, start, scale);
  return compute_block_attention(q, k_ctx, v_ctx, k_own, v_own, d, start, generic_part_kernel());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> block_attention_backward(
    T dout, T q, T k_ctx, T v_ctx, T k_own, T v_own, T out, T lse, int64_t block_size,
    at::IntArrayRef start, std::optional<double> scale) {
  const char* op = "mage.block_attention_backward";
  const auto d = check_block_attention_inputs(op, q, k_ctx, v_ctx, k_own, v_own, block_size,
                                              start, scale);
  check_block_attention_grad_inputs(op, d, q, dout, out, lse);
  return compute_block_attention_backward(dout, q, k_ctx, v_ctx, k_own, v_own, out, lse, d, start,
                                        generic_part_kernel());
}

}  // namespace

TORCH_LIBRARY_IMPL(mage, CPU, m) {
  m.impl("block_attention", &block_attention);
  m.impl("block_attention_backward", &block_attention_backward);
}

}  // namespace mage::cpu
