// The pre-tokenizers of tokenizer.json that Qwen2/Qwen3 and the shipped model use: Split (a
// regex with a split behavior), ByteLevel, Whitespace, WhitespaceSplit and Sequence of these,
// with the semantics of the Python `tokenizers` library.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "runtime/base/json.h"

namespace mage::runtime {

class PreTokenizer {
 public:
  virtual ~PreTokenizer() = default;
  // Splits each piece further (pieces are well-formed UTF-8); empty pieces are dropped.
  virtual void split(std::vector<std::string>& pieces) const = 0;

  // From tokenizer.json's "pre_tokenizer" (nullptr for null); std::runtime_error naming
  // `where` for an unsupported type or a bad field.
  static std::unique_ptr<PreTokenizer> from_json(const Json& j, const std::string& where);
};

// ByteLevel's last step on its own: each byte of `text` as its byte-level character.
std::string byte_level_chars(const std::string& text);

}  // namespace mage::runtime
