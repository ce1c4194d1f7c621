// The tensor ops follow mage_ext/decoding.py one for one (softmax then max; argmax and topk of
// the masked confidences) so ties break as in Python and the tokens are identical.
#include "runtime/decoding.h"

#include <algorithm>
#include <limits>
#include <stdexcept>

namespace mage::runtime {
namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

}  // namespace

Style parse_style(const std::string& name) {
  if (name == "fast_dllm") return Style::FastDllm;
  if (name == "sdar") return Style::Sdar;
  throw std::invalid_argument("expected fast_dllm or sdar, got '" + name + "'");
}

Remasking parse_remasking(const std::string& name) {
  if (name == "low_confidence_static") return Remasking::Static;
  if (name == "low_confidence_dynamic") return Remasking::Dynamic;
  throw std::invalid_argument(
      "expected low_confidence_static or low_confidence_dynamic, got '" + name + "'");
}

std::pair<at::Tensor, at::Tensor> greedy(const at::Tensor& logits) {
  auto [p, tok] = at::softmax(logits.to(at::kFloat), -1).max(-1);
  return {tok, p};
}

at::Tensor threshold_unmask(const at::Tensor& probs, const at::Tensor& masked, double threshold) {
  at::Tensor conf = probs.masked_fill(masked.logical_not(), kNegInf);
  at::Tensor pick = conf > threshold;
  pick.scatter_(-1, conf.argmax(-1, /*keepdim=*/true), true);
  return pick.logical_and(masked);
}

std::vector<int64_t> transfer_schedule(int64_t block_size, int64_t steps) {
  if (steps <= 0) throw std::invalid_argument("transfer_schedule: steps must be > 0");
  std::vector<int64_t> n(steps, block_size / steps);
  for (int64_t i = 0; i < block_size % steps; ++i) ++n[i];
  return n;
}

at::Tensor low_confidence_unmask(const at::Tensor& probs, const at::Tensor& masked, int64_t n,
                                 Remasking rule, double threshold) {
  at::Tensor conf = probs.masked_fill(masked.logical_not(), kNegInf);
  at::Tensor pick = at::zeros_like(masked);
  for (int64_t row = 0; row < conf.size(0); ++row) {
    const int64_t k = std::min(n, masked[row].sum().item<int64_t>());
    at::Tensor high = conf[row] > threshold;
    if (rule == Remasking::Dynamic && high.sum().item<int64_t>() >= std::max<int64_t>(n, 1)) {
      pick[row].copy_(high);
    } else if (k > 0) {
      pick[row].index_fill_(0, std::get<1>(conf[row].topk(k)), true);
    }
  }
  return pick.logical_and(masked);
}

}  // namespace mage::runtime
