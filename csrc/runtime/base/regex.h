// PCRE2 (UTF, Unicode properties, JIT where available) with the match iteration of the
// Oniguruma engine behind the Python tokenizer's regex pre-tokenizers.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace mage::runtime {

class Regex {
 public:
  // `pattern` as tokenizer.json writes it (Oniguruma syntax, which PCRE2 shares for what these
  // files use: \p{L}, \p{N}, (?i:...), lookahead). \s and \S are rewritten to the White_Space
  // property, Oniguruma's meaning (PCRE2's \s also matches U+180E). `what` names it in errors.
  Regex(const std::string& pattern, const std::string& what);
  ~Regex();
  Regex(Regex&&) noexcept;
  Regex& operator=(Regex&&) noexcept;

  // Non-overlapping matches [begin, end) of well-formed UTF-8 `s`, left to right, as
  // Oniguruma's find_iter: an empty match right where the previous match ended is skipped.
  // A pattern that backtracks past the match limit is an error, not a hang.
  std::vector<std::pair<size_t, size_t>> find_all(std::string_view s) const;

  // A literal string as a pattern (tokenizer.json's {"String": ...} split patterns).
  static std::string escape(const std::string& literal);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace mage::runtime
