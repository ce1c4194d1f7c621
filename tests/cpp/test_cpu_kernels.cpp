// CPU kernels against the naive fp64 reference (tests/cpp/naive_reference.h).
#include <gtest/gtest.h>

#include <algorithm>

#include "mage/ops.h"
#include "naive_reference.h"

namespace {

struct Case {
  int64_t batch, hq, hkv, block, dim, capacity;
  std::vector<int32_t> lens;
};

struct Inputs {
  at::Tensor q, k_cache, v_cache, cache_lens, k_block, v_block;
};

Inputs make_inputs(const Case& c, at::ScalarType dtype, uint64_t seed) {
  at::manual_seed(seed);
  auto o = at::TensorOptions().dtype(dtype);
  return {at::randn({c.batch, c.hq, c.block, c.dim}, o),
          at::randn({c.batch, c.hkv, c.capacity, c.dim}, o),
          at::randn({c.batch, c.hkv, c.capacity, c.dim}, o),
          at::tensor(c.lens, at::kInt),
          at::randn({c.batch, c.hkv, c.block, c.dim}, o),
          at::randn({c.batch, c.hkv, c.block, c.dim}, o)};
}

double max_err(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

const std::vector<Case> kCases = {
    {1, 4, 4, 4, 64, 33, {33}},             // MHA, odd length
    {2, 6, 2, 5, 64, 70, {70, 3}},          // GQA 3, unequal lengths
    {3, 8, 2, 8, 128, 129, {0, 129, 64}},   // GQA 4, an empty sequence, d = 128
    {1, 7, 1, 32, 64, 2100, {2077}},        // MQA, crosses the kernel's 2048 chunk
};

TEST(CpuKernels, DenseMatchesNaive) {
  for (const auto& c : kCases) {
    auto in = make_inputs(c, at::kFloat, 1);
    auto [out, lse] = mage::dense_attention(in.q, in.k_cache, in.v_cache, in.cache_lens,
                                            in.k_block, in.v_block);
    auto ref = mage_test::naive_attention(in.q, in.k_cache, in.v_cache, in.cache_lens,
                                          in.k_block, in.v_block);
    EXPECT_LT(max_err(out, ref.out), 1e-4) << "batch " << c.batch << " hq " << c.hq;
    EXPECT_LT(max_err(lse, ref.lse), 1e-4);
  }
}

TEST(CpuKernels, ScoresMatchNaive) {
  for (const auto& c : kCases) {
    auto in = make_inputs(c, at::kFloat, 2);
    auto [out, lse, scores] = mage::attention_with_scores(
        in.q, in.k_cache, in.v_cache, in.cache_lens, in.k_block, in.v_block);
    auto ref = mage_test::naive_attention(in.q, in.k_cache, in.v_cache, in.cache_lens,
                                          in.k_block, in.v_block);
    EXPECT_LT(max_err(out, ref.out), 1e-4);
    EXPECT_LT(max_err(scores, ref.scores), 1e-6);
  }
}

TEST(CpuKernels, SparseMatchesNaiveOnRandomSelections) {
  for (const auto& c : kCases) {
    auto in = make_inputs(c, at::kFloat, 3);
    const int64_t k = std::min<int64_t>(c.capacity, 17);
    auto indices = at::full({c.batch, c.hkv, k}, -1, at::kInt);
    auto counts = at::zeros({c.batch, c.hkv}, at::kInt);
    for (int64_t b = 0; b < c.batch; ++b) {
      for (int64_t h = 0; h < c.hkv; ++h) {
        const int64_t n = std::min<int64_t>(k, c.lens[b]);
        auto perm = at::randperm(c.lens[b], at::kInt).narrow(0, 0, n);
        indices[b][h].narrow(0, 0, n).copy_(std::get<0>(perm.sort()));
        counts[b][h] = n;
      }
    }
    auto [out, lse] = mage::sparse_attention(in.q, in.k_cache, in.v_cache, indices, counts,
                                             in.k_block, in.v_block);
    auto ref = mage_test::naive_attention(in.q, in.k_cache, in.v_cache, in.cache_lens,
                                          in.k_block, in.v_block, indices, counts);
    EXPECT_LT(max_err(out, ref.out), 1e-4);
    EXPECT_LT(max_err(lse, ref.lse), 1e-4);
  }
}

TEST(CpuKernels, SparseWithEverythingSelectedEqualsDense) {
  const Case c{2, 4, 2, 8, 64, 50, {50, 21}};
  auto in = make_inputs(c, at::kBFloat16, 4);
  auto [idx, cnt] = mage::topk_select(at::rand({2, 2, 50}), in.cache_lens, 50);
  auto [sparse, sparse_lse] = mage::sparse_attention(in.q, in.k_cache, in.v_cache, idx, cnt,
                                                     in.k_block, in.v_block);
  auto [dense, dense_lse] = mage::dense_attention(in.q, in.k_cache, in.v_cache, in.cache_lens,
                                                  in.k_block, in.v_block);
  EXPECT_EQ(max_err(sparse, dense), 0.0);
  EXPECT_LT(max_err(sparse_lse, dense_lse), 1e-5);
}

TEST(CpuKernels, TopkKeepsLargestSinksAndRecents) {
  at::manual_seed(5);
  auto scores = at::rand({2, 3, 40});
  auto lens = at::tensor(std::vector<int32_t>{40, 7}, at::kInt);
  auto [idx, cnt] = mage::topk_select(scores, lens, 10, /*n_sink=*/2, /*n_recent=*/3);
  EXPECT_EQ(cnt[0][0].item<int>(), 10);
  EXPECT_EQ(cnt[1][2].item<int>(), 7);  // fewer valid positions than k
  for (int64_t h = 0; h < 3; ++h) {
    auto sel = idx[0][h];
    EXPECT_TRUE(sel.equal(std::get<0>(sel.sort())));  // ascending
    for (int j : {0, 1, 37, 38, 39}) EXPECT_TRUE((sel == j).any().item<bool>()) << j;
    // The 5 free slots hold the 5 largest middle scores (compared by sum: ties).
    auto middle = scores[0][h].narrow(0, 2, 35);
    auto want = std::get<0>(middle.topk(5)).sum().item<double>();
    auto got = scores[0][h].index_select(0, sel.narrow(0, 2, 5).to(at::kLong)).sum();
    EXPECT_NEAR(got.item<double>(), want, 1e-6);
    EXPECT_TRUE(idx[1][h].narrow(0, 0, 7).equal(at::arange(7, at::kInt)));
    EXPECT_TRUE((idx[1][h].narrow(0, 7, 3) == -1).all().item<bool>());
  }
}

TEST(CpuKernels, AppendKvWritesAtEachSequenceEnd) {
  auto kc = at::zeros({2, 2, 10, 4});
  auto vc = at::zeros({2, 2, 10, 4});
  auto kb = at::randn({2, 2, 3, 4});
  auto vb = at::randn({2, 2, 3, 4});
  auto lens = at::tensor(std::vector<int32_t>{0, 7}, at::kInt);
  mage::append_kv(kc, vc, lens, kb, vb);
  EXPECT_TRUE(kc[0].narrow(1, 0, 3).equal(kb[0]));
  EXPECT_TRUE(vc[1].narrow(1, 7, 3).equal(vb[1]));
  EXPECT_EQ(kc[0].narrow(1, 3, 7).abs().sum().item<double>(), 0.0);
}

}  // namespace
