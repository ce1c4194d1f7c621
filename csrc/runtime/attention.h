// The KV cache and the attention policy of one generation: the C++ counterpart of
// mage_ext/hf/cache.py (MageCache), mage_ext/hf/attention.py and mage_ext/selectors/mage.py.
// Every attention call goes through the project's ops (mage/ops.h), so the C++ runtime and the
// Python path run the same kernels on the same cache layout.
//
// Nothing here reads the device on the host during a forward: the cache lengths advance on the
// device, MAGE's selection goes into buffers allocated once (so a forward recorded as a CUDA graph
// reads the current block's selection on replay), and the read accounting accumulates on the
// device until kv_fraction() reads it once.
#pragma once

#include <ATen/ATen.h>

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
  // Tensors on `device` (the model's).
  KVCache(int64_t n_layers, int64_t batch, int64_t n_kv_heads, int64_t head_dim,
          int64_t capacity, at::ScalarType dtype, Policy policy,
          at::Device device = at::Device(at::kCPU));

  // Phases, as MageCache: begin_* before a forward, end_forward() after it.
  // Prefill of a prompt chunk of whole blocks of `block` tokens (0: the chunk is one block):
  // row b keeps its first `advance[b]` tokens (int32 [batch] on the device; undefined: all);
  // the rest of a row is scratch, written past its length and never read. `starts`: the cache
  // lengths before the chunk, known on the host, which lets a multi-block chunk run as one
  // mage::block_attention call.
  void begin_prefill(at::Tensor advance = {}, int64_t block = 0,
                     std::vector<int64_t> starts = {}) {
    phase_ = Phase::Prefill;
    advance_ = std::move(advance);
    block_ = block;
    starts_ = std::move(starts);
  }
  void begin_block() { step_ = 0; }
  void begin_step(bool commit) {
    phase_ = commit ? Phase::Commit : Phase::Denoise;
    advance_ = at::Tensor();
  }
  // Advances the lengths (prefill, commit) by `block_len` on the device; no host read.
  void end_forward(int64_t block_len);

  // One layer's attention: q [batch, Hq, n, d], k/v [batch, Hkv, n, d] (RoPE applied,
  // contiguous). Returns [batch, Hq, n, d]; prefill and commit also write k/v to the cache.
  at::Tensor attend(int64_t layer, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    double scale);

  const at::Tensor& cache_lens() const { return lens_; }
  int64_t capacity() const { return capacity_; }
  int64_t step() const { return step_; }
  Phase phase() const { return phase_; }
  // Share of the cache read by denoise/commit forwards (1.0 = dense). Reads the device.
  double kv_fraction() const;

 private:
  // Prefill attention of a chunk over the cache before it (dense, block-causal): one block is
  // a dense_attention call, several blocks one mage::block_attention call.
  at::Tensor prefill_attention(int64_t layer, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, double scale);
  at::Tensor select_and_attend(int64_t layer, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, double scale);
  void count_reads();  // the KV entries this forward read (end_forward)

  std::vector<at::Tensor> keys_, values_;
  at::Tensor lens_;                       // int32 [batch], shared by all layers
  at::Tensor advance_;                    // tokens of the chunk each row keeps (prefill)
  int64_t block_ = 0;                     // the prefill chunk's block size
  std::vector<int64_t> starts_;           // cache lengths before the prefill chunk (host)
  std::vector<at::Tensor> indices_, counts_;  // MAGE's selection per layer (sparse layers only)
  at::Tensor sparse_counts_;              // [sparse layers, batch, Hkv]: counts_ are its rows
  std::vector<bool> selected_;            // a step 0 has filled the layer's selection
  Policy policy_;
  int64_t capacity_, budget_ = 0, max_len_ = 0;
  Phase phase_ = Phase::Prefill;
  int64_t step_ = 0;
  at::Tensor read_, full_;                // float64 scalars on the device
};

}  // namespace mage::runtime
