// The Qwen2 / Qwen3 decoder in LibTorch ops with HF weight names, numerically the same
// operations (and operation order) as transformers' Qwen2/Qwen3 modeling code, so greedy
// decoding matches the Python path token for token. Attention goes through KVCache.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "runtime/attention.h"
#include "runtime/config.h"

namespace mage::runtime {

class QwenModel {
 public:
  // Loads config.json and the safetensors weights of `dir`, converted to `dtype`.
  static QwenModel load(const std::string& dir, at::ScalarType dtype);

  // ids/positions int64 [batch, B]. Returns float32 logits [batch, B, V], or [batch, 1, V]
  // with last_only (the last position only, as transformers' logits_to_keep=1).
  at::Tensor forward(const at::Tensor& ids, const at::Tensor& positions, KVCache& cache,
                     bool last_only) const;

  const ModelConfig& config() const { return config_; }
  at::ScalarType dtype() const { return dtype_; }

 private:
  struct Layer {
    at::Tensor input_norm, post_norm;
    at::Tensor q_w, q_b, k_w, k_b, v_w, v_b, o_w;  // biases undefined when absent
    at::Tensor q_norm, k_norm;                     // Qwen3 only
    at::Tensor gate_w, up_w, down_w;
  };

  at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight) const;
  at::Tensor attention(const Layer& w, int64_t layer, const at::Tensor& x, const at::Tensor& cos,
                       const at::Tensor& sin, KVCache& cache) const;

  ModelConfig config_;
  at::ScalarType dtype_ = at::kFloat;
  at::Tensor embed_, final_norm_, lm_head_, inv_freq_;
  std::vector<Layer> layers_;
};

}  // namespace mage::runtime
