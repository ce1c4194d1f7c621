// MAGE-FT from LibTorch: the three passes of the objective (mage_ext/train/objective.py) on a
// tiny two-layer block-diffusion model, every attention through the MAGE ops and their C++
// autograd:
//   1. no grad: [all-[MASK] copy | clean x_0]: exact attention with scores (attention_with_scores,
//      the blocks as the batch over the clean K/V), top-k per (block, KV head) (topk_select);
//   2. no grad: the teacher [x_t | x_0], exact (block_attention);
//   3. the student [x_t | x_0]: in the sparse layer x_t reads only its selection
//      (block_sparse_attention), gradients flow;
// loss = CE(student) + lambda * KL(p_student || p_teacher) on the masked positions; backward;
// Adam step. The loss stays finite and falls.
#include <ATen/Parallel.h>
#include <gtest/gtest.h>
#include <torch/autograd.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/optim/adam.h>

#include <cmath>
#include <string>
#include <vector>

#include "mage/ops.h"

namespace {

constexpr int64_t kVocab = 23, kMask = 22, kModel = 32, kHq = 4, kHkv = 2, kDim = 8;
constexpr int64_t kBlock = 4, kBlocks = 6, kTokens = kBlock * kBlocks, kBudget = 5;
constexpr int64_t kLayers = 2, kDenseLayers = 1;

enum class Mode { kExact, kSelect, kSparse };

// [1, T, n * dim] -> [1, n, T, dim], rows contiguous (the ops' layout).
at::Tensor heads(const at::Tensor& x, int64_t n) {
  return x.view({x.size(0), x.size(1), n, kDim}).transpose(1, 2).contiguous();
}

struct Selection {
  at::Tensor indices, counts;  // [1, n_blocks, Hkv, k], [1, n_blocks, Hkv]
};

struct Layer : torch::nn::Module {
  Layer() {
    wq = register_module("wq", torch::nn::Linear(kModel, kHq * kDim));
    wk = register_module("wk", torch::nn::Linear(kModel, kHkv * kDim));
    wv = register_module("wv", torch::nn::Linear(kModel, kHkv * kDim));
    wo = register_module("wo", torch::nn::Linear(kHq * kDim, kModel));
  }
  torch::nn::Linear wq{nullptr}, wk{nullptr}, wv{nullptr}, wo{nullptr};
};

// The noisy copy's exact attention from attention_with_scores, its blocks as the batch over the
// clean K/V (batch stride 0), and the top-k selection of its scores.
at::Tensor select_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& kc, const at::Tensor& vc, Selection& sel) {
  auto units = [](const at::Tensor& t) {  // [1, H, T, d] -> [n_blocks, H, B, d]
    return t[0].unflatten(1, {kBlocks, kBlock}).transpose(0, 1).contiguous();
  };
  const auto lens = at::arange(kBlocks, at::kInt) * kBlock;  // each block's clean prefix
  auto [out, lse, scores] =
      mage::attention_with_scores(units(q), kc.expand({kBlocks, kHkv, kTokens, kDim}),
                                  vc.expand({kBlocks, kHkv, kTokens, kDim}), lens, units(k),
                                  units(v));
  auto [idx, cnt] = mage::topk_select(scores, lens, kBudget);
  sel.indices = idx.unsqueeze(0);
  sel.counts = cnt.unsqueeze(0);
  return out.transpose(0, 1).flatten(1, 2).unsqueeze(0);  // [1, Hq, T, d]
}

struct TinyBlockDiffusion : torch::nn::Module {
  TinyBlockDiffusion() {
    emb = register_module("emb", torch::nn::Embedding(kVocab, kModel));
    pos = register_module("pos", torch::nn::Embedding(kTokens, kModel));
    for (int64_t l = 0; l < kLayers; ++l) {
      layers.push_back(register_module("layer" + std::to_string(l), std::make_shared<Layer>()));
    }
    head = register_module("head", torch::nn::Linear(kModel, kVocab));
  }

