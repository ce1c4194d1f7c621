// libFuzzer target: the JSON layer (runtime/base/json.h) on arbitrary bytes. A document that
// parses must survive a dump / re-parse round trip unchanged; anything else must be a
// std::runtime_error, never a crash or a sanitizer report.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>

#include "runtime/base/json.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace mage::runtime;
  Json doc;
  try {
    doc = parse_json(reinterpret_cast<const char*>(data), size, "fuzz");
  } catch (const std::runtime_error&) {
    return 0;
  }
  const Json again = parse_json(doc.dump(), "dump");
  if (again != doc) std::abort();
  if (const Json* v = find(doc, "k")) {  // the typed accessors on whatever the input holds
    for (auto fn : {+[](const Json& j) { (void)as_int(j, "k"); }, +[](const Json& j) { (void)as_uint(j, "k"); },
                    +[](const Json& j) { (void)as_number(j, "k"); }, +[](const Json& j) { (void)as_string(j, "k"); }}) {
      try {
        fn(*v);
      } catch (const std::runtime_error&) {
      }
    }
  }
  return 0;
}
