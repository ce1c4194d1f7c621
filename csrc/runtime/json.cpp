// Recursive-descent JSON parser (RFC 8259). Numbers are doubles, as in JavaScript; strings are
// returned as UTF-8 with escapes (including \u surrogate pairs) decoded.
#include "runtime/json.h"

#include <cmath>
#include <cstdlib>
#include <stdexcept>

#include "runtime/io.h"

namespace mage::runtime {
namespace {

constexpr int kMaxDepth = 512;  // nesting limit: deep inputs must not overflow the stack

class Parser {
 public:
  Parser(const std::string& text, const std::string& source) : s_(text), source_(source) {}

  Json document() {
    Json v = value(0);
    skip_ws();
    if (pos_ != s_.size()) fail("unexpected trailing characters");
    return v;
  }

 private:
  const std::string& s_;
  const std::string& source_;
  size_t pos_ = 0;

  [[noreturn]] void fail(const std::string& what) const {
    throw std::runtime_error(source_ + ": byte " + std::to_string(pos_) + ": " + what);
  }
  void skip_ws() {
    while (pos_ < s_.size() &&
           (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' || s_[pos_] == '\r'))
      ++pos_;
  }
  char peek() {
    if (pos_ >= s_.size()) fail("unexpected end of input");
    return s_[pos_];
  }
  void expect(char c) {
    if (peek() != c) fail(std::string("expected '") + c + "', got '" + s_[pos_] + "'");
    ++pos_;
  }
  void literal(const char* word) {
    for (const char* p = word; *p; ++p, ++pos_)
      if (pos_ >= s_.size() || s_[pos_] != *p) fail(std::string("invalid literal, expected ") + word);
  }

  Json value(int depth) {
    if (depth > kMaxDepth) fail("nesting deeper than 512 levels");
    skip_ws();
    Json v;
    switch (peek()) {
      case '{': container(v, depth, /*keyed=*/true); break;
      case '[': container(v, depth, /*keyed=*/false); break;
      case '"': v.type = Json::Type::String; v.string = string(); break;
      case 't': literal("true"); v.type = Json::Type::Bool; v.boolean = true; break;
      case 'f': literal("false"); v.type = Json::Type::Bool; break;
      case 'n': literal("null"); break;
      default: v.type = Json::Type::Number; v.number = number();
    }
    return v;
  }

  // Objects and arrays share one loop: members are "key": value (keyed) or bare values.
  void container(Json& v, int depth, bool keyed) {
    v.type = keyed ? Json::Type::Object : Json::Type::Array;
    const char close = keyed ? '}' : ']';
    ++pos_;  // the opening bracket, checked by value()
    skip_ws();
    if (peek() == close) { ++pos_; return; }
    while (true) {
      if (keyed) {
        skip_ws();
        if (peek() != '"') fail("expected a string key");
        v.keys.push_back(string());
        skip_ws();
        expect(':');
      }
      v.items.push_back(value(depth + 1));
      skip_ws();
      if (peek() == ',') { ++pos_; continue; }
      expect(close);
      return;
    }
  }

  double number() {
    // Validate the JSON grammar first (strtod alone accepts "inf", hex, leading '+', ...).
    size_t start = pos_;
    auto digits = [&] {
      size_t d = pos_;
      while (pos_ < s_.size() && s_[pos_] >= '0' && s_[pos_] <= '9') ++pos_;
      return pos_ - d;
    };
    if (pos_ < s_.size() && s_[pos_] == '-') ++pos_;
    if (pos_ < s_.size() && s_[pos_] == '0') {
      ++pos_;
    } else if (digits() == 0) {
      pos_ = start;
      fail("unexpected character '" + std::string(1, peek()) + "'");
    }
    if (pos_ < s_.size() && s_[pos_] == '.') {
      ++pos_;
      if (digits() == 0) fail("expected digits after the decimal point");
    }
    if (pos_ < s_.size() && (s_[pos_] == 'e' || s_[pos_] == 'E')) {
      ++pos_;
      if (pos_ < s_.size() && (s_[pos_] == '+' || s_[pos_] == '-')) ++pos_;
      if (digits() == 0) fail("expected digits in the exponent");
    }
    return std::strtod(s_.substr(start, pos_ - start).c_str(), nullptr);
  }

  unsigned hex4() {
    unsigned u = 0;
    for (int i = 0; i < 4; ++i, ++pos_) {
      char c = peek();
      u <<= 4;
      if (c >= '0' && c <= '9') u |= c - '0';
      else if (c >= 'a' && c <= 'f') u |= c - 'a' + 10;
      else if (c >= 'A' && c <= 'F') u |= c - 'A' + 10;
      else fail("invalid \\u escape");
    }
    return u;
  }

  static void put_utf8(std::string& out, unsigned cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xC0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xE0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }

  std::string string() {
    expect('"');
    std::string out;
    while (true) {
      char c = peek();
      ++pos_;
      if (c == '"') return out;
      if (static_cast<unsigned char>(c) < 0x20) { --pos_; fail("control character in string"); }
      if (c != '\\') { out += c; continue; }
      char e = peek();
      ++pos_;
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          unsigned cp = hex4();
          if (cp >= 0xD800 && cp <= 0xDBFF) {  // high surrogate: a low one must follow
            if (pos_ + 1 >= s_.size() || s_[pos_] != '\\' || s_[pos_ + 1] != 'u')
              fail("unpaired surrogate in \\u escape");
            pos_ += 2;
            unsigned lo = hex4();
            if (lo < 0xDC00 || lo > 0xDFFF) fail("invalid low surrogate in \\u escape");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
            fail("unpaired surrogate in \\u escape");
          }
          put_utf8(out, cp);
          break;
        }
        default: pos_ -= 1; fail(std::string("invalid escape '\\") + e + "'");
      }
    }
  }
};

const char* type_name(Json::Type t) {
  switch (t) {
    case Json::Type::Null: return "null";
    case Json::Type::Bool: return "a boolean";
    case Json::Type::Number: return "a number";
    case Json::Type::String: return "a string";
    case Json::Type::Array: return "an array";
    default: return "an object";
  }
}

[[noreturn]] void type_error(const std::string& what, const char* want, Json::Type got) {
  throw std::runtime_error(what + ": expected " + want + ", got " + type_name(got));
}

}  // namespace

const Json* Json::find(const std::string& key) const {
  if (type != Type::Object) return nullptr;
  for (size_t i = keys.size(); i-- > 0;)
    if (keys[i] == key) return &items[i];
  return nullptr;
}

double Json::as_number(const std::string& what) const {
  if (type != Type::Number) type_error(what, "a number", type);
  return number;
}

int64_t Json::as_int(const std::string& what) const {
  double v = as_number(what);
  if (std::floor(v) != v || std::fabs(v) > 9.0e15)
    throw std::runtime_error(what + ": expected an integer, got " + std::to_string(v));
  return static_cast<int64_t>(v);
}

bool Json::as_bool(const std::string& what) const {
  if (type != Type::Bool) type_error(what, "a boolean", type);
  return boolean;
}

const std::string& Json::as_string(const std::string& what) const {
  if (type != Type::String) type_error(what, "a string", type);
  return string;
}

Json parse_json(const std::string& text, const std::string& source) {
  return Parser(text, source).document();
}

Json parse_json_file(const std::string& path) { return parse_json(read_file(path), path); }

}  // namespace mage::runtime