  // Logits [1, T, vocab] of the noisy copy; the clean copy shares its positions. In layers >=
  // kDenseLayers, kSelect fills `sel` and kSparse reads it.
  at::Tensor forward(const at::Tensor& noisy, const at::Tensor& clean, Mode mode,
                     std::vector<Selection>& sel) {
    const auto p = pos->forward(at::arange(kTokens, at::kLong)).unsqueeze(0);
    auto xn = emb->forward(noisy) + p, xc = emb->forward(clean) + p;
    const std::vector<int64_t> start{0};
    for (int64_t l = 0; l < kLayers; ++l) {
      auto& w = *layers[l];
      const auto qn = heads(w.wq->forward(xn), kHq), qc = heads(w.wq->forward(xc), kHq);
      const auto kn = heads(w.wk->forward(xn), kHkv), kc = heads(w.wk->forward(xc), kHkv);
      const auto vn = heads(w.wv->forward(xn), kHkv), vc = heads(w.wv->forward(xc), kHkv);
      const auto oc = std::get<0>(mage::block_attention(qc, kc, vc, kc, vc, kBlock, start));
      at::Tensor on;
      if (l < kDenseLayers || mode == Mode::kExact) {
        on = std::get<0>(mage::block_attention(qn, kc, vc, kn, vn, kBlock, start));
      } else if (mode == Mode::kSelect) {
        on = select_attention(qn, kn, vn, kc, vc, sel[l]);
      } else {
        on = std::get<0>(mage::block_sparse_attention(qn, kc, vc, sel[l].indices, sel[l].counts,
                                                      kn, vn, kBlock));
      }
      xn = xn + w.wo->forward(on.transpose(1, 2).flatten(2));
      xc = xc + w.wo->forward(oc.transpose(1, 2).flatten(2));
    }
    return head->forward(xn);
  }

  torch::nn::Embedding emb{nullptr}, pos{nullptr};
  std::vector<std::shared_ptr<Layer>> layers;
  torch::nn::Linear head{nullptr};
};

struct StepResult {
  double loss, kl;
};

// One MAGE-FT step on (x0, masked): returns the loss and the KL term.
StepResult mage_ft_step(TinyBlockDiffusion& model, torch::optim::Adam& opt, const at::Tensor& x0,
                        const at::Tensor& masked, double lambda) {
  const auto xt = at::where(masked, at::full_like(x0, kMask), x0);
  std::vector<Selection> sel(kLayers);
  at::Tensor teacher;
  {
    torch::NoGradGuard no_grad;
    model.forward(at::full_like(x0, kMask), x0, Mode::kSelect, sel);  // 1. selection
    teacher = model.forward(xt, x0, Mode::kExact, sel);               // 2. teacher
  }
  for (int64_t l = kDenseLayers; l < kLayers; ++l) {  // block j selects min(k, j * B) entries
    const auto want = (at::arange(kBlocks, at::kInt) * kBlock).clamp_max(kBudget);
    EXPECT_TRUE(at::equal(sel[l].counts[0].select(1, 0), want));
  }
  opt.zero_grad();
  const auto student = model.forward(xt, x0, Mode::kSparse, sel);      // 3. student
  const auto rows = masked[0].nonzero().squeeze(1);
  const auto logp = at::log_softmax(student[0].index_select(0, rows), -1);
  const auto logq = at::log_softmax(teacher[0].index_select(0, rows), -1);
  const auto ce = at::nll_loss(logp, x0[0].index_select(0, rows));
  const auto kl = (logp.exp() * (logp - logq)).sum(-1).mean();
  const auto loss = ce + lambda * kl;
  loss.backward();
  auto& sparse_layer = *model.layers[kLayers - 1];
  EXPECT_TRUE(sparse_layer.wk->weight.grad().defined());
  EXPECT_GT(sparse_layer.wk->weight.grad().abs().sum().item<double>(), 0.0);
  opt.step();
  return {loss.item<double>(), kl.item<double>()};
}

TEST(MageFTStep, ThreePassObjectiveTrainsThroughTheOps) {
  // ~100 tiny op calls a step: one thread (intra-op threads only add synchronisation here).
  const int threads = at::get_num_threads();
  at::set_num_threads(1);
  torch::manual_seed(0);
  TinyBlockDiffusion model;
  torch::optim::Adam opt(model.parameters(), torch::optim::AdamOptions(1e-2));
  // A fixed batch: x0 repeats a short pattern, so the masked tokens are predictable from the
  // clean prefix the blocks read.
  const auto x0 = (at::arange(kTokens, at::kLong) % 7).unsqueeze(0);
  at::manual_seed(1);
  auto masked = at::rand({1, kTokens}) < 0.5;
  masked.index_put_({0, 0}, true);
  std::vector<StepResult> steps;
  for (int i = 0; i < 30; ++i) {
    steps.push_back(mage_ft_step(model, opt, x0, masked, 0.5));
    ASSERT_TRUE(std::isfinite(steps.back().loss)) << "step " << i;
    EXPECT_GE(steps.back().kl, -1e-6) << "step " << i;
  }
  EXPECT_LT(steps.back().loss, 0.5 * steps.front().loss)
      << "loss " << steps.front().loss << " -> " << steps.back().loss;
  at::set_num_threads(threads);
}

}  // namespace
