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

// What every backward needs: the forward's tensor inputs, then out and lse, and the scale.
// Gradients are not materialised (set_materialize_grads(false)): dout is undefined when the
// loss used lse alone, dlse when it used out alone (the common case, which then costs nothing).
void save_forward(AutogradContext* ctx, variable_list inputs, const Tensor& out,
                  const Tensor& lse, std::optional<double> scale) {
  ctx->set_materialize_grads(false);
  inputs.push_back(out);
  inputs.push_back(lse);
  ctx->save_for_backward(inputs);
  ctx->saved_data["scale"] = scale;
}

struct Saved {
  variable_list t;  // the forward's tensor inputs, out, lse
  Tensor dout;      // zeros where the loss did not use out
  std::optional<Tensor> dlse;
  std::optional<double> scale;

  Saved(AutogradContext* ctx, const variable_list& grads)
      : t(ctx->get_saved_variables()),
        dout(grads[0].defined() ? grads[0] : at::zeros_like(t[t.size() - 2])),
        dlse(grads[1].defined() ? std::optional<Tensor>(grads[1]) : std::nullopt),
        scale(ctx->saved_data["scale"].toOptional<double>()) {}
};

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
    save_forward(ctx, {q, k_cache, v_cache, cache_lens, k_block, v_block}, out, lse, scale);
    if (!with_scores) return {out, lse};
    ctx->mark_non_differentiable({scores});
    return {out, lse, scores};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Saved s(ctx, grads);
    auto [dq, dk_cache, dv_cache, dk_block, dv_block] = dense_attention_backward(
        s.dout, s.dlse, s.t[0], s.t[1], s.t[2], s.t[3], s.t[4], s.t[5], s.t[6], s.t[7], s.scale);
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
    save_forward(ctx, {q, k_cache, v_cache, indices, counts, k_block, v_block}, out, lse, scale);
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Saved s(ctx, grads);
    auto [dq, dk_cache, dv_cache, dk_block, dv_block] =
        sparse_attention_backward(s.dout, s.dlse, s.t[0], s.t[1], s.t[2], s.t[3], s.t[4],
                                  s.t[5], s.t[6], s.t[7], s.t[8], s.scale);
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
    save_forward(ctx, {q, k_ctx, v_ctx, indices, counts, k_own, v_own}, out, lse, scale);
    ctx->saved_data["block_size"] = block_size;
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Saved s(ctx, grads);
    auto [dq, dk_ctx, dv_ctx, dk_own, dv_own] = block_sparse_attention_backward(
        s.dout, s.dlse, s.t[0], s.t[1], s.t[2], s.t[3], s.t[4], s.t[5], s.t[6], s.t[7], s.t[8],
        ctx->saved_data["block_size"].toInt(), s.scale);
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
