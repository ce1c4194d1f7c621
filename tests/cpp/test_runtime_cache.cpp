// KVCache lengths in a batch (attention.h): a prefill chunk advances each row by the tokens it
// keeps (the rest are scratch, as MageCache.begin_prefill(advance)); commits advance every row.
#include <gtest/gtest.h>

#include <vector>

#include "runtime/attention.h"

using mage::runtime::KVCache;
using mage::runtime::Policy;

namespace {

std::vector<int> lens(const KVCache& c) {
  at::Tensor t = c.cache_lens().contiguous();
  return std::vector<int>(t.data_ptr<int>(), t.data_ptr<int>() + t.numel());
}

}  // namespace

TEST(RuntimeCache, PrefillAdvancesOnlyTheRowsThatHoldTheChunk) {
  Policy exact;
  exact.method = "exact";
  KVCache c(/*n_layers=*/1, /*batch=*/3, /*n_kv_heads=*/1, /*head_dim=*/4, /*capacity=*/64,
            at::kFloat, exact);
  c.begin_prefill(at::tensor({8, 0, 8}, at::kInt));
  c.end_forward(8);
  EXPECT_EQ(lens(c), (std::vector<int>{8, 0, 8}));
  c.begin_prefill();  // no counts: every row keeps the chunk
  c.end_forward(8);
  EXPECT_EQ(lens(c), (std::vector<int>{16, 8, 16}));
  c.begin_prefill(at::tensor({16, 8, 0}, at::kInt), /*block=*/8, {16, 8, 16});  // 2 blocks
  c.end_forward(16);
  EXPECT_EQ(lens(c), (std::vector<int>{32, 16, 16}));
  c.begin_step(/*commit=*/false);  // denoising writes nothing
  c.end_forward(8);
  c.begin_step(/*commit=*/true);
  c.end_forward(8);
  EXPECT_EQ(lens(c), (std::vector<int>{40, 24, 24}));
}
