// The backward ops' device-generic implementations (ATen only: the chunked recompute of
// ops/backward_core.h). Registered for the CPU in csrc/cpu/backward_cpu.cpp and for CUDA in
// csrc/cuda/backward_cuda.cpp, the place where a fused CUDA backward kernel would be slotted in.
// Each returns (dq, dk_cache, dv_cache, dk_block, dv_block) in the inputs' dtypes; dlse may be
// absent (lse unused by the loss). Also block_sparse_attention's forward, a composite of
// sparse_attention_out calls (ops/block_sparse.cpp), registered with the allocating forms
// (ops/functional.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "mage/ops.h"  // AttentionGrads

namespace mage {

AttentionGrads dense_attention_backward_generic(
    const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q,
    const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cache_lens,
    const at::Tensor& k_block, const at::Tensor& v_block, const at::Tensor& out,
    const at::Tensor& lse, std::optional<double> scale);

AttentionGrads sparse_attention_backward_generic(
    const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q,
    const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& indices,
    const at::Tensor& counts, const at::Tensor& k_block, const at::Tensor& v_block,
    const at::Tensor& out, const at::Tensor& lse, std::optional<double> scale);

std::tuple<at::Tensor, at::Tensor> block_sparse_attention_generic(
    const at::Tensor& q, const at::Tensor& k_ctx, const at::Tensor& v_ctx,
    const at::Tensor& indices, const at::Tensor& counts, const at::Tensor& k_own,
    const at::Tensor& v_own, int64_t block_size, std::optional<double> scale);

// Returns (dq, dk_ctx, dv_ctx, dk_own, dv_own).
AttentionGrads block_sparse_attention_backward_generic(
    const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q,
    const at::Tensor& k_ctx, const at::Tensor& v_ctx, const at::Tensor& indices,
    const at::Tensor& counts, const at::Tensor& k_own, const at::Tensor& v_own,
    const at::Tensor& out, const at::Tensor& lse, int64_t block_size,
    std::optional<double> scale);

}  // namespace mage
