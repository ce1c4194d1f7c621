// The model configuration the runtime needs, read from a checkpoint's config.json (and
// generation_config.json for extra stop ids), validated once so the forward can trust it.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "runtime/base/json.h"

namespace mage::runtime {

struct ModelConfig {
  std::string model_type;        // qwen2, Fast_dLLM_Qwen, qwen3, sdar
  std::string family;            // fast_dllm or sdar: the default generation style
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;          // head_dim, else hidden_size / num_heads
  int64_t vocab_size = 0;
  int64_t max_positions = 0;     // max_position_embeddings (0: unknown, unchecked)
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;   // rope_parameters.rope_theta, else rope_theta
  bool tie_word_embeddings = false;
  bool qk_norm = false;          // Qwen3: RMSNorm of each head's q and k
  int64_t mask_id = -1;          // mask_token_id (-1: absent)
  int64_t block_size = 32;       // bd_size / block_size / block_length, else the family default
  std::vector<int64_t> stop_ids; // eos_token_id of config.json then generation_config.json
};

// Parses a config.json document; `source` names it in errors (std::runtime_error).
ModelConfig parse_config(const Json& doc, const std::string& source);
// Reads <dir>/config.json and, when present, <dir>/generation_config.json.
ModelConfig load_config(const std::string& dir);

}  // namespace mage::runtime
