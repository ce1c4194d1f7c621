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
                 int64_t capacity, at::ScalarType dtype, Policy policy, at::Device device)
    : indices_(n_layers), counts_(n_layers), selected_(n_layers, false),
      policy_(std::move(policy)), capacity_(capacity) {
  policy_.validate();
  auto opts = at::TensorOptions().dtype(dtype).device(device);
  for (int64_t l = 0; l < n_layers; ++l) {
    keys_.push_back(at::zeros({batch, n_kv_heads, capacity, head_dim}, opts));
    values_.push_back(at::zeros({batch, n_kv_heads, capacity, head_dim}, opts));
  }
  // The budget clamped to what the scores can hold (selectors/mage.py _topk).
  budget_ = std::max<int64_t>(1, std::min(policy_.k, capacity));
  const auto ints = at::TensorOptions().dtype(at::kInt).device(device);
  int64_t sparse = 0;
  for (int64_t l = 0; l < n_layers; ++l) sparse += !policy_.dense_layer(l);
  // One tensor of every sparse layer's counts: a forward's reads are one reduction over it.
  sparse_counts_ = at::zeros({sparse, batch, n_kv_heads}, ints);
  for (int64_t l = 0, i = 0; l < n_layers; ++l) {
    if (policy_.dense_layer(l)) continue;
    indices_[l] = at::full({batch, n_kv_heads, budget_}, -1, ints);
    counts_[l] = sparse_counts_[i++];
  }
  lens_ = at::zeros({batch}, ints);
  read_ = at::zeros({}, at::TensorOptions().dtype(at::kDouble).device(device));
  full_ = at::zeros({}, at::TensorOptions().dtype(at::kDouble).device(device));
}

void KVCache::end_forward(int64_t block_len) {
  if (phase_ != Phase::Prefill) {
    count_reads();
    ++step_;
  }
  if (phase_ != Phase::Denoise) {  // lengths advance after every layer has written
    if (advance_.defined()) lens_.add_(advance_);
    else lens_.add_(block_len);
    max_len_ += block_len;  // an upper bound of the longest row, kept on the host
  }
}

at::Tensor KVCache::attend(int64_t layer, const at::Tensor& q, const at::Tensor& k,
                           const at::Tensor& v, double scale) {
  if (phase_ != Phase::Denoise && max_len_ + k.size(2) > capacity_)
    throw std::runtime_error("KVCache: writing " + std::to_string(k.size(2)) +
                             " entries past the capacity " + std::to_string(capacity_));
  // A prefill chunk is written first: block j of a multi-block chunk reads the chunk's blocks
  // before it from the cache (the lengths advance only in end_forward, so nothing else changes).
  if (phase_ == Phase::Prefill) {
    mage::append_kv(keys_[layer], values_[layer], lens_, k, v);
    return prefill_attention(layer, q, k, v, scale);
  }
  at::Tensor out = select_and_attend(layer, q, k, v, scale);
  if (phase_ == Phase::Commit) mage::append_kv(keys_[layer], values_[layer], lens_, k, v);
  return out;
}

at::Tensor KVCache::prefill_attention(int64_t layer, const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v, double scale) {
  const int64_t n = q.size(2);
  if (block_ > 0 && n != block_ && !starts_.empty())
    return std::get<0>(mage::block_attention(q, keys_[layer], values_[layer], k, v, block_,
                                             starts_, scale));
  return std::get<0>(mage::dense_attention(q, keys_[layer], values_[layer], lens_, k, v, scale));
}

at::Tensor KVCache::select_and_attend(int64_t layer, const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v, double scale) {
  const at::Tensor &kc = keys_[layer], &vc = values_[layer];
  if (policy_.dense_layer(layer) || (phase_ == Phase::Commit && policy_.commit_exact)) {
    return std::get<0>(mage::dense_attention(q, kc, vc, lens_, k, v, scale));
  }
  if (phase_ == Phase::Denoise && step_ == 0) {
    auto [out, lse, scores] = mage::attention_with_scores(q, kc, vc, lens_, k, v, scale);
    // sink/recent clamped into the budget (selectors/mage.py _topk).
    const int64_t sink = std::min(policy_.n_sink, budget_);
    const int64_t recent = std::min(policy_.n_recent, budget_ - sink);
    mage::topk_select_out(scores, lens_, budget_, sink, recent, indices_[layer], counts_[layer]);
    selected_[layer] = true;
    return out;
  }
  if (!selected_[layer])
    throw std::runtime_error("KVCache: layer " + std::to_string(layer) +
                             " has no selection; step 0 of the block must run first");
  return std::get<0>(mage::sparse_attention(q, kc, vc, indices_[layer], counts_[layer], k, v, scale));
}

void KVCache::count_reads() {
  // As eval/traffic.py entries_read: entries per KV head, summed over the batch and the layers;
  // once per forward (the lengths hold until end_forward advances them), a few kernels rather
  // than a few per layer. Dense this forward: the dense layers, every layer at a block's first
  // step (the exact, selecting pass) and at an exact commit; the rest read their selection.
  const int64_t layers = static_cast<int64_t>(keys_.size()), sparse = sparse_counts_.size(0);
  const bool all_dense = (phase_ == Phase::Denoise && step_ == 0) ||
                         (phase_ == Phase::Commit && policy_.commit_exact);
  const int64_t dense = all_dense ? layers : layers - sparse;
  at::Tensor full = lens_.to(at::kDouble).sum();
  full_.add_(full, static_cast<double>(layers));
  read_.add_(full, static_cast<double>(dense));
  if (dense < layers) read_.add_(sparse_counts_.to(at::kDouble).mean(2).sum());
}

double KVCache::kv_fraction() const {
  const double full = full_.item<double>();
  return full > 0 ? read_.item<double>() / full : 1.0;
}

}  // namespace mage::runtime
