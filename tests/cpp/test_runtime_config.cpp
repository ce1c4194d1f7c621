// config.json parsing: defaults, the two rope_theta spellings, stop ids, and errors.
#include <gtest/gtest.h>

#include "runtime/config.h"
#include "runtime/base/json.h"
#include "runtime/model.h"
#include "runtime/safetensors.h"
#include "runtime_test_util.h"

using namespace mage::runtime;  // NOLINT: the names under test
using mage_test::expect_error;
using mage_test::TempDir;

namespace {

const char* kBase = R"("hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
  "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100)";

ModelConfig parse(const std::string& extra) {
  return parse_config(parse_json("{" + std::string(kBase) + extra + "}", "config.json"),
                      "config.json");
}

}  // namespace

TEST(RuntimeConfig, DefaultsAndDerivedValues) {
  ModelConfig c = parse(R"(, "model_type": "qwen2", "mask_token_id": 7, "eos_token_id": [3, 4],
                          "rope_parameters": {"rope_theta": 1e5, "rope_type": "default"})");
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_EQ(c.block_size, 32);
  EXPECT_EQ(c.mask_id, 7);
  EXPECT_DOUBLE_EQ(c.rope_theta, 1e5);
  EXPECT_FALSE(c.qk_norm);
  EXPECT_EQ(c.family, "fast_dllm");
  EXPECT_EQ(c.stop_ids, (std::vector<int64_t>{3, 4}));
  ModelConfig q3 = parse(R"(, "model_type": "qwen3", "rope_theta": 5000, "head_dim": 32, "bd_size": 8)");
  EXPECT_TRUE(q3.qk_norm);
  EXPECT_EQ(q3.family, "sdar");
  EXPECT_EQ(q3.head_dim, 32);
  EXPECT_EQ(q3.block_size, 8);
  EXPECT_DOUBLE_EQ(q3.rope_theta, 5000.0);
  EXPECT_EQ(parse(R"(, "model_type": "Fast_dLLM_Qwen", "head_dim": null)").head_dim, 16);
}

TEST(RuntimeConfig, Errors) {
  expect_error([] { parse(R"(, "model_type": "llama")"); }, {"config.json", "unknown model_type 'llama'"});
  expect_error([] { parse(""); }, {"unknown model_type ''"});
  expect_error([] {
    parse_config(parse_json(R"({"model_type": "qwen2", "hidden_size": 64})", "c"), "c");
  }, {"missing required key 'intermediate_size'"});
  expect_error([] { parse(R"(, "model_type": "qwen2", "num_key_value_heads": 3)"); }, {"multiple"});
  expect_error([] { parse(R"(, "model_type": "qwen2", "rope_parameters": {"rope_type": "yarn"})"); },
               {"yarn", "not supported"});
  expect_error([] { parse(R"(, "model_type": "qwen2", "use_sliding_window": true)"); }, {"sliding"});
  expect_error([] { parse(R"(, "model_type": "qwen2", "mask_token_id": "x")"); }, {"mask_token_id"});
}

TEST(RuntimeConfig, DirectoryErrorsNameThePath) {
  TempDir dir;
  expect_error([&] { load_config(dir.file("absent")); }, {"absent", "does not exist"});
  expect_error([&] { load_config(dir.path); }, {"config.json"});
  dir.write("config.json", "{\"model_type\": \"qwen2\",");
  expect_error([&] { load_config(dir.path); }, {dir.file("config.json"), "byte"});
}

TEST(RuntimeConfig, ModelLoadReportsMissingAndMisshapenWeights) {
  TempDir dir;
  dir.write("config.json", "{" + std::string(kBase) + R"(, "model_type": "qwen2", "tie_word_embeddings": true})");
  save_safetensors(dir.file("model.safetensors"),
                                  {{"model.embed_tokens.weight", at::zeros({100, 32})}});
  expect_error([&] { QwenModel::load(dir.path, at::kFloat); },
               {"model.embed_tokens.weight", "shape"});
  save_safetensors(dir.file("model.safetensors"),
                                  {{"model.embed_tokens.weight", at::zeros({100, 64})}});
  expect_error([&] { QwenModel::load(dir.path, at::kFloat); },
               {"model.layers.0.input_layernorm.weight", "missing"});
}
