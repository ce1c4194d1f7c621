// The encode pipeline of tokenizers' Tokenizer::encode: added tokens matched in the raw text,
// each remaining stretch normalized, normalized added tokens matched, then pre-tokenized and
// run through the model; then the post-processor's template. Decode maps ids to tokens (added
// tokens first), drops special ones when asked, and runs the decoder over the list.
#include "runtime/base/tokenizer.h"

#include <stdexcept>

#include "runtime/base/io.h"

namespace mage::runtime {
namespace {

unicode::NormalForm parse_form(const std::string& type, const std::string& where) {
  if (type == "NFC") return unicode::NormalForm::NFC;
  if (type == "NFD") return unicode::NormalForm::NFD;
  if (type == "NFKC") return unicode::NormalForm::NFKC;
  if (type == "NFKD") return unicode::NormalForm::NFKD;
  throw std::runtime_error(where + ": unsupported normalizer type '" + type +
                           "' (supported: NFC, NFD, NFKC, NFKD, Sequence of these)");
}

void read_normalizer(const Json& j, const std::string& where, std::vector<unicode::NormalForm>& out) {
  if (j.is_null()) return;
  const std::string& t = as_string(member(as_object(j, where), "type", where), where + ": type");
  if (t == "Sequence") {
    for (const Json& n : as_array(member(j, "normalizers", where), where + ": normalizers"))
      read_normalizer(n, where, out);
    return;
  }
  out.push_back(parse_form(t, where));
}

// tokenizers' WordPiece decoder cleanup (cleanup: true).
std::string cleanup(std::string s) {
  static const std::pair<const char*, const char*> kRules[] = {
      {" .", "."}, {" ?", "?"}, {" !", "!"}, {" ,", ","}, {" ' ", "'"}, {" n't", "n't"},
      {" 'm", "'m"}, {" do not", " don't"}, {" 's", "'s"}, {" 've", "'ve"}, {" 're", "'re"}};
  for (const auto& [from, to] : kRules) {
    const std::string f = from, t = to;
    std::string out;
    size_t at = 0;
    for (size_t hit; (hit = s.find(f, at)) != std::string::npos; at = hit + f.size())
      out.append(s, at, hit - at).append(t);
    s = out.append(s, at, std::string::npos);
  }
  return s;
}

}  // namespace

Tokenizer Tokenizer::from_file(const std::string& path) {
  return from_json(parse_json_file(path), path);
}

Tokenizer Tokenizer::from_json(const Json& doc, const std::string& source) {
  Tokenizer t;
  as_object(doc, source);
  for (const char* key : {"truncation", "padding"})
    if (const Json* v = find(doc, key); v && !v->is_null())
      throw std::runtime_error(source + ": '" + key + "' is set; not supported (encode would " +
                               (std::string(key) == "truncation" ? "cut" : "pad") + " the prompt)");
  if (const Json* n = find(doc, "normalizer")) read_normalizer(*n, source + ": normalizer", t.normal_forms_);
  t.model_ = TokenModel::from_json(member(doc, "model", source), source + ": model");
  if (const Json* a = find(doc, "added_tokens"))
    t.added_.load(*a, [&t](const std::string& s) { return t.normalize(s); }, source + ": added_tokens");
  if (const Json* p = find(doc, "pre_tokenizer"))
    t.pre_tokenizer_ = PreTokenizer::from_json(*p, source + ": pre_tokenizer");
  if (const Json* p = find(doc, "post_processor")) t.read_post_processor(*p, source + ": post_processor");
  if (const Json* d = find(doc, "decoder"); d && !d->is_null()) {
    const std::string where = source + ": decoder";
    const std::string& type = as_string(member(*d, "type", where), where + ": type");
    if (type == "ByteLevel") {
      t.decoder_ = Decoder::ByteLevel;
    } else if (type == "WordPiece") {
      t.decoder_ = Decoder::WordPiece;
      if (const Json* p = find(*d, "prefix")) t.wordpiece_prefix_ = as_string(*p, where + ": prefix");
      if (const Json* c = find(*d, "cleanup")) t.wordpiece_cleanup_ = as_bool(*c, where + ": cleanup");
    } else {
      throw std::runtime_error(where + ": unsupported decoder type '" + type +
                               "' (supported: ByteLevel, WordPiece)");
    }
  }
  return t;
}

void Tokenizer::read_post_processor(const Json& j, const std::string& where) {
  if (j.is_null()) return;
  const std::string& type = as_string(member(as_object(j, where), "type", where), where + ": type");
  if (type == "ByteLevel") return;  // offsets only
  if (type == "Sequence") {
    for (const Json& p : as_array(member(j, "processors", where), where + ": processors"))
      read_post_processor(p, where);
    return;
  }
  if (type != "TemplateProcessing")
    throw std::runtime_error(where + ": unsupported post-processor type '" + type +
                             "' (supported: ByteLevel, TemplateProcessing, Sequence)");
  if (!template_.empty()) throw std::runtime_error(where + ": more than one TemplateProcessing");
  const Json& specials = member(j, "special_tokens", where);
  for (const Json& item : as_array(member(j, "single", where), where + ": single")) {
    if (const Json* seq = find(item, "Sequence")) {
      if (as_string(member(*seq, "id", where), where + ": Sequence.id") != "A")
        throw std::runtime_error(where + ": the single template may only hold sequence A");
      template_.push_back({true, {}});
    } else if (const Json* sp = find(item, "SpecialToken")) {
      const std::string& id = as_string(member(*sp, "id", where), where + ": SpecialToken.id");
      const Json* entry = find(specials, id);
      if (!entry) throw std::runtime_error(where + ": special token '" + id + "' is not in special_tokens");
      TemplateItem ti{false, {}};
      for (const Json& i : as_array(member(*entry, "ids", where), where + ": ids"))
        ti.ids.push_back(as_int(i, where + ": ids"));
      template_.push_back(std::move(ti));
    } else {
      throw std::runtime_error(where + ": template items are Sequence or SpecialToken");
    }
  }
}

std::string Tokenizer::normalize(const std::string& text) const {
  std::string s = text;
  for (auto form : normal_forms_) s = unicode::normalize(s, form);
  return s;
}

std::vector<int64_t> Tokenizer::encode(const std::string& text) const {
  if (const size_t bad = unicode::invalid_utf8_offset(text); bad != unicode::kValid)
    throw std::runtime_error("tokenizer: the text is not valid UTF-8 (byte " + std::to_string(bad) + ")");
  std::vector<Piece> raw, pieces;
  added_.split(text, /*normalized_pass=*/false, raw);
  for (Piece& p : raw) {
    if (p.id >= 0) pieces.push_back(std::move(p));
    else added_.split(normalize(p.text), /*normalized_pass=*/true, pieces);
  }
  std::vector<int64_t> ids;
  for (const Piece& p : pieces) {
    if (p.id >= 0) {
      ids.push_back(p.id);
      continue;
    }
    std::vector<std::string> words{p.text};
    if (pre_tokenizer_) pre_tokenizer_->split(words);
    for (const std::string& w : words)
      if (!w.empty()) model_->encode(w, ids);
  }
  if (template_.empty()) return ids;
  std::vector<int64_t> out;
  for (const TemplateItem& t : template_) {
    const auto& part = t.sequence ? ids : t.ids;
    out.insert(out.end(), part.begin(), part.end());
  }
  return out;
}

std::string Tokenizer::decode_bytes(const std::vector<int64_t>& ids, bool skip_special) const {
  std::vector<const std::string*> tokens;
  for (int64_t id : ids) {
    const AddedToken* added = added_.by_id(id);
    const std::string* token = added ? &added->content : model_->id_to_token(id);
    if (!token) continue;  // an id of neither: skipped, as tokenizers does
    if (skip_special) {
      const auto as_added = added_.token_to_id(*token);
      if (as_added && added_.by_id(*as_added)->special) continue;
    }
    tokens.push_back(token);
  }
  std::string out;
  for (size_t i = 0; i < tokens.size(); ++i) {
    const std::string& t = *tokens[i];
    switch (decoder_) {
      case Decoder::None:
        if (i) out += ' ';
        out += t;
        break;
      case Decoder::ByteLevel: {
        std::string bytes;  // every character in the byte alphabet, else the token as it is
        bool mapped = true;
        for (size_t k = 0; k < t.size() && mapped;) {
          const int b = unicode::char_to_byte(unicode::next_code_point(t, k));
          if (b < 0) mapped = false;
          else bytes += static_cast<char>(b);
        }
        out += mapped ? bytes : t;
        break;
      }
      case Decoder::WordPiece: {
        std::string piece = t;
        if (i) {
          if (piece.compare(0, wordpiece_prefix_.size(), wordpiece_prefix_) == 0) piece.erase(0, wordpiece_prefix_.size());
          else piece = " " + piece;
        }
        out += wordpiece_cleanup_ ? cleanup(piece) : piece;
        break;
      }
    }
  }
  return out;
}

std::string Tokenizer::decode(const std::vector<int64_t>& ids, bool skip_special) const {
  return unicode::utf8_lossy(decode_bytes(ids, skip_special));
}

std::optional<int64_t> Tokenizer::token_to_id(const std::string& token) const {
  if (auto id = added_.token_to_id(token)) return id;
  return model_->token_to_id(token);
}

std::string TextStream::push(const std::vector<int64_t>& ids) {
  ids_.insert(ids_.end(), ids.begin(), ids.end());
  const std::string bytes = tokenizer_.decode_bytes(ids_, skip_special_);
  const size_t ready = bytes.size() - unicode::incomplete_utf8_tail(bytes);
  if (ready <= emitted_) return "";
  std::string out = unicode::utf8_lossy(std::string_view(bytes).substr(emitted_, ready - emitted_));
  emitted_ = ready;
  return out;
}

std::string TextStream::finish() {
  const std::string bytes = tokenizer_.decode_bytes(ids_, skip_special_);
  if (bytes.size() <= emitted_) return "";
  std::string out = unicode::utf8_lossy(std::string_view(bytes).substr(emitted_));
  emitted_ = bytes.size();
  return out;
}

}  // namespace mage::runtime
