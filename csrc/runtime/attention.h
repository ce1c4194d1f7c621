// The KV cache and the attention policy of one generation: the C++ counterpart of
// mage_ext/hf/cache.py (MageCache), mage_ext/hf/attention.py and mage_ext/selectors/mage.py.
// Every attention call goes through the project's ops (mage/ops.h), so the C++ runtime and the
// Python path run the same kernels on the same cache layout.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

namespace mage::runtime {

struct Policy {
  std::string method = "mage";   // "exact" or "mage" (fixed budget)
  int64_t k = 512;               // cache entries per (layer, KV head) at sparse steps
  int64_t dense_layers = 2;      // the first layers always read the whole cache
  int64_t n_sink = 0;            // first cache positions always kept (count towards k)
  int64_t n_recent = 0;          // last cache positions always kept (count towards k)
  bool commit_exact = false;     // commit forward: exact instead of sparse (commit_attention)

  void validate() const;         // the PolicyConfig checks; throws std::invalid_argument
  bool dense_layer(int64_t layer) const { return method == "exact" || layer < dense_layers; }
};

enum class Phase { Prefill, Denoise, Commit };

class KVCache {
 public:
  KVCache(int64_t n_layers, int64_t batch, int64_t n_kv_heads, int64_t head_dim,
          int64_t capacity, at::ScalarType dtype, Policy policy);

  // Phases, as MageCache: begin_* before a forward, end_forward() after it.
  // Prefill of a prompt chunk: only rows with `advance` true (bool [batch]; undefined: all)
  // keep it; the others are scratch rows, written past their length and never read.
  void begin_prefill(at::Tensor advance = {}) {
    phase_ = Phase::Prefill;
    advance_ = std::move(advance);
  }
  void begin_block();
  void begin_step(bool commit) {
    phase_ = commit ? Phase::Commit : Phase::Denoise;
    advance_ = at::Tensor();
  }
  void end_forward(int64_t block_len);

  // One layer's attention: q [batch, Hq, B, d], k/v [batch, Hkv, B, d] (RoPE applied,
  // contiguous). Returns [batch, Hq, B, d]; prefill and commit also write k/v to the cache.
  at::Tensor attend(int64_t layer, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    double scale);

  const at::Tensor& cache_lens() const { return lens_; }
  int64_t step() const { return step_; }
  Phase phase() const { return phase_; }
  double kv_fraction() const { return full_ > 0 ? read_ / full_ : 1.0; }

 private:
  at::Tensor select_and_attend(int64_t layer, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, double scale);
  void count_read(const at::Tensor* counts);

  std::vector<at::Tensor> keys_, values_;
  at::Tensor lens_;                       // int32 [batch], shared by all layers
  at::Tensor advance_;                    // rows whose lengths the prefill advances
  std::vector<std::optional<std::pair<at::Tensor, at::Tensor>>> selections_;  // (indices, counts)
  Policy policy_;
  int64_t capacity_, max_len_ = 0;
  Phase phase_ = Phase::Prefill;
  int64_t step_ = 0;
  double read_ = 0.0, full_ = 0.0;        // entries read vs. a dense read (denoise/commit)
};

}  // namespace mage::runtime
