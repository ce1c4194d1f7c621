// Mirrors tokenizers' added_vocabulary.rs find_matches: leftmost-longest matches, each checked
// for single_word (no word character on either side), then widened by lstrip (whitespace
// before it, not reaching into the previous match) and rstrip (whitespace after it).
#include "runtime/base/added_vocabulary.h"

#include <algorithm>
#include <stdexcept>

#include "runtime/base/unicode.h"

namespace mage::runtime {
namespace {

bool ends_with_word(const std::string& s, size_t end) {
  if (end == 0) return false;
  return unicode::is_word(unicode::previous_code_point(s, end));
}

bool starts_with_word(const std::string& s, size_t begin) {
  if (begin >= s.size()) return false;
  return unicode::is_word(unicode::next_code_point(s, begin));
}

size_t whitespace_start_before(const std::string& s, size_t end) {  // \s*$ of s[..end]
  while (end > 0) {
    size_t p = end;
    if (!unicode::is_white_space(unicode::previous_code_point(s, p))) break;
    end = p;
  }
  return end;
}

size_t whitespace_end_after(const std::string& s, size_t begin) {  // ^\s* of s[begin..]
  while (begin < s.size()) {
    size_t p = begin;
    if (!unicode::is_white_space(unicode::next_code_point(s, p))) break;
    begin = p;
  }
  return begin;
}

}  // namespace

void AddedVocabulary::Trie::insert(const std::string& pattern, int32_t token) {
  int32_t node = 0;
  for (unsigned char c : pattern) {
    auto it = nodes[node].next.find(c);
    if (it == nodes[node].next.end()) {
      nodes.push_back(Node{});
      it = nodes[node].next.emplace(c, static_cast<int32_t>(nodes.size() - 1)).first;
    }
    node = it->second;
  }
  nodes[node].token = token;
}

int32_t AddedVocabulary::Trie::longest_at(const std::string& s, size_t i, size_t* end) const {
  int32_t node = 0, found = -1;
  for (size_t j = i; j < s.size(); ++j) {
    auto it = nodes[node].next.find(static_cast<unsigned char>(s[j]));
    if (it == nodes[node].next.end()) break;
    node = it->second;
    if (nodes[node].token >= 0) {
      found = nodes[node].token;
      *end = j + 1;
    }
  }
  return found;
}

void AddedVocabulary::load(const Json& added_tokens,
                           const std::function<std::string(const std::string&)>& normalize,
                           const std::string& where) {
  if (added_tokens.is_null()) return;
  for (const Json& t : as_array(added_tokens, where)) {
    AddedToken a;
    const std::string at = where + "[" + std::to_string(tokens_.size()) + "]";
    a.id = as_int(member(as_object(t, at), "id", at), at + ": id");
    if (a.id < 0 || a.id > INT32_MAX) throw std::runtime_error(at + ": id outside [0, 2^31)");
    a.content = as_string(member(t, "content", at), at + ": content");
    if (a.content.empty()) throw std::runtime_error(at + ": empty content");
    a.single_word = bool_or(t, "single_word", false, at);
    a.lstrip = bool_or(t, "lstrip", false, at);
    a.rstrip = bool_or(t, "rstrip", false, at);
    a.special = bool_or(t, "special", false, at);
    a.normalized = bool_or(t, "normalized", !a.special, at);
    const int32_t index = static_cast<int32_t>(tokens_.size());
    if (a.normalized) {
      const std::string n = normalize(a.content);
      if (!n.empty()) normalized_.insert(n, index);
    } else {
      raw_.insert(a.content, index);
    }
    ids_[a.content] = a.id;
    by_id_[a.id] = tokens_.size();
    tokens_.push_back(std::move(a));
  }
}

void AddedVocabulary::split(const std::string& text, bool normalized_pass,
                            std::vector<Piece>& out) const {
  const Trie& trie = normalized_pass ? normalized_ : raw_;
  size_t done = 0;  // text before this offset is emitted
  for (size_t i = 0; i < text.size();) {
    size_t stop = 0;
    const int32_t index = trie.longest_at(text, i, &stop);
    if (index < 0) {
      ++i;
      continue;
    }
    const AddedToken& t = tokens_[index];
    size_t start = i;
    i = stop;  // the next search starts after the match as found (before rstrip)
    if (t.single_word && (ends_with_word(text, start) || starts_with_word(text, stop))) continue;
    if (t.lstrip) start = std::max(whitespace_start_before(text, start), done);
    if (t.rstrip) stop = whitespace_end_after(text, stop);
    if (done < start) out.push_back({text.substr(done, start - done), -1});
    out.push_back({text.substr(start, stop - start), t.id});
    done = stop;
  }
  if (done < text.size()) out.push_back({text.substr(done), -1});
}

std::optional<int64_t> AddedVocabulary::token_to_id(const std::string& content) const {
  auto it = ids_.find(content);
  if (it == ids_.end()) return std::nullopt;
  return it->second;
}

const AddedToken* AddedVocabulary::by_id(int64_t id) const {
  auto it = by_id_.find(id);
  return it == by_id_.end() ? nullptr : &tokens_[it->second];
}

}  // namespace mage::runtime
