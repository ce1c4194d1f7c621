// Well-formed UTF-8 per the Unicode standard (table 3-7): the second byte's range depends on the
// lead (E0: A0..BF, ED: 80..9F, F0: 90..BF, F4: 80..8F), so surrogates and overlongs are ill-formed.
#include "runtime/base/unicode.h"

#include <unicode/bytestream.h>
#include <unicode/normalizer2.h>
#include <unicode/uchar.h>

#include <stdexcept>

namespace mage::runtime::unicode {
namespace {

// Expected length of a sequence with this lead byte (0: not a lead) and the range of its
// second byte.
struct Lead {
  int length;
  unsigned char lo, hi;
};

Lead lead_of(unsigned char b) {
  if (b < 0x80) return {1, 0, 0};
  if (b >= 0xC2 && b <= 0xDF) return {2, 0x80, 0xBF};
  if (b == 0xE0) return {3, 0xA0, 0xBF};
  if (b == 0xED) return {3, 0x80, 0x9F};
  if (b >= 0xE1 && b <= 0xEF) return {3, 0x80, 0xBF};
  if (b == 0xF0) return {4, 0x90, 0xBF};
  if (b >= 0xF1 && b <= 0xF3) return {4, 0x80, 0xBF};
  if (b == 0xF4) return {4, 0x80, 0x8F};
  return {0, 0, 0};
}

// Length of the well-formed prefix of a sequence starting at s[i]: equal to the lead's length
// when the sequence is complete and well-formed; less when it is cut or broken (at least 1).
int valid_prefix(std::string_view s, size_t i, int* expected) {
  const Lead lead = lead_of(static_cast<unsigned char>(s[i]));
  *expected = lead.length;
  if (lead.length <= 1) return 1;
  int n = 1;
  for (; n < lead.length && i + n < s.size(); ++n) {
    const unsigned char c = static_cast<unsigned char>(s[i + n]);
    const unsigned char lo = n == 1 ? lead.lo : 0x80, hi = n == 1 ? lead.hi : 0xBF;
    if (c < lo || c > hi) break;
  }
  return n;
}

const icu::Normalizer2* normalizer(NormalForm form) {
  UErrorCode status = U_ZERO_ERROR;
  const icu::Normalizer2* n = nullptr;
  switch (form) {
    case NormalForm::NFC: n = icu::Normalizer2::getNFCInstance(status); break;
    case NormalForm::NFD: n = icu::Normalizer2::getNFDInstance(status); break;
    case NormalForm::NFKC: n = icu::Normalizer2::getNFKCInstance(status); break;
    case NormalForm::NFKD: n = icu::Normalizer2::getNFKDInstance(status); break;
  }
  if (U_FAILURE(status) || !n)
    throw std::runtime_error(std::string("ICU normalizer unavailable: ") + u_errorName(status));
  return n;
}

}  // namespace

size_t invalid_utf8_offset(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    int expected = 0;
    const int n = valid_prefix(s, i, &expected);
    if (expected == 0 || n != expected) return i;
    i += n;
  }
  return kValid;
}

char32_t next_code_point(std::string_view s, size_t& i) {
  const unsigned char b = static_cast<unsigned char>(s[i]);
  const int len = b < 0x80 ? 1 : b < 0xE0 ? 2 : b < 0xF0 ? 3 : 4;
  char32_t cp = len == 1 ? b : len == 2 ? (b & 0x1F) : len == 3 ? (b & 0x0F) : (b & 0x07);
  for (int k = 1; k < len; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
  i += len;
  return cp;
}

char32_t previous_code_point(std::string_view s, size_t& end) {
  size_t start = end - 1;
  while (start > 0 && (static_cast<unsigned char>(s[start]) & 0xC0) == 0x80) --start;
  size_t i = start;
  const char32_t cp = next_code_point(s, i);
  end = start;
  return cp;
}

void append_utf8(std::string& out, char32_t cp) {
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

std::string utf8_lossy(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  for (size_t i = 0; i < bytes.size();) {
    int expected = 0;
    const int n = valid_prefix(bytes, i, &expected);
    if (expected != 0 && n == expected) {
      out.append(bytes.substr(i, n));
    } else {
      out += "\xEF\xBF\xBD";  // U+FFFD for the maximal subpart
    }
    i += n;
  }
  return out;
}

size_t incomplete_utf8_tail(std::string_view s) {
  // A sequence is at most 4 bytes: look for its lead among the last 3.
  for (size_t back = 1; back <= 3 && back <= s.size(); ++back) {
    const size_t i = s.size() - back;
    int expected = 0;
    const int n = valid_prefix(s, i, &expected);
    if (expected > 1) return n == static_cast<int>(back) && n < expected ? back : 0;
    if (expected == 1) return 0;
  }
  return 0;
}

std::string normalize(std::string_view text, NormalForm form) {
  const icu::Normalizer2* n = normalizer(form);
  UErrorCode status = U_ZERO_ERROR;
  const icu::StringPiece in(text.data(), static_cast<int32_t>(text.size()));
  if (n->isNormalizedUTF8(in, status) && U_SUCCESS(status)) return std::string(text);
  status = U_ZERO_ERROR;
  std::string out;
  icu::StringByteSink<std::string> sink(&out);
  n->normalizeUTF8(0, in, sink, nullptr, status);
  if (U_FAILURE(status))
    throw std::runtime_error(std::string("Unicode normalization failed: ") + u_errorName(status));
  return out;
}

bool is_white_space(char32_t cp) { return u_hasBinaryProperty(cp, UCHAR_WHITE_SPACE); }

bool is_word(char32_t cp) {
  if (u_hasBinaryProperty(cp, UCHAR_ALPHABETIC) || u_hasBinaryProperty(cp, UCHAR_JOIN_CONTROL))
    return true;
  const int8_t t = u_charType(cp);
  return t == U_NON_SPACING_MARK || t == U_ENCLOSING_MARK || t == U_COMBINING_SPACING_MARK ||
         t == U_DECIMAL_DIGIT_NUMBER || t == U_CONNECTOR_PUNCTUATION;
}

char32_t byte_to_char(unsigned char b) {
  static const std::array<char32_t, 256> table = [] {
    std::array<char32_t, 256> t{};
    int extra = 0;
    for (int c = 0; c < 256; ++c) {
      const bool printable = (c >= '!' && c <= '~') || (c >= 0xA1 && c <= 0xAC) || (c >= 0xAE);
      t[c] = printable ? static_cast<char32_t>(c) : static_cast<char32_t>(256 + extra++);
    }
    return t;
  }();
  return table[b];
}

int char_to_byte(char32_t cp) {
  static const std::array<int, 512> inverse = [] {
    std::array<int, 512> t{};
    t.fill(-1);
    for (int c = 0; c < 256; ++c) t[byte_to_char(static_cast<unsigned char>(c))] = c;
    return t;
  }();
  return cp < inverse.size() ? inverse[cp] : -1;
}

}  // namespace mage::runtime::unicode
