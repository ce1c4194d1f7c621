// BPE follows tokenizers' models/bpe (merge map (left, right) -> (rank, merged id); a word's
// merges applied lowest rank first, leftmost first on ties, through a heap with stale entries
// skipped; unknown characters become unk (fused or not) or are dropped without one).
#include "runtime/base/token_model.h"

#include <cstdio>
#include <limits>
#include <queue>
#include <stdexcept>

#include "runtime/base/unicode.h"

namespace mage::runtime {
namespace {

constexpr int64_t kMaxId = std::numeric_limits<int32_t>::max();

class Bpe : public TokenModel {
 public:
  Bpe(const Json& j, const std::string& where) {
    read_vocab(j, where);
    if (const Json* d = find(j, "dropout"); d && !d->is_null() && as_number(*d, where + ": dropout") > 0)
      throw std::runtime_error(where + ": BPE dropout is not supported (it samples)");
    unk_token_ = string_if(j, "unk_token", where);
    prefix_ = string_if(j, "continuing_subword_prefix", where).value_or("");
    suffix_ = string_if(j, "end_of_word_suffix", where).value_or("");
    fuse_unk_ = bool_or(j, "fuse_unk", false, where);
    byte_fallback_ = bool_or(j, "byte_fallback", false, where);
    ignore_merges_ = bool_or(j, "ignore_merges", false, where);
    int64_t rank = 0;
    for (const Json& m : as_array(member(j, "merges", where), where + ": merges")) {
      const std::string at = where + ": merges[" + std::to_string(rank) + "]";
      std::string a, b;
      if (m.is_string()) {  // "a b": exactly one space
        const std::string& s = m.get_ref<const std::string&>();
        const size_t sp = s.find(' ');
        if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
          throw std::runtime_error(at + ": expected \"left right\", got \"" + s + "\"");
        a = s.substr(0, sp);
        b = s.substr(sp + 1);
      } else {
        if (!m.is_array() || m.size() != 2) throw std::runtime_error(at + ": expected [left, right]");
        a = as_string(m[0], at);
        b = as_string(m[1], at);
      }
      if (b.size() < prefix_.size()) throw std::runtime_error(at + ": '" + b + "' is shorter than the subword prefix");
      const int64_t left = id_of(a, at), right = id_of(b, at);
      const int64_t merged = id_of(a + b.substr(prefix_.size()), at);
      merges_[key(left, right)] = {rank++, merged};  // a repeated pair keeps its last rank
    }
  }

  void encode(std::string_view piece, std::vector<int64_t>& out) const override {
    if (ignore_merges_) {
      if (auto id = token_to_id(piece)) {
        out.push_back(*id);
        return;
      }
    }
    std::vector<Symbol> syms = initial_symbols(piece);
    merge_all(syms);
    for (const Symbol& s : syms)
      if (s.alive) out.push_back(s.id);
  }

 private:
  struct Symbol {
    int64_t id;
    int64_t prev, next;
    bool alive;
  };
  struct Merge {
    int64_t rank, id;
  };
  struct Candidate {
    int64_t rank, pos, id;
    bool operator<(const Candidate& o) const {  // a max-heap on this is min (rank, pos) first
      return rank != o.rank ? rank > o.rank : pos > o.pos;
    }
  };

  static uint64_t key(int64_t a, int64_t b) { return (static_cast<uint64_t>(a) << 32) | static_cast<uint64_t>(b); }

  int64_t id_of(const std::string& token, const std::string& where) const {
    auto id = token_to_id(token);
    if (!id) throw std::runtime_error(where + ": token '" + token + "' is not in the vocab");
    return *id;
  }

  void push(std::vector<Symbol>& syms, int64_t id) const {
    const int64_t n = static_cast<int64_t>(syms.size());
    syms.push_back({id, n - 1, -1, true});
    if (n > 0) syms[n - 1].next = n;
  }

  std::vector<Symbol> initial_symbols(std::string_view w) const {
    std::vector<Symbol> syms;
    std::optional<int64_t> unk;  // a pending unk (fused over consecutive unknown characters)
    for (size_t i = 0; i < w.size();) {
      const size_t start = i;
      unicode::next_code_point(w, i);
      std::string s(w.substr(start, i - start));
      if (start > 0) s = prefix_ + s;
      if (i == w.size()) s += suffix_;
      if (auto id = token_to_id(s)) {
        if (unk) push(syms, *unk);
        unk.reset();
        push(syms, *id);
        continue;
      }
      if (byte_fallback_ && bytes_known(w.substr(start, i - start))) {
        if (unk) push(syms, *unk);
        unk.reset();
        for (unsigned char b : w.substr(start, i - start)) push(syms, *token_to_id(byte_token(b)));
        continue;
      }
      if (!unk_token_) continue;  // no unk token: the character is dropped, as in tokenizers
      const auto unk_id = token_to_id(*unk_token_);
      if (!unk_id) throw std::runtime_error("tokenizer: unk_token '" + *unk_token_ + "' is not in the vocab");
      if (unk && !fuse_unk_) push(syms, *unk);
      unk = unk_id;
    }
    if (unk) push(syms, *unk);
    return syms;
  }

