// Mirrors mage_ext/hf/checkpoint.py: which model types load, how the block size and stop ids
// default, so the C++ and Python runtimes agree on the same directory.
#include "runtime/config.h"

#include <algorithm>
#include <stdexcept>

#include "runtime/base/io.h"
#include "runtime/base/json.h"

namespace mage::runtime {
namespace {

struct Family {
  const char* model_type;
  const char* family;
  bool qk_norm;
  int64_t default_block;
};
constexpr Family kFamilies[] = {{"qwen2", "fast_dllm", false, 32},
                                {"Fast_dLLM_Qwen", "fast_dllm", false, 32},
                                {"qwen3", "sdar", true, 4},
                                {"sdar", "sdar", true, 4}};

int64_t required_int(const Json& doc, const char* key, const std::string& source) {
  const Json* v = find(doc, key);
  if (!v) throw std::runtime_error(source + ": missing required key '" + key + "'");
  int64_t n = as_int(*v, source + ": " + key);
  if (n <= 0) throw std::runtime_error(source + ": " + key + " must be > 0, got " + std::to_string(n));
  return n;
}

// An optional key; null counts as absent (HF writes "head_dim": null for some models).
const Json* optional(const Json& doc, const char* key) {
  const Json* v = find(doc, key);
  return v && !v->is_null() ? v : nullptr;
}

void add_stop_ids(const Json& doc, const std::string& source, std::vector<int64_t>& ids) {
  const Json* eos = optional(doc, "eos_token_id");
  if (!eos) return;
  std::vector<int64_t> found;
  if (eos->is_array()) {
    for (const Json& e : *eos) found.push_back(as_int(e, source + ": eos_token_id"));
  } else {
    found.push_back(as_int(*eos, source + ": eos_token_id"));
  }
  for (int64_t i : found)
    if (std::find(ids.begin(), ids.end(), i) == ids.end()) ids.push_back(i);
}

}  // namespace

ModelConfig parse_config(const Json& doc, const std::string& source) {
  if (!doc.is_object()) throw std::runtime_error(source + ": expected a JSON object");
  ModelConfig c;
  const Json* type = find(doc, "model_type");
  c.model_type = type ? as_string(*type, source + ": model_type") : "";
  const Family* family = nullptr;
  for (const auto& f : kFamilies)
    if (c.model_type == f.model_type) family = &f;
  if (!family)
    throw std::runtime_error(source + ": unknown model_type '" + c.model_type +
                             "'; supported: Fast_dLLM_Qwen, qwen2, qwen3, sdar");
  c.family = family->family;
  c.qk_norm = family->qk_norm;
  c.hidden_size = required_int(doc, "hidden_size", source);
  c.intermediate_size = required_int(doc, "intermediate_size", source);
  c.num_layers = required_int(doc, "num_hidden_layers", source);
  c.num_heads = required_int(doc, "num_attention_heads", source);
  c.vocab_size = required_int(doc, "vocab_size", source);
  c.num_kv_heads = optional(doc, "num_key_value_heads")
                       ? required_int(doc, "num_key_value_heads", source) : c.num_heads;
  if (c.num_heads % c.num_kv_heads)
    throw std::runtime_error(source + ": num_attention_heads (" + std::to_string(c.num_heads) +
                             ") is not a multiple of num_key_value_heads (" +
                             std::to_string(c.num_kv_heads) + ")");
  if (optional(doc, "head_dim")) {
    c.head_dim = required_int(doc, "head_dim", source);
  } else {
    if (c.hidden_size % c.num_heads)
      throw std::runtime_error(source + ": hidden_size is not a multiple of num_attention_heads");
    c.head_dim = c.hidden_size / c.num_heads;
  }
  if (c.head_dim % 2) throw std::runtime_error(source + ": head_dim must be even (rotary)");
  if (const Json* v = optional(doc, "max_position_embeddings"))
    c.max_positions = as_int(*v, source + ": max_position_embeddings");
  if (const Json* v = optional(doc, "rms_norm_eps")) c.rms_norm_eps = as_number(*v, source + ": rms_norm_eps");
  const Json* rope = optional(doc, "rope_parameters");
  if (!rope) rope = optional(doc, "rope_scaling");
  if (rope && rope->is_object()) {
    const Json* rt = optional(*rope, "rope_type");
    if (!rt) rt = optional(*rope, "type");
    if (rt && as_string(*rt, source + ": rope_type") != "default")
      throw std::runtime_error(source + ": rope_type '" + as_string(*rt, source) +
                               "' is not supported (only the default rotary embedding)");
    if (const Json* th = optional(*rope, "rope_theta")) c.rope_theta = as_number(*th, source + ": rope_theta");
  }
  if (const Json* th = optional(doc, "rope_theta")) c.rope_theta = as_number(*th, source + ": rope_theta");
  if (const Json* v = optional(doc, "use_sliding_window"); v && as_bool(*v, source + ": use_sliding_window"))
    throw std::runtime_error(source + ": sliding-window attention is not supported");
  if (const Json* v = optional(doc, "tie_word_embeddings"))
    c.tie_word_embeddings = as_bool(*v, source + ": tie_word_embeddings");
  if (const Json* v = optional(doc, "mask_token_id")) c.mask_id = as_int(*v, source + ": mask_token_id");
  c.block_size = family->default_block;
  for (const char* key : {"bd_size", "block_size", "block_length"}) {
    if (optional(doc, key)) {
      c.block_size = required_int(doc, key, source);
      break;
    }
  }
  add_stop_ids(doc, source, c.stop_ids);
  return c;
}

ModelConfig load_config(const std::string& dir) {
  if (!dir_exists(dir)) throw std::runtime_error(dir + ": model directory does not exist");
  const std::string path = join_path(dir, "config.json");
  if (!file_exists(path)) throw std::runtime_error(path + ": missing config.json");
  ModelConfig c = parse_config(parse_json_file(path), path);
  const std::string gen = join_path(dir, "generation_config.json");
  if (file_exists(gen)) add_stop_ids(parse_json_file(gen), gen, c.stop_ids);
  return c;
}

}  // namespace mage::runtime
