// A tokenizer read from a checkpoint's tokenizer.json, token-for-token equal to the Python
// `tokenizers` library (Tokenizer.from_file(...).encode(text).ids / .decode(ids,
// skip_special_tokens=True)) for what Qwen2 / Qwen3 and the shipped tiny model use:
//   normalizer:     null, NFC, NFD, NFKC, NFKD, Sequence of these (ICU)
//   added tokens:   special or not, single_word / lstrip / rstrip / normalized
//   pre-tokenizer:  Split (regex, PCRE2), ByteLevel, Whitespace, WhitespaceSplit, Sequence
//   model:          BPE (merges with ranks, unk / fuse_unk / byte_fallback / ignore_merges),
//                   WordLevel
//   post-processor: null, ByteLevel, TemplateProcessing (single), Sequence of these
//   decoder:        null, ByteLevel, WordPiece
// Anything else is refused when the file is loaded, with a message naming it.
// Known limit: PCRE2 10.42's Unicode tables are version 14; letters and digits added since
// (a few thousand rare CJK extension characters) classify as neither \p{L} nor \p{N} here.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "runtime/base/added_vocabulary.h"
#include "runtime/base/json.h"
#include "runtime/base/pretokenizer.h"
#include "runtime/base/token_model.h"
#include "runtime/base/unicode.h"

namespace mage::runtime {

class Tokenizer {
 public:
  static Tokenizer from_file(const std::string& path);
  // `source` names the document in errors.
  static Tokenizer from_json(const Json& doc, const std::string& source);

  // `text` must be well-formed UTF-8 (std::runtime_error naming the first bad byte otherwise).
  std::vector<int64_t> encode(const std::string& text) const;
  // Text of `ids` (ill-formed UTF-8 repaired to U+FFFD, unknown ids skipped), special added
  // tokens left out when skip_special.
  std::string decode(const std::vector<int64_t>& ids, bool skip_special = true) const;
  // The decoder's bytes before the UTF-8 repair: for ids a, b, decode_bytes(a + b) starts with
  // decode_bytes(a), which is what streaming relies on.
  std::string decode_bytes(const std::vector<int64_t>& ids, bool skip_special = true) const;

  // Added tokens first, then the model's vocabulary.
  std::optional<int64_t> token_to_id(const std::string& token) const;

 private:
  enum class Decoder { None, ByteLevel, WordPiece };
  struct TemplateItem {
    bool sequence;               // the input's ids (true) or fixed special-token ids
    std::vector<int64_t> ids;
  };

  std::string normalize(const std::string& text) const;
  void read_post_processor(const Json& j, const std::string& where);

  std::vector<unicode::NormalForm> normal_forms_;
  AddedVocabulary added_;
  std::unique_ptr<PreTokenizer> pre_tokenizer_;
  std::unique_ptr<TokenModel> model_;
  std::vector<TemplateItem> template_;  // empty: no post-processing of ids
  Decoder decoder_ = Decoder::None;
  std::string wordpiece_prefix_ = "##";
  bool wordpiece_cleanup_ = true;
};

// Streams the text of ids as they arrive: each push returns the text that is final now (a
// multi-byte character cut between pushes waits for its last byte); the concatenation of every
// push and finish() equals decode(all ids).
class TextStream {
 public:
  explicit TextStream(const Tokenizer& tokenizer, bool skip_special = true)
      : tokenizer_(tokenizer), skip_special_(skip_special) {}
  std::string push(const std::vector<int64_t>& ids);
  std::string finish();

 private:
  const Tokenizer& tokenizer_;
  bool skip_special_;
  std::vector<int64_t> ids_;
  size_t emitted_ = 0;  // bytes of decode_bytes(ids_) already returned
};

}  // namespace mage::runtime
