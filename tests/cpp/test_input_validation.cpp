// Every bad input gives a c10::Error whose message names the argument.
#include <gtest/gtest.h>

#include <functional>
#include <string>

#include "mage/ops.h"

namespace {

void expect_error(const std::function<void()>& fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "expected an error mentioning '" << needle << "'";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what_without_backtrace()).find(needle), std::string::npos)
        << "message was: " << e.what_without_backtrace();
  }
}

struct Inputs {
  at::Tensor q = at::randn({2, 4, 8, 64});
  at::Tensor kc = at::randn({2, 2, 32, 64});
  at::Tensor vc = at::randn({2, 2, 32, 64});
  at::Tensor lens = at::tensor(std::vector<int32_t>{32, 5}, at::kInt);
  at::Tensor kb = at::randn({2, 2, 8, 64});
  at::Tensor vb = at::randn({2, 2, 8, 64});
  void dense() const { mage::dense_attention(q, kc, vc, lens, kb, vb); }
};

TEST(InputValidation, AttentionShapesDtypesAndLengths) {
  {
    Inputs in;
    in.q = at::randn({4, 8, 64});
    expect_error([&] { in.dense(); }, "q must be a 4-D tensor");
  }
  {
    Inputs in;
    in.q = at::randn({2, 5, 8, 64});
    expect_error([&] { in.dense(); }, "not a multiple of the 2 KV heads");
  }
  {
    Inputs in;
    in.kc = in.kc.to(at::kHalf);
    expect_error([&] { in.dense(); }, "k_cache has dtype");
  }
  {
    Inputs in;
    in.q = in.q.to(at::kInt);  // float64 is accepted on the CPU (gradient checks)
    expect_error([&] { in.dense(); }, "q must be float16, bfloat16 or float32");
  }
  {
    Inputs in;
    in.lens = at::tensor(std::vector<int32_t>{32}, at::kInt);
    expect_error([&] { in.dense(); }, "cache_lens must have 2 entries");
  }
  {
    Inputs in;
    in.lens = at::tensor(std::vector<int64_t>{32, 5});
    expect_error([&] { in.dense(); }, "cache_lens must have dtype Int");
  }
  {
    Inputs in;
    in.lens = at::tensor(std::vector<int32_t>{33, 5}, at::kInt);
    expect_error([&] { in.dense(); }, "cache_lens[0] = 33");
  }
  {
    Inputs in;
    in.kc = at::randn({2, 2, 0, 64});
    in.vc = at::randn({2, 2, 0, 64});
    expect_error([&] { in.dense(); }, "k_cache is empty");
  }
  {
    Inputs in;
    in.kb = at::randn({2, 2, 7, 64});
    expect_error([&] { in.dense(); }, "k_block must have shape");
  }
  {
    Inputs in;
    in.kc = at::randn({2, 2, 64, 32}).transpose(2, 3);
    expect_error([&] { in.dense(); }, "k_cache must have contiguous rows");
  }
}

TEST(InputValidation, NonContiguousQueriesAreHandled) {
  Inputs in;
  auto q_t = in.q.transpose(1, 2).contiguous().transpose(1, 2);  // HF layout view
  auto [a, la] = mage::dense_attention(q_t, in.kc, in.vc, in.lens, in.kb, in.vb);
  auto [b, lb] = mage::dense_attention(in.q, in.kc, in.vc, in.lens, in.kb, in.vb);
  EXPECT_TRUE(a.equal(b));
}

TEST(InputValidation, Selection) {
  Inputs in;
  auto idx = at::arange(4, at::kInt).expand({2, 2, 4}).contiguous();
  auto cnt = at::full({2, 2}, 4, at::kInt);
  auto run = [&] { mage::sparse_attention(in.q, in.kc, in.vc, idx, cnt, in.kb, in.vb); };
  run();  // ascending, unique, inside the cache
  idx[1][0][2] = 32;
  expect_error(run, "indices[1, 0, 2] = 32 is outside the cache");
  idx[1][0][2] = -3;
  expect_error(run, "indices[1, 0, 2] = -3");
  idx[1][0][2] = 1;  // a repeat of indices[1, 0, 1]
  expect_error(run, "indices[1, 0, 2] = 1 does not follow indices[1, 0, 1] = 1");
  idx[1][0][2] = 0;  // descending
  expect_error(run, "indices[1, 0, 2] = 0 does not follow");
  cnt[1][0] = 2;  // the bad entry is past the count: not read, not checked
  run();
  cnt[1][0] = 4;
  idx[1][0][2] = 2;
  cnt[0][1] = 5;
  expect_error(run, "counts[0, 1] = 5");
  cnt = at::full({2}, 4, at::kInt);
  expect_error(run, "counts must be a 2-D tensor");
  cnt = at::full({2, 2}, 4, at::kInt);
  idx = idx.to(at::kLong);
  expect_error(run, "indices must have dtype Int");
}

TEST(InputValidation, Topk) {
  auto scores = at::rand({2, 2, 32});
  auto lens = at::tensor(std::vector<int32_t>{32, 5}, at::kInt);
  expect_error([&] { mage::topk_select(scores, lens, 0); }, "k must be >= 1");
  expect_error([&] { mage::topk_select(scores, lens, 33); }, "larger than the cache capacity");
  expect_error([&] { mage::topk_select(scores, lens, 4, 3, 2); }, "n_sink + n_recent");
  expect_error([&] { mage::topk_select(scores.to(at::kHalf), lens, 4); },
               "scores must have dtype Float");
  expect_error([&] { mage::topk_select(at::rand({2, 2, 0}), lens, 1); }, "scores is empty");
}

TEST(InputValidation, AppendOverflow) {
  auto kc = at::zeros({1, 2, 10, 4});
  auto vc = at::zeros({1, 2, 10, 4});
  auto kb = at::randn({1, 2, 4, 4});
  auto lens = at::tensor(std::vector<int32_t>{7}, at::kInt);
  expect_error([&] { mage::append_kv(kc, vc, lens, kb, kb); }, "does not fit the cache");
}

}  // namespace

// mage::linear (every GEMM of the C++ runtime's forward): at::linear's values on the CPU, and its
// own checks by name.
TEST(InputValidation, Linear) {
  const at::Tensor x = at::randn({2, 3, 16}), w = at::randn({5, 16}), b = at::randn({5});
  EXPECT_TRUE(at::equal(mage::linear(x, w, b), at::linear(x, w, b)));
  EXPECT_TRUE(at::equal(mage::linear(x, w), at::linear(x, w)));
  expect_error([&] { mage::linear(x, at::randn({5, 15})); }, "x must be [..., K] with K");
  expect_error([&] { mage::linear(x, at::randn({16})); }, "weight must be a 2-D tensor");
  expect_error([&] { mage::linear(x, w.to(at::kDouble)); }, "weight has dtype");
  expect_error([&] { mage::linear(x, w, at::randn({4})); }, "bias must have shape");
}
