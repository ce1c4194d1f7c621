// libFuzzer target: encode arbitrary bytes with a fixed Qwen-like tokenizer.json (byte-level
// BPE, the Qwen2 split regex, NFC, special and added tokens: tests/fuzz/data), then decode the
// ids, whole and streamed. Invariants: invalid UTF-8 is a std::runtime_error; ASCII text
// round-trips exactly (NFC and the byte-level BPE lose nothing); streamed decoding equals the
// whole decode. The input's tail also serves as raw ids for decode.
#include <cstddef>
#include <cstdint>
#include <algorithm>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "runtime/base/tokenizer.h"

namespace {

const mage::runtime::Tokenizer& tokenizer() {
  static const mage::runtime::Tokenizer t =
      mage::runtime::Tokenizer::from_file(MAGE_FUZZ_DATA "/qwen_like_tokenizer.json");
  return t;
}

void check_stream(const mage::runtime::Tokenizer& tok, std::vector<int64_t> ids, size_t chunk) {
  ids.resize(std::min<size_t>(ids.size(), 64));  // each push decodes everything so far
  mage::runtime::TextStream s(tok);
  std::string text;
  for (size_t i = 0; i < ids.size(); i += chunk)
    text += s.push(std::vector<int64_t>(ids.begin() + i, ids.begin() + std::min(ids.size(), i + chunk)));
  text += s.finish();
  if (text != tok.decode(ids)) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto& tok = tokenizer();
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    const std::vector<int64_t> ids = tok.encode(text);
    bool ascii = true;
    for (unsigned char c : text) ascii = ascii && c < 0x80;
    if (ascii && tok.decode(ids, /*skip_special=*/false) != text) std::abort();
    check_stream(tok, ids, 1 + size % 3);
  } catch (const std::runtime_error&) {
  }
  std::vector<int64_t> raw;  // arbitrary ids, some past the vocabulary
  for (size_t i = 0; i + 1 < size; i += 2) raw.push_back((data[i] | (data[i + 1] << 8)) % 1400);
  check_stream(tok, raw, 1 + size % 4);
  return 0;
}
