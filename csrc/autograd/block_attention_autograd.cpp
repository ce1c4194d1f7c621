// Autograd of mage.block_attention, in C++ so LibTorch callers and Python share one path: a
// torch::autograd::Function registered for the Autograd dispatch key. Its forward runs the op
// below autograd; its backward calls mage.block_attention_backward with the saved inputs, out
// and lse. lse is marked non-differentiable. Double backward is refused with a clear error.
#include <torch/autograd.h>
#include <torch/library.h>

#include "mage/ops.h"

namespace mage {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class BlockAttentionFunction : public torch::autograd::Function<BlockAttentionFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q,
                               const at::Tensor& k_ctx, const at::Tensor& v_ctx,
                               const at::Tensor& k_own, const at::Tensor& v_own,
                               int64_t block_size, std::vector<int64_t> start,
                               std::optional<double> scale) {
    at::Tensor out, lse;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(out, lse) =
          mage::block_attention(q, k_ctx, v_ctx, k_own, v_own, block_size, start, scale);
    }
    ctx->save_for_backward({q, k_ctx, v_ctx, k_own, v_own, out, lse});
    ctx->saved_data["block_size"] = block_size;
    ctx->saved_data["start"] = start;
    ctx->saved_data["scale"] = scale;
    ctx->mark_non_differentiable({lse});
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // The engine enables grad mode in a backward pass only for create_graph=True.
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "mage.block_attention: double backward (create_graph=True, a gradient of the "
                "gradient) is not supported");
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& dout = grads[0];
    if (!dout.defined()) return variable_list(8);  // only lse was used: no gradient
    const auto start = ctx->saved_data["start"].toIntVector();
    const auto scale = ctx->saved_data["scale"].toOptional<double>();
    auto [dq, dk_ctx, dv_ctx, dk_own, dv_own] = mage::block_attention_backward(
        dout, saved[0], saved[1], saved[2], saved[3], saved[4], saved[5], saved[6],
        ctx->saved_data["block_size"].toInt(), start, scale);
    return {dq, dk_ctx, dv_ctx, dk_own, dv_own, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> block_attention_autograd(
    const at::Tensor& q, const at::Tensor& k_ctx, const at::Tensor& v_ctx,
    const at::Tensor& k_own, const at::Tensor& v_own, int64_t block_size, at::IntArrayRef start,
    std::optional<double> scale) {
  auto outs = BlockAttentionFunction::apply(q, k_ctx, v_ctx, k_own, v_own, block_size,
                                            start.vec(), scale);
  return {outs[0], outs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(mage, Autograd, m) { m.impl("block_attention", &block_attention_autograd); }

}  // namespace mage
