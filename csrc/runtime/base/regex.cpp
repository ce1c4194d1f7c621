#define PCRE2_CODE_UNIT_WIDTH 8
#include "runtime/base/regex.h"

#include <pcre2.h>

#include <cctype>
#include <stdexcept>

namespace mage::runtime {
namespace {

constexpr uint32_t kMatchLimit = 10'000'000;  // backtracking steps per match attempt
constexpr uint32_t kDepthLimit = 100'000;

std::string pcre2_message(int code) {
  PCRE2_UCHAR buf[256];
  pcre2_get_error_message(code, buf, sizeof buf);
  return reinterpret_cast<const char*>(buf);
}

// \s -> \p{White_Space}, \S -> \P{White_Space}; every other escape is copied as is (so an
// escaped backslash followed by 's' stays what it was).
std::string translate(const std::string& p) {
  std::string out;
  for (size_t i = 0; i < p.size(); ++i) {
    if (p[i] == '\\' && i + 1 < p.size()) {
      const char c = p[++i];
      if (c == 's') out += "\\p{White_Space}";
      else if (c == 'S') out += "\\P{White_Space}";
      else { out += '\\'; out += c; }
    } else {
      out += p[i];
    }
  }
  return out;
}

}  // namespace

struct Regex::Impl {
  pcre2_code* code = nullptr;
  pcre2_match_context* context = nullptr;
  pcre2_jit_stack* jit_stack = nullptr;
  std::string what;
  ~Impl() {
    if (jit_stack) pcre2_jit_stack_free(jit_stack);
    if (context) pcre2_match_context_free(context);
    if (code) pcre2_code_free(code);
  }
};

Regex::Regex(const std::string& pattern, const std::string& what) : impl_(new Impl) {
  impl_->what = what;
  const std::string translated = translate(pattern);
  int err = 0;
  PCRE2_SIZE offset = 0;
  impl_->code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(translated.data()), translated.size(),
                              PCRE2_UTF | PCRE2_UCP, &err, &offset, nullptr);
  if (!impl_->code)
    throw std::runtime_error(what + ": invalid regex '" + pattern + "': " + pcre2_message(err) +
                             " (at byte " + std::to_string(offset) + " of the PCRE2 form)");
  impl_->context = pcre2_match_context_create(nullptr);
  pcre2_set_match_limit(impl_->context, kMatchLimit);
  pcre2_set_depth_limit(impl_->context, kDepthLimit);
  if (pcre2_jit_compile(impl_->code, PCRE2_JIT_COMPLETE) == 0) {  // else: the interpreter
    impl_->jit_stack = pcre2_jit_stack_create(32 * 1024, 4 * 1024 * 1024, nullptr);
    if (impl_->jit_stack) pcre2_jit_stack_assign(impl_->context, nullptr, impl_->jit_stack);
  }
}

Regex::~Regex() = default;
Regex::Regex(Regex&&) noexcept = default;
Regex& Regex::operator=(Regex&&) noexcept = default;

std::vector<std::pair<size_t, size_t>> Regex::find_all(std::string_view s) const {
  std::vector<std::pair<size_t, size_t>> out;
  pcre2_match_data* md = pcre2_match_data_create_from_pattern(impl_->code, nullptr);
  if (!md) throw std::bad_alloc();
  struct Free {
    pcre2_match_data* md;
    ~Free() { pcre2_match_data_free(md); }
  } guard{md};
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(s.data());
  size_t from = 0;
  bool have_last = false;
  size_t last_end = 0;
  while (from <= s.size()) {
    // The caller validated the UTF-8; `from` always sits on a character boundary.
    const int rc = pcre2_match(impl_->code, subject, s.size(), from, PCRE2_NO_UTF_CHECK, md,
                               impl_->context);
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0)
      throw std::runtime_error(impl_->what + ": regex matching failed at byte " +
                               std::to_string(from) + ": " + pcre2_message(rc));
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
    const size_t b = ov[0], e = ov[1];
    if (b == e && have_last && e == last_end) {  // no empty match where the last one ended
      if (from >= s.size()) break;
      ++from;
      while (from < s.size() && (static_cast<unsigned char>(s[from]) & 0xC0) == 0x80) ++from;
      continue;
    }
    out.emplace_back(b, e);
    have_last = true;
    last_end = e;
    from = e;
  }
  return out;
}

std::string Regex::escape(const std::string& literal) {
  std::string out;
  for (char c : literal) {
    const unsigned char u = static_cast<unsigned char>(c);
    if (u < 0x80 && !std::isalnum(u) && c != '_') out += '\\';
    out += c;
  }
  return out;
}

}  // namespace mage::runtime
