// mage.linear: y = x W^T + b, torch.nn.functional.linear's contract, for the GEMMs of the lean
// decoding forward (mage_ext/hf/fast_forward.py, the C++ runtime's model.cpp): at::linear, or on
// CUDA with MAGE_SKINNY_GEMM=on the experimental few-row split-K kernel
// (csrc/cuda/linear_cuda.cpp). When a gradient is wanted the call is at::linear too, so autograd
// differentiates it as torch's own op.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <torch/library.h>

#include "ops/checks.h"

namespace mage {
namespace {

using T = const at::Tensor&;
using OptT = const std::optional<at::Tensor>&;

at::Tensor linear_cpu(T x, T weight, OptT bias) {
  check_linear_inputs("mage.linear", x, weight, bias);
  return at::linear(x, weight, bias);
}

at::Tensor linear_autograd(T x, T weight, OptT bias) {
  const bool wants_grad = x.requires_grad() || weight.requires_grad() ||
                          (bias.has_value() && bias->defined() && bias->requires_grad());
  // at::linear checks its own inputs here (tracing passes symbolic sizes, which
  // check_linear_inputs cannot read).
  if (c10::GradMode::is_enabled() && wants_grad) return at::linear(x, weight, bias);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mage::linear", "")
                       .typed<at::Tensor(T, T, OptT)>();
  at::AutoDispatchBelowAutograd below_autograd;
  return op.call(x, weight, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(mage, CPU, m) { m.impl("linear", &linear_cpu); }
TORCH_LIBRARY_IMPL(mage, Autograd, m) { m.impl("linear", &linear_autograd); }

}  // namespace mage
