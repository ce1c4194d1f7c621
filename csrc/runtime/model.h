// The Qwen2 / Qwen3 decoder in LibTorch ops with HF weight names, numerically the same
// operations (and operation order) as transformers' Qwen2/Qwen3 modeling code, so greedy
// decoding matches the Python path token for token. Attention goes through KVCache.
//
// The forward is one function per sub-step (embedding, rotary tables, norm + residual, q/k/v with
// rotary, attention, output projection, MLP, head) so each can be swapped for a fused op (the
// project's rms_norm-with-residual, qkv_rope and silu_mul) without touching the others.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <utility>
#include <vector>

#include "runtime/attention.h"
#include "runtime/config.h"

namespace mage::runtime {

class QwenModel {
 public:
  // Loads config.json and the safetensors weights of `dir`, each tensor copied straight from the
  // memory-mapped shard to `device` in `dtype` (one shard mapped at a time; RoPE's inverse
  // frequencies stay float32).
  static QwenModel load(const std::string& dir, at::ScalarType dtype,
                        at::Device device = at::Device(at::kCPU));

  // ids/positions int64 [batch, B] on the model's device. Returns float32 logits [batch, B, V],
  // or [batch, 1, V] with last_only (the last position only, as transformers' logits_to_keep=1)
  // or with `keep` (int64 [batch] on the device: row b's position keep[b]).
  at::Tensor forward(const at::Tensor& ids, const at::Tensor& positions, KVCache& cache,
                     bool last_only, const at::Tensor& keep = {}) const;

  const ModelConfig& config() const { return config_; }
  at::ScalarType dtype() const { return dtype_; }
  at::Device device() const { return device_; }

 private:
  struct Layer {
    at::Tensor input_norm, post_norm;
    at::Tensor qkv_w, qkv_b, o_w;   // [q; k; v] rows (as mage_ext/hf/fast_forward.py); no bias:
                                    // undefined
    at::Tensor q_norm, k_norm;      // Qwen3 only
    at::Tensor gate_up_w, down_w;   // [gate; up] rows
  };
  // Halves of the fused weights until load() concatenates them.
  struct Parts {
    at::Tensor q_w, k_w, v_w, q_b, k_b, v_b, gate_w, up_w;
  };

  at::Tensor head(const at::Tensor& x, const at::Tensor& residual, bool last_only,
                  const at::Tensor& keep) const;

  ModelConfig config_;
  at::ScalarType dtype_ = at::kFloat;
  at::Device device_ = at::Device(at::kCPU);
  at::Tensor embed_, final_norm_, lm_head_, inv_freq_;
  std::vector<Layer> layers_;
};

}  // namespace mage::runtime
