// Training through the MAGE ops from LibTorch: the autograd Functions registered for the ops'
// Autograd key (csrc/autograd) serve C++ callers exactly as they serve Python.
#include <ATen/Parallel.h>
#include <gtest/gtest.h>
#include <torch/autograd.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/optim/adam.h>

#include <string>
#include <vector>

#include "mage/ops.h"

namespace {

// tokens -> embedding -> q/k/v projections -> MAGE attention of a block over a small cache plus
// the block itself -> linear head over the vocabulary.
struct TinyModel : torch::nn::Module {
  TinyModel(int64_t vocab, int64_t d_model, int64_t hq, int64_t hkv, int64_t dim)
      : hq(hq), hkv(hkv), dim(dim) {
    emb = register_module("emb", torch::nn::Embedding(vocab, d_model));
    wq = register_module("wq", torch::nn::Linear(d_model, hq * dim));
    wk = register_module("wk", torch::nn::Linear(d_model, hkv * dim));
    wv = register_module("wv", torch::nn::Linear(d_model, hkv * dim));
    head = register_module("head", torch::nn::Linear(hq * dim, vocab));
  }

  // [batch, T, n * dim] -> [batch, n, T, dim], rows contiguous (the ops' layout).
  at::Tensor heads(const at::Tensor& x, int64_t n) const {
    return x.view({x.size(0), x.size(1), n, dim}).transpose(1, 2).contiguous();
  }

  // Logits [batch, B, vocab]. With a selection (indices defined) the block reads the selected
  // cache entries (sparse_attention), else cache[:lens] (dense_attention).
  at::Tensor forward(const at::Tensor& cache_tokens, const at::Tensor& block_tokens,
                     const at::Tensor& lens, const at::Tensor& indices, const at::Tensor& counts) {
    const auto xc = emb->forward(cache_tokens), xb = emb->forward(block_tokens);
    const auto q = heads(wq->forward(xb), hq);
    const auto kc = heads(wk->forward(xc), hkv), vc = heads(wv->forward(xc), hkv);
    const auto kb = heads(wk->forward(xb), hkv), vb = heads(wv->forward(xb), hkv);
    at::Tensor out;
    if (indices.defined()) {
      out = std::get<0>(mage::sparse_attention(q, kc, vc, indices, counts, kb, vb));
    } else {
      out = std::get<0>(mage::dense_attention(q, kc, vc, lens, kb, vb));
    }
    return head->forward(out.transpose(1, 2).flatten(2));
  }

