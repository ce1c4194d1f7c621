// The packing behind block_sparse_attention's fused backward
// (csrc/cuda/block_sparse_backward_cuda.cpp): each (sequence, block, KV head) becomes one
// variable-length attention problem (so counts may differ between KV heads): as queries the
// G*block_size rows of the KV head's G query heads (one head, GQA through the rows: a kernel would
// otherwise expand dK / dV to every query head), as keys its own block then its selected context
// rows, gathered into one packed tensor. A variable-length attention backward (FlashAttention-2's
// contract) runs over them; dK / dV of the own block go back in place, those of the selected rows
// are summed into the context (SelectedRowGrads, deterministic). Packing: slot t of sequence s
// goes to row cu_k[s] + t when t < block_size + count[s], else to one dump row (never read): no
// host synchronisation. Device-generic ATen, so the packing is tested on the CPU with a
// reference kernel.
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <tuple>

#include "ops/attention_backward.h"
#include "ops/checks.h"

namespace mage {

// (dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale) -> (dq, dk, dv), FlashAttention-2's
// variable-length backward without dropout, non-causal: q / dout / out [total_q, 1, d], k / v
// [rows, 1, d] (rows past cu_k's end unused), cu_q / cu_k int32 [sequences + 1], lse of rank 2
// ([1, total_q]) or 3 ([sequences, 1, max_q]).
using VarlenBackward = std::function<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t,
    double)>;

// Packed-key elements (rows x head dim) one kernel call may take: the packing's transient
// tensors (keys, values, their gradients) stay near 8 x 2 bytes of it, ~1 GB in bf16, instead of
// growing with T x k (15 GB at T = 32K, k = 2048 in one call).
constexpr int64_t kVarlenBudgetElements = int64_t{64} << 20;

// Blocks per kernel call: as many as fit the budget, at least one.
int64_t varlen_group_blocks(int64_t n_blocks, int64_t seqs_per_block, int64_t slots, int64_t dim,
                            int64_t budget_elements);

// block_sparse_attention's gradients (dq, dk_ctx, dv_ctx, dk_own, dv_own) through `kernel`, on
// inputs already checked (bd from check_block_sparse_inputs); lse_rank: the kernel's lse layout.
// The blocks go to the kernel in groups of varlen_group_blocks (the context's gradients summed
// over the groups in a fixed order: deterministic).
AttentionGrads block_sparse_backward_varlen(const at::Tensor& dout, const at::Tensor& q,
                                            const at::Tensor& k_ctx, const at::Tensor& v_ctx,
                                            const at::Tensor& indices, const at::Tensor& counts,
                                            const at::Tensor& k_own, const at::Tensor& v_own,
                                            const at::Tensor& out, const at::Tensor& lse,
                                            int64_t block_size, const BlockSparseDims& bd,
                                            const VarlenBackward& kernel, int lse_rank,
                                            int64_t budget_elements = kVarlenBudgetElements);

// The kernel's contract in plain ATen (compute dtype, one sequence at a time, lse of rank 2;
// reads cu_q / cu_k on the host): the tests' stand-in for the CUDA kernel.
std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_backward_reference(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_q, const at::Tensor& cu_k,
    int64_t max_q, int64_t max_k, double scale);

}  // namespace mage
