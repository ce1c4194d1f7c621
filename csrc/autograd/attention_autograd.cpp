// Autograd of the attention ops: torch::autograd::Function subclasses registered for the ops'
// Autograd dispatch key, so torch.ops.mage.* from Python and the C++ API (mage/ops.h) from
// LibTorch take the same path. forward() runs the op below autograd (the CPU / CUDA kernels)
// and saves its inputs, out and lse; backward() calls the op's *_backward op, a chunked
// recompute from the saved lse (ops/backward_core.h), nothing of [rows x keys] being saved.
// The backward ops refuse inputs that require grad (non_differentiable.cpp): no double backward.
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "mage/ops.h"

namespace mage {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Gradients are not materialised (set_materialize_grads(false)): dout is undefined when the
// loss used lse alone, dlse when it used out alone (the common case, which then costs nothing).
Tensor dout_or_zeros(const Tensor& dout, const Tensor& out) {
  return dout.defined() ? dout : at::zeros_like(out);
}

std::optional<Tensor> dlse_if_any(const Tensor& dlse) {
  return dlse.defined() ? std::optional<Tensor>(dlse) : std::nullopt;
}

std::optional<double> saved_scale(AutogradContext* ctx) {
  return ctx->saved_data["scale"].toOptional<double>();
}

// dense_attention and attention_with_scores (the same exact attention; with_scores adds the
// non-differentiable scores output).
class ExactAttention : public torch::autograd::Function<ExactAttention> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k_cache,
                               const Tensor& v_cache, const Tensor& cache_lens,
                               const Tensor& k_block, const Tensor& v_block,
                               std::optional<double> scale, bool with_scores) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    Tensor out, lse, scores;
    if (with_scores) {
      std::tie(out, lse, scores) =
          attention_with_scores(q, k_cache, v_cache, cache_lens, k_block, v_block, scale);
    } else {
      std::tie(out, lse) =
          dense_attention(q, k_cache, v_cache, cache_lens, k_block, v_block, scale);
    }
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({q, k_cache, v_cache, cache_lens, k_block, v_block, out, lse});
    ctx->saved_data["scale"] = scale;
    if (!with_scores) return {out, lse};
    ctx->mark_non_differentiable({scores});
    return {out, lse, scores};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    auto [dq, dk_cache, dv_cache, dk_block, dv_block] =
        dense_attention_backward(dout_or_zeros(grads[0], s[6]), dlse_if_any(grads[1]), s[0], s[1],
                                 s[2], s[3], s[4], s[5], s[6], s[7], saved_scale(ctx));
    return {dq, dk_cache, dv_cache, Tensor(), dk_block, dv_block, Tensor(), Tensor()};
  }
};

class SparseAttention : public torch::autograd::Function<SparseAttention> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k_cache,
                               const Tensor& v_cache, const Tensor& indices,
                               const Tensor& counts, const Tensor& k_block,
                               const Tensor& v_block, std::optional<double> scale) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, lse] =
        sparse_attention(q, k_cache, v_cache, indices, counts, k_block, v_block, scale);
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({q, k_cache, v_cache, indices, counts, k_block, v_block, out, lse});
    ctx->saved_data["scale"] = scale;
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    auto [dq, dk_cache, dv_cache, dk_block, dv_block] = sparse_attention_backward(
        dout_or_zeros(grads[0], s[7]), dlse_if_any(grads[1]), s[0], s[1], s[2], s[3], s[4],
        s[5], s[6], s[7], s[8], saved_scale(ctx));
    return {dq, dk_cache, dv_cache, Tensor(), Tensor(), dk_block, dv_block, Tensor()};
  }
};

class BlockSparseAttention : public torch::autograd::Function<BlockSparseAttention> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k_ctx,
                               const Tensor& v_ctx, const Tensor& indices, const Tensor& counts,
                               const Tensor& k_own, const Tensor& v_own, int64_t block_size,
                               std::optional<double> scale) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, lse] = block_sparse_attention(q, k_ctx, v_ctx, indices, counts, k_own, v_own,
                                             block_size, scale);
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({q, k_ctx, v_ctx, indices, counts, k_own, v_own, out, lse});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["block_size"] = block_size;
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    auto [dq, dk_ctx, dv_ctx, dk_own, dv_own] = block_sparse_attention_backward(
        dout_or_zeros(grads[0], s[7]), dlse_if_any(grads[1]), s[0], s[1], s[2], s[3], s[4],
        s[5], s[6], s[7], s[8], ctx->saved_data["block_size"].toInt(), saved_scale(ctx));
    return {dq, dk_ctx, dv_ctx, Tensor(), Tensor(), dk_own, dv_own, Tensor(), Tensor()};
  }
};

using Scale = std::optional<double>;

std::tuple<Tensor, Tensor, Tensor> attention_with_scores_autograd(
    const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& cache_lens,
    const Tensor& k_block, const Tensor& v_block, Scale scale) {
  auto r = ExactAttention::apply(q, k_cache, v_cache, cache_lens, k_block, v_block, scale, true);
  return {r[0], r[1], r[2]};
}

std::tuple<Tensor, Tensor> dense_attention_autograd(const Tensor& q, const Tensor& k_cache,
                                                    const Tensor& v_cache,
                                                    const Tensor& cache_lens,
                                                    const Tensor& k_block,
                                                    const Tensor& v_block, Scale scale) {
  auto r = ExactAttention::apply(q, k_cache, v_cache, cache_lens, k_block, v_block, scale, false);
  return {r[0], r[1]};
}

std::tuple<Tensor, Tensor> sparse_attention_autograd(const Tensor& q, const Tensor& k_cache,
                                                     const Tensor& v_cache,
                                                     const Tensor& indices, const Tensor& counts,
                                                     const Tensor& k_block,
                                                     const Tensor& v_block, Scale scale) {
  auto r = SparseAttention::apply(q, k_cache, v_cache, indices, counts, k_block, v_block, scale);
  return {r[0], r[1]};
}

std::tuple<Tensor, Tensor> block_sparse_attention_autograd(
    const Tensor& q, const Tensor& k_ctx, const Tensor& v_ctx, const Tensor& indices,
    const Tensor& counts, const Tensor& k_own, const Tensor& v_own, int64_t block_size,
    Scale scale) {
  auto r = BlockSparseAttention::apply(q, k_ctx, v_ctx, indices, counts, k_own, v_own,
                                       block_size, scale);
  return {r[0], r[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(mage, Autograd, m) {
  m.impl("attention_with_scores", &attention_with_scores_autograd);
  m.impl("dense_attention", &dense_attention_autograd);
  m.impl("sparse_attention", &sparse_attention_autograd);
  m.impl("block_sparse_attention", &block_sparse_attention_autograd);
}

}  // namespace mage