  int64_t hq, hkv, dim;
  torch::nn::Embedding emb{nullptr};
  torch::nn::Linear wq{nullptr}, wk{nullptr}, wv{nullptr}, head{nullptr};
};

// A fixed batch: the block's targets are cache tokens (so the loss needs the attention).
struct Batch {
  at::Tensor cache_tokens, block_tokens, targets, lens, indices, counts;
};

Batch make_batch(int64_t vocab, bool sparse) {
  at::manual_seed(7);
  Batch b;
  b.cache_tokens = at::randint(vocab, {2, 24}, at::kLong);
  b.block_tokens = at::randint(vocab, {2, 4}, at::kLong);
  b.targets = b.cache_tokens.slice(1, 3, 7);
  b.lens = at::tensor(std::vector<int32_t>{24, 13}, at::kInt);
  if (sparse) {  // positions 0..11 of each sequence and KV head
    b.indices = at::arange(12, at::kInt).view({1, 1, 12}).expand({2, 2, 12}).contiguous();
    b.counts = at::full({2, 2}, 12, at::kInt);
  }
  return b;
}

void expect_loss_falls(bool sparse) {
  const int64_t vocab = 17;
  torch::manual_seed(0);
  TinyModel model(vocab, 32, 4, 2, 16);
  torch::optim::Adam opt(model.parameters(), torch::optim::AdamOptions(3e-2));
  const auto batch = make_batch(vocab, sparse);
  std::vector<double> losses;
  for (int step = 0; step < 25; ++step) {
    opt.zero_grad();
    const auto logits = model.forward(batch.cache_tokens, batch.block_tokens, batch.lens,
                                      batch.indices, batch.counts);
    const auto loss = at::cross_entropy_loss(logits.flatten(0, 1), batch.targets.flatten());
    loss.backward();
    // Gradients reached the projections that only feed the attention.
    ASSERT_TRUE(model.wk->weight.grad().defined());
    ASSERT_GT(model.wk->weight.grad().abs().sum().item<double>(), 0.0);
    opt.step();
    losses.push_back(loss.item<double>());
  }
  EXPECT_LT(losses.back(), 0.5 * losses.front())
      << "loss " << losses.front() << " -> " << losses.back();
}

TEST(AutogradTraining, DenseAttentionModelLearns) { expect_loss_falls(false); }
TEST(AutogradTraining, SparseAttentionModelLearns) { expect_loss_falls(true); }

// sparse_attention's gradients against central finite differences in double (every element of
// every differentiable input): GQA 2, one sequence with k > its cache, one with an empty cache.
TEST(AutogradTraining, SparseGradientMatchesFiniteDifferences) {
  // ~2300 tiny forward calls: one thread (intra-op threads only add synchronisation here).
  const int threads = at::get_num_threads();
  at::set_num_threads(1);
  at::manual_seed(3);
  auto o = at::TensorOptions().dtype(at::kDouble);
  std::vector<at::Tensor> x = {at::randn({3, 4, 3, 8}, o), at::randn({3, 2, 6, 8}, o),
                               at::randn({3, 2, 6, 8}, o), at::randn({3, 2, 3, 8}, o),
                               at::randn({3, 2, 3, 8}, o)};
  const auto indices = at::tensor(std::vector<int32_t>{0, 2, 5, -1, 1, 3, 4, -1,  // seq 0
                                                       1, 2, -1, -1, 0, 2, -1, -1,  // seq 1
                                                       -1, -1, -1, -1, -1, -1, -1, -1},
                                  at::kInt)
                           .view({3, 2, 4});
  const auto counts = at::tensor(std::vector<int32_t>{3, 3, 2, 2, 0, 0}, at::kInt).view({3, 2});
  const auto w_out = at::randn({3, 4, 3, 8}, o), w_lse = at::randn({3, 4, 3}, o);
  auto f = [&](const std::vector<at::Tensor>& t) {
    auto [out, lse] = mage::sparse_attention(t[0], t[1], t[2], indices, counts, t[3], t[4]);
    return (out * w_out).sum() + (lse * w_lse).sum();
  };
  std::vector<at::Tensor> leaves;
  for (const auto& t : x) leaves.push_back(t.clone().requires_grad_());
  f(leaves).backward();
  const double eps = 1e-6;
  const char* names[] = {"q", "k_cache", "v_cache", "k_block", "v_block"};
  for (size_t i = 0; i < x.size(); ++i) {
    double* value = x[i].data_ptr<double>();  // contiguous: perturbed in place
    const auto grad = leaves[i].grad().contiguous();
    const double* analytic = grad.data_ptr<double>();
    for (int64_t e = 0; e < x[i].numel(); ++e) {
      const double v = value[e];
      value[e] = v + eps;
      const double up = f(x).item<double>();
      value[e] = v - eps;
      const double down = f(x).item<double>();
      value[e] = v;
      EXPECT_NEAR(analytic[e], (up - down) / (2 * eps), 1e-6) << names[i] << " element " << e;
    }
  }
  at::set_num_threads(threads);
}

TEST(AutogradTraining, OutFormsAndDoubleBackwardAreRefused) {
  auto q = at::randn({1, 2, 4, 8}).requires_grad_();
  auto kc = at::randn({1, 1, 5, 8}), kb = at::randn({1, 1, 4, 8});
  auto lens = at::tensor(std::vector<int32_t>{5}, at::kInt);
  auto out = at::empty({1, 2, 4, 8}), lse = at::empty({1, 2, 4});
  try {
    mage::dense_attention_out(q, kc, kc, lens, kb, kb, std::nullopt, out, lse);
    ADD_FAILURE() << "expected an error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what_without_backtrace())
                  .find("mage.dense_attention_out: q requires grad"),
              std::string::npos)
        << e.what_without_backtrace();
  }
  auto [o, l] = mage::dense_attention(q, kc, kc, lens, kb, kb);
  try {
    torch::autograd::grad({o.square().sum()}, {q}, {}, std::nullopt, /*create_graph=*/true);
    ADD_FAILURE() << "expected an error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what_without_backtrace()).find("double backward is not supported"),
              std::string::npos)
        << e.what_without_backtrace();
  }
}

}  // namespace
