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

std::vector<int64_t> transfer_schedule(int64_t block_size, int64_t steps) {
  if (steps <= 0) throw std::invalid_argument("transfer_schedule: steps must be > 0");
  std::vector<int64_t> n(steps, block_size / steps);
  for (int64_t i = 0; i < block_size % steps; ++i) ++n[i];
  return n;
}

at::Tensor low_confidence_unmask(const at::Tensor& probs, const at::Tensor& masked, int64_t n,
                                 Remasking rule, double threshold) {
  at::Tensor conf = probs.masked_fill(masked.logical_not(), kNegInf);
  // Python takes topk(min(n, masked count)) per row: the n best of a row with fewer masked
  // positions include unmasked (-inf) ones, which the final `& masked` drops: the same set.
  const int64_t k = std::min<int64_t>(n, conf.size(-1));
  at::Tensor pick = at::zeros_like(masked);
  if (k > 0) pick.scatter_(-1, std::get<1>(conf.topk(k, -1)), true);
  if (rule == Remasking::Dynamic) {
    at::Tensor high = conf > threshold;
    at::Tensor enough = high.sum(-1, /*keepdim=*/true) >= std::max<int64_t>(n, 1);
    pick = at::where(enough, high, pick);
  }
  return pick.logical_and(masked);
}

}  // namespace mage::runtime
