// The tokenizer.json models: BPE (with merge ranks, as Qwen2/Qwen3 ship it) and WordLevel (the
// shipped tiny model's), with the semantics of the Python `tokenizers` library.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "runtime/base/json.h"

namespace mage::runtime {

class TokenModel {
 public:
  virtual ~TokenModel() = default;
  // Appends the ids of one pre-tokenized piece.
  virtual void encode(std::string_view piece, std::vector<int64_t>& out) const = 0;

  std::optional<int64_t> token_to_id(std::string_view token) const;
  const std::string* id_to_token(int64_t id) const;  // nullptr for an unknown id

  // From tokenizer.json's "model"; std::runtime_error naming `where` on a bad or unsupported one.
  static std::unique_ptr<TokenModel> from_json(const Json& j, const std::string& where);

 protected:
  void read_vocab(const Json& j, const std::string& where);
  std::unordered_map<std::string, int64_t> vocab_;
  std::unordered_map<int64_t, std::string> tokens_;  // id -> token
};

}  // namespace mage::runtime
