// mage::block_attention from C++: the autograd path LibTorch callers share with Python (the C++
// Function registered for the Autograd key) against the backward op and finite differences, a
// few optimizer steps that lower a loss, and the double-backward error.
#include <gtest/gtest.h>
#include <torch/autograd.h>
#include <torch/optim/adam.h>

#include <vector>

#include "mage/ops.h"

namespace {

struct Leaves {
  at::Tensor q, k_ctx, v_ctx, k_own, v_own;
  std::vector<at::Tensor> all() const { return {q, k_ctx, v_ctx, k_own, v_own}; }
};

// batch 2, Hq 4, Hkv 2 (GQA 2), T 8 in blocks of 4, context 12, d 16.
Leaves make_leaves(at::ScalarType dtype, uint64_t seed) {
  at::manual_seed(seed);
  auto o = at::TensorOptions().dtype(dtype);
  return {at::randn({2, 4, 8, 16}, o).requires_grad_(),
          at::randn({2, 2, 12, 16}, o).requires_grad_(),
          at::randn({2, 2, 12, 16}, o).requires_grad_(),
          at::randn({2, 2, 8, 16}, o).requires_grad_(),
          at::randn({2, 2, 8, 16}, o).requires_grad_()};
}

const std::vector<int64_t> kStart = {3, 0};
constexpr int64_t kBlock = 4;

at::Tensor forward_out(const Leaves& x) {
  return std::get<0>(
      mage::block_attention(x.q, x.k_ctx, x.v_ctx, x.k_own, x.v_own, kBlock, kStart));
}

TEST(BlockAttention, AutogradMatchesBackwardOpAndFiniteDifferences) {
  auto x = make_leaves(at::kDouble, 1);
  auto [out, lse] = mage::block_attention(x.q, x.k_ctx, x.v_ctx, x.k_own, x.v_own, kBlock, kStart);
  EXPECT_TRUE(out.requires_grad());
  EXPECT_FALSE(lse.requires_grad());
  const auto dout = at::randn_like(out);
  const auto grads = torch::autograd::grad({out}, x.all(), {dout});
  auto [dq, dk_ctx, dv_ctx, dk_own, dv_own] = mage::block_attention_backward(
      dout, x.q.detach(), x.k_ctx.detach(), x.v_ctx.detach(), x.k_own.detach(),
      x.v_own.detach(), out.detach(), lse, kBlock, kStart);
  const std::vector<at::Tensor> direct = {dq, dk_ctx, dv_ctx, dk_own, dv_own};
  for (size_t i = 0; i < direct.size(); ++i) EXPECT_TRUE(at::equal(grads[i], direct[i])) << i;

  // Central differences of <out, dout> along one element of each input.
  const double eps = 1e-6;
  auto inputs = x.all();
  for (size_t i = 0; i < inputs.size(); ++i) {
    at::NoGradGuard no_grad;
    auto flat = inputs[i].view(-1);
    const int64_t at_index = flat.numel() / 3;
    const double saved = flat[at_index].item<double>();
    flat[at_index] = saved + eps;
    const double plus = (forward_out(x) * dout).sum().item<double>();
    flat[at_index] = saved - eps;
    const double minus = (forward_out(x) * dout).sum().item<double>();
    flat[at_index] = saved;
    EXPECT_NEAR((plus - minus) / (2 * eps), grads[i].view(-1)[at_index].item<double>(), 1e-6) << i;
  }
}

TEST(BlockAttention, OptimizerStepsLowerTheLoss) {
  auto x = make_leaves(at::kFloat, 2);
  const auto target = at::randn({2, 4, 8, 16});
  torch::optim::Adam opt(x.all(), torch::optim::AdamOptions(0.05));
  double first = 0, last = 0;
  for (int step = 0; step < 30; ++step) {
    opt.zero_grad();
    auto loss = (forward_out(x) - target).pow(2).mean();
    loss.backward();
    opt.step();
    (step == 0 ? first : last) = loss.item<double>();
  }
  EXPECT_LT(last, 0.6 * first) << "first " << first << " last " << last;
}

TEST(BlockAttention, DoubleBackwardIsRefused) {
  auto x = make_leaves(at::kDouble, 3);
  auto out = forward_out(x);
  try {
    torch::autograd::grad({out.sum()}, {x.q}, {}, /*retain_graph=*/true, /*create_graph=*/true);
    FAIL() << "double backward did not raise";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("double backward"), std::string::npos) << e.what();
  }
}

}  // namespace
