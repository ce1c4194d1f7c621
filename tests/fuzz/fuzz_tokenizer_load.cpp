// libFuzzer target: tokenizer.json itself is untrusted input. Arbitrary bytes are loaded as a
// tokenizer; a refused file is a std::runtime_error; a loaded one must encode and decode a few
// texts without crashing (errors such as a regex's match limit are allowed).
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "runtime/base/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace mage::runtime;
  try {
    const Tokenizer tok = Tokenizer::from_json(
        parse_json(reinterpret_cast<const char*>(data), size, "fuzz"), "fuzz tokenizer.json");
    for (const char* text : {"Hello, world!  It's 42.\n", "<|im_start|>user\ncaf\xC3\xA9 \xE6\x95\xB0<|im_end|>", ""}) {
      try {
        const auto ids = tok.encode(text);
        (void)tok.decode(ids);
        (void)tok.decode(ids, false);
      } catch (const std::runtime_error&) {
      }
    }
    (void)tok.decode({0, 1, 2, 3, 100000, -1});
  } catch (const std::runtime_error&) {
  }
  return 0;
}
