// libFuzzer target: safetensors header validation on arbitrary bytes (a whole "file"). A header
// that validates must describe tensors that tile the data region exactly, each with
// end - begin == numel * element size; anything else must be a std::runtime_error.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>

#include "runtime/base/safetensors_header.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace mage::runtime;
  SafetensorsHeader h;
  try {
    h = parse_safetensors_header(data, size, size, "fuzz.safetensors");
  } catch (const std::runtime_error&) {
    return 0;
  }
  if (h.data_start > size) std::abort();
  uint64_t at = 0;
  for (const TensorEntry& e : h.tensors) {
    if (e.begin != at || e.end < e.begin || e.end - e.begin != e.numel * e.element_size) std::abort();
    at = e.end;
  }
  if (at != size - h.data_start) std::abort();
  return 0;
}
