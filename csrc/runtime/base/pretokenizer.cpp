// Split behaviors follow tokenizers' NormalizedString::split (Isolated, Removed,
// MergedWithPrevious, MergedWithNext, Contiguous; invert flips matches first); regexes run on
// PCRE2 with Oniguruma's iteration (regex.h). Whitespace's regex is the Rust regex crate's
// \w+|[^\w\s]+, spelled with the Unicode properties that crate's \w and \s stand for.
#include "runtime/base/pretokenizer.h"

#include <algorithm>
#include <stdexcept>

#include "runtime/base/regex.h"
#include "runtime/base/unicode.h"

namespace mage::runtime {
namespace {

enum class Behavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous };

Behavior parse_behavior(const std::string& name, const std::string& where) {
  if (name == "Removed") return Behavior::Removed;
  if (name == "Isolated") return Behavior::Isolated;
  if (name == "MergedWithPrevious") return Behavior::MergedWithPrevious;
  if (name == "MergedWithNext") return Behavior::MergedWithNext;
  if (name == "Contiguous") return Behavior::Contiguous;
  throw std::runtime_error(where + ": unknown split behavior '" + name + "'");
}

struct Span {
  size_t begin, end;
  bool flag;  // a match (input) / to remove (output)
};

// Pieces of `s` from its matches, then per the behavior which to keep and which to merge.
void split_piece(const std::string& s, const Regex& re, Behavior behavior, bool invert,
                 std::vector<std::string>& out) {
  std::vector<Span> parts;  // matches and the gaps between them, in order
  size_t prev = 0;
  for (const auto& [b, e] : re.find_all(s)) {
    if (prev != b) parts.push_back({prev, b, invert});
    parts.push_back({b, e, !invert});
    prev = e;
  }
  if (prev != s.size()) parts.push_back({prev, s.size(), invert});

  std::vector<Span> kept;
  bool previous_match = false;
  switch (behavior) {
    case Behavior::Removed:
      kept = parts;  // flag: remove the matches
      break;
    case Behavior::Isolated:
      for (const Span& p : parts) kept.push_back({p.begin, p.end, false});
      break;
    case Behavior::MergedWithPrevious:
      for (const Span& p : parts) {
        if (p.flag && !previous_match && !kept.empty()) kept.back().end = p.end;
        else kept.push_back({p.begin, p.end, false});
        previous_match = p.flag;
      }
      break;
    case Behavior::MergedWithNext:
      for (size_t i = parts.size(); i-- > 0;) {
        const Span& p = parts[i];
        if (p.flag && !previous_match && !kept.empty()) kept.back().begin = p.begin;
        else kept.push_back({p.begin, p.end, false});
        previous_match = p.flag;
      }
      std::reverse(kept.begin(), kept.end());
      break;
    case Behavior::Contiguous:
      for (const Span& p : parts) {
        if (p.flag == previous_match && !kept.empty()) kept.back().end = p.end;
        else kept.push_back({p.begin, p.end, false});
        previous_match = p.flag;
      }
      break;
  }
  for (const Span& k : kept)
    if (!k.flag && k.end > k.begin) out.push_back(s.substr(k.begin, k.end - k.begin));
}

class RegexSplit : public PreTokenizer {
 public:
  RegexSplit(Regex re, Behavior behavior, bool invert)
      : re_(std::move(re)), behavior_(behavior), invert_(invert) {}
  void split(std::vector<std::string>& pieces) const override {
    std::vector<std::string> out;
    for (const std::string& p : pieces) split_piece(p, re_, behavior_, invert_, out);
    pieces.swap(out);
  }

 private:
  Regex re_;
  Behavior behavior_;
  bool invert_;
};

constexpr const char* kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
constexpr const char* kRustWordPattern =
    R"([\p{Alphabetic}\p{M}\p{Nd}\p{Pc}\p{Join_Control}]+|[^\p{Alphabetic}\p{M}\p{Nd}\p{Pc}\p{Join_Control}\s]+)";

class ByteLevel : public PreTokenizer {
 public:
  ByteLevel(bool add_prefix_space, bool use_regex, const std::string& where)
      : add_prefix_space_(add_prefix_space) {
    if (use_regex) re_ = std::make_unique<Regex>(kGpt2Pattern, where);
  }
  void split(std::vector<std::string>& pieces) const override {
    std::vector<std::string> out;
    for (std::string p : pieces) {
      if (add_prefix_space_ && (p.empty() || p[0] != ' ')) p.insert(p.begin(), ' ');
      if (re_) split_piece(p, *re_, Behavior::Isolated, false, out);
      else if (!p.empty()) out.push_back(std::move(p));
    }
    for (std::string& p : out) p = byte_level_chars(p);
    pieces.swap(out);
  }

 private:
  bool add_prefix_space_;
  std::unique_ptr<Regex> re_;
};

class Sequence : public PreTokenizer {
 public:
  explicit Sequence(std::vector<std::unique_ptr<PreTokenizer>> steps) : steps_(std::move(steps)) {}
  void split(std::vector<std::string>& pieces) const override {
    for (const auto& s : steps_) s->split(pieces);
  }

 private:
  std::vector<std::unique_ptr<PreTokenizer>> steps_;
};

}  // namespace

std::string byte_level_chars(const std::string& text) {
  std::string out;
  out.reserve(text.size() * 2);
  for (unsigned char b : text) unicode::append_utf8(out, unicode::byte_to_char(b));
  return out;
}

std::unique_ptr<PreTokenizer> PreTokenizer::from_json(const Json& j, const std::string& where) {
  if (j.is_null()) return nullptr;
  const std::string& t = as_string(member(as_object(j, where), "type", where), where + ": type");
  if (t == "Sequence") {
    std::vector<std::unique_ptr<PreTokenizer>> steps;
    for (const Json& s : as_array(member(j, "pretokenizers", where), where + ": pretokenizers"))
      if (auto p = from_json(s, where + ".pretokenizers")) steps.push_back(std::move(p));
    return std::make_unique<Sequence>(std::move(steps));
  }
  if (t == "Split") {
    const Json& pattern = member(j, "pattern", where);
    std::string regex;
    if (const Json* r = find(pattern, "Regex")) regex = as_string(*r, where + ": pattern.Regex");
    else if (const Json* s = find(pattern, "String")) regex = Regex::escape(as_string(*s, where + ": pattern.String"));
    else throw std::runtime_error(where + ": Split pattern must be {\"Regex\": ...} or {\"String\": ...}");
    return std::make_unique<RegexSplit>(Regex(regex, where + ": Split"),
                                        parse_behavior(as_string(member(j, "behavior", where), where + ": behavior"), where),
                                        bool_or(j, "invert", false, where));
  }
  if (t == "ByteLevel")
    return std::make_unique<ByteLevel>(bool_or(j, "add_prefix_space", true, where),
                                       bool_or(j, "use_regex", true, where), where + ": ByteLevel");
  if (t == "Whitespace")  // keeps the matches of \w+|[^\w\s]+, drops the rest
    return std::make_unique<RegexSplit>(Regex(kRustWordPattern, where + ": Whitespace"),
                                        Behavior::Removed, /*invert=*/true);
  if (t == "WhitespaceSplit")
    return std::make_unique<RegexSplit>(Regex(R"(\s+)", where + ": WhitespaceSplit"),
                                        Behavior::Removed, /*invert=*/false);
  throw std::runtime_error(where + ": unsupported pre-tokenizer type '" + t +
                           "' (supported: Split, ByteLevel, Whitespace, WhitespaceSplit, Sequence)");
}

}  // namespace mage::runtime
