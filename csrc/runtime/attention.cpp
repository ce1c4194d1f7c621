// MAGE per non-dense layer and block: step 0 runs exact attention with importance scores and
// takes their top-k (the block's selection); later steps and (by default) the commit forward
// read only the selection plus the block itself. Prefill is dense and block-causal.
#include "runtime/attention.h"

#include <algorithm>
#include <stdexcept>

#include "mage/ops.h"

namespace mage::runtime {

void Policy::validate() const {
  if (method != "exact" && method != "mage")
    throw std::invalid_argument("policy: unknown method '" + method + "' (exact or mage)");
  if (k <= 0) throw std::invalid_argument("policy: k must be > 0, got " + std::to_string(k));
  if (dense_layers < 0 || n_sink < 0 || n_recent < 0)
    throw std::invalid_argument("policy: dense_layers, n_sink and n_recent must be >= 0");
  if (n_sink + n_recent > k)
    throw std::invalid_argument("policy: n_sink + n_recent must not exceed k");
}

KVCache::KVCache(int64_t n_layers, int64_t batch, int64_t n_kv_heads, int64_t head_dim,
                 int64_t capacity, at::ScalarType dtype, Policy policy)
    : selections_(n_layers), policy_(std::move(policy)), capacity_(capacity) {
  policy_.validate();
  auto opts = at::TensorOptions().dtype(dtype);
  for (int64_t l = 0; l < n_layers; ++l) {
    keys_.push_back(at::zeros({batch, n_kv_heads, capacity, head_dim}, opts));
    values_.push_back(at::zeros({batch, n_kv_heads, capacity, head_dim}, opts));
  }
  lens_ = at::zeros({batch}, at::TensorOptions().dtype(at::kInt));
}

void KVCache::begin_block() {
  std::fill(selections_.begin(), selections_.end(), std::nullopt);
  step_ = 0;
}

void KVCache::end_forward(int64_t block_len) {
  if (phase_ != Phase::Prefill) ++step_;
  if (phase_ != Phase::Denoise) {  // lengths advance after every layer has written
    at::Tensor add = at::full_like(lens_, block_len);
    if (advance_.defined()) add.mul_(advance_.to(at::kInt));
    lens_ += add;
    max_len_ += block_len;  // an upper bound of the longest row
  }
}

at::Tensor KVCache::attend(int64_t layer, const at::Tensor& q, const at::Tensor& k,
                           const at::Tensor& v, double scale) {
  at::Tensor out;
  if (phase_ == Phase::Prefill) {
    out = std::get<0>(mage::dense_attention(q, keys_[layer], values_[layer], lens_, k, v, scale));
  } else {
    out = select_and_attend(layer, q, k, v, scale);
  }
  if (phase_ != Phase::Denoise) {
    if (max_len_ + k.size(2) > capacity_)
      throw std::runtime_error("KVCache: writing " + std::to_string(k.size(2)) +
                               " entries past the capacity " + std::to_string(capacity_));
    mage::append_kv(keys_[layer], values_[layer], lens_, k, v);
  }
  return out;
}

at::Tensor KVCache::select_and_attend(int64_t layer, const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v, double scale) {
  const at::Tensor &kc = keys_[layer], &vc = values_[layer];
  if (policy_.dense_layer(layer) || (phase_ == Phase::Commit && policy_.commit_exact)) {
    count_read(nullptr);
    return std::get<0>(mage::dense_attention(q, kc, vc, lens_, k, v, scale));
  }
  if (phase_ == Phase::Denoise && step_ == 0) {
    auto [out, lse, scores] = mage::attention_with_scores(q, kc, vc, lens_, k, v, scale);
    // Budget clamped to the capacity; sink/recent clamped into it (selectors/mage.py _topk).
    const int64_t kk = std::max<int64_t>(1, std::min<int64_t>(policy_.k, scores.size(-1)));
    const int64_t sink = std::min(policy_.n_sink, kk);
    const int64_t recent = std::min(policy_.n_recent, kk - sink);
    auto [indices, counts] = mage::topk_select(scores, lens_, kk, sink, recent);
    selections_[layer] = std::make_pair(indices, counts);
    count_read(nullptr);
    return out;
  }
  const auto& sel = selections_[layer];
  if (!sel)
    throw std::runtime_error("KVCache: layer " + std::to_string(layer) +
                             " has no selection; step 0 of the block must run first");
  count_read(&sel->second);
  return std::get<0>(mage::sparse_attention(q, kc, vc, sel->first, sel->second, k, v, scale));
}

void KVCache::count_read(const at::Tensor* counts) {
  // As eval/traffic.py entries_read: entries per KV head, summed over the batch.
  const double full = lens_.to(at::kDouble).sum().item<double>();
  full_ += full;
  read_ += counts ? counts->to(at::kDouble).mean(1).sum().item<double>() : full;
}

}  // namespace mage::runtime
