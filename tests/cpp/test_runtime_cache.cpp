// KVCache lengths in a batch (attention.h): a prefill chunk advances only the rows that hold it
// (the others are scratch rows, as MageCache.begin_prefill(advance)); commits advance every row.
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
  c.begin_prefill(at::tensor({1, 0, 1}).eq(1));
  c.end_forward(8);
  EXPECT_EQ(lens(c), (std::vector<int>{8, 0, 8}));
  c.begin_prefill();  // no mask: every row
  c.end_forward(8);
  EXPECT_EQ(lens(c), (std::vector<int>{16, 8, 16}));
  c.begin_step(/*commit=*/false);  // denoising writes nothing
  c.end_forward(8);
  c.begin_step(/*commit=*/true);
  c.end_forward(8);
  EXPECT_EQ(lens(c), (std::vector<int>{24, 16, 24}));
}
