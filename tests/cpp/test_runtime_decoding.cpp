// The SDAR decoding rules (decoding.h) against mage_ext/decoding.py's documented behaviour.
#include <gtest/gtest.h>

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
