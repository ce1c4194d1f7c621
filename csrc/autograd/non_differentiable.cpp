// Autograd kernels of the ops that have no derivative: the *_out forms (they fill preallocated
// outputs for CUDA graphs) and the *_backward ops (no double backward). Without a kernel of its
// own an op falls back to torch's default, which only warns at backward time that the gradient
// stops there; these refuse an input that requires grad when the op is called (grad mode on),
// naming the op and the argument, and otherwise pass the call on unchanged.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/GradMode.h>
#include <torch/library.h>

#include <string>

namespace mage {
namespace {

void refuse_grad(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                 torch::jit::Stack* stack, const char* why) {
  const auto& args = op.schema().arguments();
  if (c10::GradMode::is_enabled()) {
    const auto first = stack->size() - args.size();
    for (size_t i = 0; i < args.size(); ++i) {
      const c10::IValue& v = (*stack)[first + i];
      if (v.isTensor() && v.toTensor().defined() && v.toTensor().requires_grad()) {
        std::string name = op.schema().name();
        name.replace(name.find("::"), 2, ".");
        TORCH_CHECK(false, name, ": ", args[i].name(), " requires grad, but ", why);
      }
    }
  }
  at::AutoDispatchBelowAutograd below_autograd;
  op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
}

void out_form(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  refuse_grad(op, keys, stack,
              "the *_out forms are not differentiable (they fill preallocated outputs); call "
              "the allocating op (e.g. mage.dense_attention), which is, or run under "
              "torch.no_grad()");
}

void backward_op(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                 torch::jit::Stack* stack) {
  refuse_grad(op, keys, stack,
              "double backward is not supported (the MAGE backward ops are not differentiable); "
              "call backward() without create_graph=True");
}

}  // namespace

TORCH_LIBRARY_IMPL(mage, Autograd, m) {
  for (const char* name :
       {"attention_with_scores_out", "dense_attention_out", "sparse_attention_out"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&out_form>());
  }
  for (const char* name : {"dense_attention_backward", "sparse_attention_backward",
                           "block_sparse_attention_backward"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&backward_op>());
  }
}

}  // namespace mage
