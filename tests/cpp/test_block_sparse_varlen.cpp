// The packing of block_sparse_attention's fused backward (ops/block_sparse_varlen.h) on the CPU:
// with the plain reference of the variable-length kernel's contract in place of the CUDA kernel,
// its gradients equal the generic backward's, for uneven counts per KV head and block, empty
// selections, GQA and a batch of two (fp64, both lse layouts).
#include <gtest/gtest.h>

#include <string>
#include <tuple>
#include <vector>

#include "mage/ops.h"
#include "ops/attention_backward.h"
#include "ops/block_sparse_varlen.h"
#include "ops/checks.h"

namespace {

constexpr int64_t kBatch = 2, kHq = 6, kHkv = 2, kBlocks = 5, kBlock = 4, kDim = 8, kMax = 6;

// Block j of sequence b selects up to kMax ascending entries of its prefix [0, j * kBlock),
// fewer for KV head 1 in odd blocks; slots past the count hold -1.
std::tuple<at::Tensor, at::Tensor> selection(int64_t n_ctx) {
  auto idx = at::full({kBatch, kBlocks, kHkv, kMax}, -1, at::kInt);
  auto cnt = at::zeros({kBatch, kBlocks, kHkv}, at::kInt);
  for (int64_t b = 0; b < kBatch; ++b) {
    for (int64_t j = 0; j < kBlocks; ++j) {
      for (int64_t h = 0; h < kHkv; ++h) {
        const int64_t prefix = std::min(n_ctx, j * kBlock);
        int64_t n = std::min(kMax, prefix);
        if (h == 1 && j % 2 == 1) n /= 2;
        const auto pick = std::get<0>(at::randperm(prefix, at::kLong).narrow(0, 0, n).sort());
        for (int64_t c = 0; c < n; ++c) idx[b][j][h][c] = pick[c].item<int64_t>();
        cnt[b][j][h] = n;
      }
    }
  }
  return {idx, cnt};
}

TEST(BlockSparseVarlen, PackingWithReferenceKernelEqualsGeneric) {
  at::manual_seed(3);
  const auto o = at::TensorOptions().dtype(at::kDouble);
  const int64_t t = kBlocks * kBlock, n_ctx = t;
  const auto q = at::randn({kBatch, kHq, t, kDim}, o);
  const auto k_ctx = at::randn({kBatch, kHkv, n_ctx, kDim}, o);
  const auto v_ctx = at::randn({kBatch, kHkv, n_ctx, kDim}, o);
  const auto k_own = at::randn({kBatch, kHkv, t, kDim}, o);
  const auto v_own = at::randn({kBatch, kHkv, t, kDim}, o);
  const auto [idx, cnt] = selection(n_ctx);
  const auto [out, lse] =
      mage::block_sparse_attention(q, k_ctx, v_ctx, idx, cnt, k_own, v_own, kBlock, std::nullopt);
  const auto dout = at::randn_like(out);
  const auto want = mage::block_sparse_attention_backward_generic(
      dout, std::nullopt, q, k_ctx, v_ctx, idx, cnt, k_own, v_own, out, lse, kBlock, std::nullopt);
  const auto bd = mage::check_block_sparse_inputs("test", q, k_ctx, v_ctx, idx, cnt, k_own, v_own,
                                                  kBlock, std::nullopt);
  // rank 3: the reference reads lse flattened, which is the same order for [S, 1, rows].
  // Budgets: every block in one call; one block per call; groups of 3 (the last one shorter).
  const int64_t per_block = kBatch * kHkv * (kBlock + idx.size(3)) * kDim;
  for (int64_t budget : {mage::kVarlenBudgetElements, int64_t{1}, 3 * per_block})
  for (int rank : {2, 3}) {
    SCOPED_TRACE("budget " + std::to_string(budget) + ", lse rank " + std::to_string(rank));
    const auto got = mage::block_sparse_backward_varlen(dout, q, k_ctx, v_ctx, idx, cnt, k_own,
                                                        v_own, out, lse, kBlock, bd,
                                                        mage::varlen_backward_reference, rank,
                                                        budget);
    const std::vector<at::Tensor> g = {std::get<0>(got), std::get<1>(got), std::get<2>(got),
                                       std::get<3>(got), std::get<4>(got)};
    const std::vector<at::Tensor> w = {std::get<0>(want), std::get<1>(want), std::get<2>(want),
                                       std::get<3>(want), std::get<4>(want)};
    for (size_t i = 0; i < g.size(); ++i) {
      ASSERT_EQ(g[i].sizes(), w[i].sizes()) << i;
      EXPECT_TRUE(at::allclose(g[i], w[i], 1e-10, 1e-10))
          << "gradient " << i << " (rank " << rank << "): max diff "
          << (g[i] - w[i]).abs().max().item<double>();
    }
  }
}

}  // namespace
