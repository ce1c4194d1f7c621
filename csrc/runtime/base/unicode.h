// UTF-8 and Unicode helpers of the tokenizer: validation, the lossy repair Rust's
// String::from_utf8_lossy does (what the Python tokenizer's decode returns), normalization forms
// and character classes through ICU, and GPT-2's byte-level alphabet.
#pragma once

#include <array>
#include <cstddef>
#include <string>
#include <string_view>

namespace mage::runtime::unicode {

constexpr size_t kValid = std::string_view::npos;

// Byte offset of the first byte that is not part of well-formed UTF-8, or kValid.
size_t invalid_utf8_offset(std::string_view s);
// The code point starting at s[i] of well-formed UTF-8; advances i past it.
char32_t next_code_point(std::string_view s, size_t& i);
// The code point ending at s[end) of well-formed UTF-8 (end > 0); moves end to its first byte.
char32_t previous_code_point(std::string_view s, size_t& end);
void append_utf8(std::string& out, char32_t cp);

// Each maximal ill-formed subpart becomes U+FFFD (Unicode's recommended practice, Rust's
// from_utf8_lossy): lossy(a) + lossy(b) == lossy(a + b) whenever a does not end inside a
// sequence b could complete (see incomplete_utf8_tail).
std::string utf8_lossy(std::string_view bytes);
// Bytes at the end of `s` that form a proper prefix of a well-formed sequence (0..3): a stream
// holds them back until the next bytes arrive.
size_t incomplete_utf8_tail(std::string_view s);

enum class NormalForm { NFC, NFD, NFKC, NFKD };
// `text` must be well-formed UTF-8.
std::string normalize(std::string_view text, NormalForm form);

bool is_white_space(char32_t cp);  // the White_Space property (Rust's char::is_whitespace, \s)
bool is_word(char32_t cp);         // Rust regex's \w: Alphabetic, M, Nd, Pc, Join_Control

// GPT-2's byte-level alphabet: printable bytes map to themselves, the others to U+0100 + n.
char32_t byte_to_char(unsigned char b);
int char_to_byte(char32_t cp);  // the inverse, or -1 for a code point outside the alphabet

}  // namespace mage::runtime::unicode
