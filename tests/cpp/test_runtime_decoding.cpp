// The SDAR decoding rules (decoding.h) against mage_ext/decoding.py's documented behaviour.
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <cmath>

#include "runtime/decoding.h"
#include "runtime_test_util.h"

using namespace mage::runtime;  // NOLINT: the names under test
using mage_test::expect_error;

namespace {

std::vector<bool> row(const at::Tensor& pick) {
  std::vector<bool> v;
  for (int64_t i = 0; i < pick.size(-1); ++i) v.push_back(pick[0][i].item<bool>());
  return v;
}

}  // namespace

TEST(RuntimeDecoding, TransferScheduleSplitsEvenlyRemainderFirst) {
  EXPECT_EQ(transfer_schedule(4, 4), (std::vector<int64_t>{1, 1, 1, 1}));
  EXPECT_EQ(transfer_schedule(10, 4), (std::vector<int64_t>{3, 3, 2, 2}));
  EXPECT_EQ(transfer_schedule(16, 1), (std::vector<int64_t>{16}));
  expect_error([] { transfer_schedule(4, 0); }, {"steps"});
}

TEST(RuntimeDecoding, StaticFillsTheMostConfidentMaskedPositions) {
  at::Tensor p = at::tensor({0.99f, 0.2f, 0.7f, 0.5f}).view({1, 4});
  at::Tensor masked = at::tensor({0, 1, 1, 1}).eq(1).view({1, 4});  // 0.99 is known
  EXPECT_EQ(row(low_confidence_unmask(p, masked, 2, Remasking::Static, 0.9)),
            (std::vector<bool>{false, false, true, true}));
  // n beyond the masked count fills every masked position, never a known one.
  EXPECT_EQ(row(low_confidence_unmask(p, masked, 9, Remasking::Static, 0.9)),
            (std::vector<bool>{false, true, true, true}));
}

TEST(RuntimeDecoding, DynamicFillsAllAboveThresholdWhenAtLeastN) {
  at::Tensor p = at::tensor({0.95f, 0.2f, 0.97f, 0.93f}).view({1, 4});
  at::Tensor masked = at::ones({1, 4}, at::kBool);
  EXPECT_EQ(row(low_confidence_unmask(p, masked, 2, Remasking::Dynamic, 0.9)),
            (std::vector<bool>{true, false, true, true}));
  // Fewer than n above the threshold: the n most confident, as static.
  EXPECT_EQ(row(low_confidence_unmask(p, masked, 2, Remasking::Dynamic, 0.96)),
            (std::vector<bool>{true, false, true, false}));
}

TEST(RuntimeDecoding, NamesParseAndBadNamesListTheChoices) {
  EXPECT_EQ(parse_style("sdar"), Style::Sdar);
  EXPECT_EQ(parse_style("fast_dllm"), Style::FastDllm);
  EXPECT_EQ(parse_remasking("low_confidence_dynamic"), Remasking::Dynamic);
  expect_error([] { parse_style("llada"); }, {"fast_dllm or sdar", "'llada'"});
  expect_error([] { parse_remasking("random"); }, {"low_confidence_static", "'random'"});
}

TEST(RuntimeDecoding, SamplingIsDeterministicForASeed) {
  at::Tensor logits = at::randn({3, 5, 50}, at::TensorOptions().dtype(at::kFloat));
  auto draw = [&](uint64_t seed, double t, double p) {
    at::Generator g = at::make_generator<at::CPUGeneratorImpl>(seed);
    return sample(logits, t, p, g);
  };
  auto [a, pa] = draw(7, 0.8, 0.9);
  auto [b, pb] = draw(7, 0.8, 0.9);
  EXPECT_TRUE(at::equal(a, b));
  EXPECT_TRUE(at::equal(pa, pb));
  EXPECT_EQ(a.sizes(), (std::vector<int64_t>{3, 5}));
  bool differs = false;  // another seed draws other tokens somewhere (15 draws from 50 ways)
  for (uint64_t s = 8; s < 12 && !differs; ++s) differs = !at::equal(draw(s, 1.5, 1.0).first, a);
  EXPECT_TRUE(differs);
  // Temperature 0 is greedy; a tiny top-p keeps only the most likely token.
  auto [g, pg] = draw(1, 0.0, 1.0);
  EXPECT_TRUE(at::equal(g, logits.argmax(-1)));
  EXPECT_TRUE(at::allclose(pg, at::softmax(logits, -1).amax(-1)));
  EXPECT_TRUE(at::equal(draw(3, 1.0, 1e-6).first, logits.argmax(-1)));
  // The returned probability is the token's under the (renormalised) sampling distribution.
  auto [t, pt] = draw(5, 2.0, 1.0);
  at::Tensor want = at::softmax(logits / 2.0, -1).gather(-1, t.unsqueeze(-1)).squeeze(-1);
  EXPECT_TRUE(at::allclose(pt, want));
}

// The batched SDAR rule against the per-row rule of mage_ext/decoding.py, on random rows with
// varied masked counts (fewer masked positions than n included).
TEST(RuntimeDecoding, BatchedLowConfidenceEqualsThePerRowRule) {
  at::manual_seed(3);
  for (int trial = 0; trial < 50; ++trial) {
    const int64_t rows = 4, len = 12, n = 1 + trial % 5;
    at::Tensor probs = at::rand({rows, len});
    at::Tensor masked = at::rand({rows, len}) < (0.2 + 0.15 * (trial % 5));
    for (auto rule : {Remasking::Static, Remasking::Dynamic}) {
      at::Tensor got = low_confidence_unmask(probs, masked, n, rule, 0.6);
      at::Tensor conf = probs.masked_fill(masked.logical_not(), -INFINITY);
      for (int64_t r = 0; r < rows; ++r) {
        at::Tensor want = at::zeros({len}, at::kBool);
        const int64_t k = std::min<int64_t>(n, masked[r].sum().item<int64_t>());
        at::Tensor high = conf[r] > 0.6;
        if (rule == Remasking::Dynamic && high.sum().item<int64_t>() >= std::max<int64_t>(n, 1)) {
          want = high.clone();
        } else if (k > 0) {
          want.index_fill_(0, std::get<1>(conf[r].topk(k)), true);
        }
        EXPECT_TRUE(at::equal(got[r], want.logical_and(masked[r]))) << "trial " << trial << " row " << r;
      }
    }
  }
}
