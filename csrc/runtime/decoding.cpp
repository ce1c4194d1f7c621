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

std::pair<at::Tensor, at::Tensor> sample(const at::Tensor& logits, double temperature,
                                         double top_p, const at::Generator& generator) {
  if (temperature <= 0) return greedy(logits);
  at::Tensor probs = at::softmax(logits.to(at::kFloat) / temperature, -1);
  if (top_p < 1.0) {
    auto [sorted_p, order] = probs.sort(-1, /*descending=*/true);
    at::Tensor drop = (sorted_p.cumsum(-1) - sorted_p) > top_p;  // keep the smallest prefix
    probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0));
    probs = probs / probs.sum(-1, /*keepdim=*/true);
  }
  at::Tensor flat = probs.reshape({-1, probs.size(-1)});
  at::Tensor tok = at::multinomial(flat, 1, /*replacement=*/false, generator)
                       .reshape(probs.sizes().slice(0, probs.dim() - 1));
  return {tok, probs.gather(-1, tok.unsqueeze(-1)).squeeze(-1)};
}

at::Tensor threshold_unmask(const at::Tensor& probs, const at::Tensor& masked, double threshold) {
  at::Tensor conf = probs.masked_fill(masked.logical_not(), kNegInf);
  at::Tensor pick = conf > threshold;
  pick.scatter_(-1, conf.argmax(-1, /*keepdim=*/true), true);
  return pick.logical_and(masked);
}

at::Tensor fast_dllm_unmask(const at::Tensor& probs, const at::Tensor& masked, int64_t sub_block,
                            double threshold) {
  const int64_t batch = masked.size(0), block = masked.size(1);
  at::Tensor has = masked.view({batch, block / sub_block, sub_block}).any(-1);
  at::Tensor active = has.to(at::kInt).argmax(-1);  // the first sub-block with a [MASK]
  at::Tensor sub = at::arange(block, masked.options().dtype(at::kLong)).div(sub_block, "floor");
  at::Tensor in_active = sub.unsqueeze(0).eq(active.unsqueeze(-1));
  return threshold_unmask(probs, masked.logical_and(in_active), threshold);
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
  // As Python's fill_most_confident: each position's rank in a stable descending sort (ties
  // go to the lower position), the n best kept; unmasked (-inf) ones are dropped below.
  at::Tensor rank = at::argsort(at::argsort(conf, /*stable=*/true, -1, /*descending=*/true),
                                /*stable=*/true, -1);
  at::Tensor pick = rank < n;
  if (rule == Remasking::Dynamic) {
    at::Tensor high = conf > threshold;
    at::Tensor enough = high.sum(-1, /*keepdim=*/true) >= std::max<int64_t>(n, 1);
    pick = at::where(enough, high, pick);
  }
  return pick.logical_and(masked);
}

}  // namespace mage::runtime