  static std::string byte_token(unsigned char b) {
    char buf[8];
    std::snprintf(buf, sizeof buf, "<0x%02X>", b);
    return buf;
  }
  bool bytes_known(std::string_view bytes) const {
    for (unsigned char b : bytes)
      if (!token_to_id(byte_token(b))) return false;
    return true;
  }

  const Merge* merge_of(int64_t left, int64_t right) const {
    auto it = merges_.find(key(left, right));
    return it == merges_.end() ? nullptr : &it->second;
  }

  void merge_all(std::vector<Symbol>& syms) const {
    std::priority_queue<Candidate> queue;
    for (size_t i = 0; i + 1 < syms.size(); ++i)
      if (const Merge* m = merge_of(syms[i].id, syms[i + 1].id))
        queue.push({m->rank, static_cast<int64_t>(i), m->id});
    while (!queue.empty()) {
      const Candidate top = queue.top();
      queue.pop();
      Symbol& cur = syms[top.pos];
      if (!cur.alive || cur.next < 0) continue;
      const int64_t next_pos = cur.next;
      const Merge* now = merge_of(cur.id, syms[next_pos].id);
      if (!now || now->id != top.id) continue;  // a stale entry: its pair changed since
      cur.id = top.id;
      cur.next = syms[next_pos].next;
      syms[next_pos].alive = false;
      if (cur.next >= 0) syms[cur.next].prev = top.pos;
      if (cur.prev >= 0)
        if (const Merge* m = merge_of(syms[cur.prev].id, cur.id)) queue.push({m->rank, cur.prev, m->id});
      if (cur.next >= 0)
        if (const Merge* m = merge_of(cur.id, syms[cur.next].id)) queue.push({m->rank, top.pos, m->id});
    }
  }

  std::unordered_map<uint64_t, Merge> merges_;
  std::optional<std::string> unk_token_;
  std::string prefix_, suffix_;
  bool fuse_unk_ = false, byte_fallback_ = false, ignore_merges_ = false;
};

class WordLevel : public TokenModel {
 public:
  WordLevel(const Json& j, const std::string& where) {
    read_vocab(j, where);
    unk_token_ = string_if(j, "unk_token", where).value_or("<unk>");
  }
  void encode(std::string_view piece, std::vector<int64_t>& out) const override {
    if (auto id = token_to_id(piece)) {
      out.push_back(*id);
    } else if (auto unk = token_to_id(unk_token_)) {
      out.push_back(*unk);
    } else {
      throw std::runtime_error("tokenizer: '" + std::string(piece) +
                               "' is not in the vocab and unk_token '" + unk_token_ + "' is missing");
    }
  }

 private:
  std::string unk_token_;
};

}  // namespace

std::optional<int64_t> TokenModel::token_to_id(std::string_view token) const {
  auto it = vocab_.find(std::string(token));
  if (it == vocab_.end()) return std::nullopt;
  return it->second;
}

const std::string* TokenModel::id_to_token(int64_t id) const {
  auto it = tokens_.find(id);
  return it == tokens_.end() ? nullptr : &it->second;
}

void TokenModel::read_vocab(const Json& j, const std::string& where) {
  for (const auto& [token, id] : as_object(member(j, "vocab", where), where + ": vocab").items()) {
    const int64_t i = as_int(id, where + ": vocab['" + token + "']");
    if (i < 0 || i > kMaxId)
      throw std::runtime_error(where + ": vocab['" + token + "'] = " + std::to_string(i) +
                               " is outside [0, 2^31)");
    vocab_[token] = i;
    tokens_[i] = token;
  }
}

std::unique_ptr<TokenModel> TokenModel::from_json(const Json& j, const std::string& where) {
  const std::string& t = as_string(member(as_object(j, where), "type", where), where + ": type");
  if (t == "BPE") return std::make_unique<Bpe>(j, where + " (BPE)");
  if (t == "WordLevel") return std::make_unique<WordLevel>(j, where + " (WordLevel)");
  throw std::runtime_error(where + ": unsupported model type '" + t + "' (supported: BPE, WordLevel)");
}

}  // namespace mage::runtime
