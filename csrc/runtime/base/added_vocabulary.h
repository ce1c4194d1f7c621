// tokenizer.json's "added_tokens" (special tokens such as <|im_start|>, and added ones): found in
// the text before pre-tokenization, leftmost-longest, with their single_word / lstrip / rstrip
// options, as the Python `tokenizers` library's AddedVocabulary does.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "runtime/base/json.h"

namespace mage::runtime {

struct AddedToken {
  int64_t id = 0;
  std::string content;
  bool single_word = false, lstrip = false, rstrip = false, normalized = true, special = false;
};

// A stretch of the input: text still to tokenize (id < 0), or one added token.
struct Piece {
  std::string text;
  int64_t id = -1;
};

class AddedVocabulary {
 public:
  // `normalize` maps a token's content to its normalized form (tokens with normalized=true are
  // matched in the normalized text).
  void load(const Json& added_tokens, const std::function<std::string(const std::string&)>& normalize,
            const std::string& where);

  // Splits `text` on the tokens matched before normalization (normalized_pass false) or after
  // (true), appending to `out`.
  void split(const std::string& text, bool normalized_pass, std::vector<Piece>& out) const;

  std::optional<int64_t> token_to_id(const std::string& content) const;
  const AddedToken* by_id(int64_t id) const;
  bool empty() const { return tokens_.empty(); }

 private:
  struct Trie {
    struct Node {
      std::map<unsigned char, int32_t> next;
      int32_t token = -1;  // index into tokens_ of a pattern ending here
    };
    std::vector<Node> nodes{Node{}};
    void insert(const std::string& pattern, int32_t token);
    // The longest pattern starting at s[i], or -1.
    int32_t longest_at(const std::string& s, size_t i, size_t* end) const;
  };

  std::vector<AddedToken> tokens_;
  std::unordered_map<std::string, int64_t> ids_;
  std::unordered_map<int64_t, size_t> by_id_;
  Trie raw_, normalized_;
};

}  // namespace mage::runtime
