// The checks follow the safetensors crate's (metadata validation: offsets must start at 0, be
// contiguous and end at the buffer's end), with every size computed in checked uint64.
#include "runtime/base/safetensors_header.h"

#include <algorithm>
#include <stdexcept>

#include "runtime/base/json.h"

namespace mage::runtime {
namespace {

struct DtypeSize {
  const char* name;
  uint64_t size;
};
constexpr DtypeSize kDtypeSizes[] = {
    {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E5M2", 1}, {"F8_E4M3", 1}, {"I16", 2},
    {"U16", 2},  {"F16", 2}, {"BF16", 2}, {"I32", 4},    {"U32", 4},     {"F32", 4},
    {"F64", 8},  {"I64", 8}, {"U64", 8}};

bool mul_overflows(uint64_t a, uint64_t b, uint64_t* out) {
  return __builtin_mul_overflow(a, b, out);
}

std::string at_byte(uint64_t file_offset) { return " (file byte " + std::to_string(file_offset) + ")"; }

TensorEntry parse_entry(const std::string& name, const Json& info, const std::string& where) {
  if (!info.is_object()) throw std::runtime_error(where + ": header entry is not an object");
  const Json* dtype = find(info, "dtype");
  const Json* shape = find(info, "shape");
  const Json* offsets = find(info, "data_offsets");
  if (!dtype || !shape || !offsets)
    throw std::runtime_error(where + ": header entry needs dtype, shape and data_offsets");
  TensorEntry e;
  e.name = name;
  e.dtype = as_string(*dtype, where + ": dtype");
  e.element_size = safetensors_element_size(e.dtype);
  if (!e.element_size)
    throw std::runtime_error(where + ": unknown dtype '" + e.dtype + "'");
  e.numel = 1;
  for (const Json& s : as_array(*shape, where + ": shape")) {
    const int64_t n = as_int(s, where + ": shape");
    if (n < 0) throw std::runtime_error(where + ": negative dimension " + std::to_string(n) + " in shape");
    e.shape.push_back(n);
    if (mul_overflows(e.numel, static_cast<uint64_t>(n), &e.numel))
      throw std::runtime_error(where + ": shape " + shape->dump() + " overflows 64-bit sizes");
  }
  if (!offsets->is_array() || offsets->size() != 2)
    throw std::runtime_error(where + ": data_offsets must be [begin, end]");
  e.begin = as_uint((*offsets)[0], where + ": data_offsets");
  e.end = as_uint((*offsets)[1], where + ": data_offsets");
  if (e.end < e.begin)
    throw std::runtime_error(where + ": data_offsets [" + std::to_string(e.begin) + ", " +
                             std::to_string(e.end) + "] end before they begin");
  uint64_t nbytes = 0;
  if (mul_overflows(e.numel, e.element_size, &nbytes))
    throw std::runtime_error(where + ": shape " + shape->dump() + " of " + e.dtype +
                             " overflows 64-bit sizes");
  if (e.end - e.begin != nbytes)
    throw std::runtime_error(where + ": shape " + shape->dump() + " of " + e.dtype + " needs " +
                             std::to_string(nbytes) + " bytes, data_offsets give " +
                             std::to_string(e.end - e.begin));
  return e;
}

}  // namespace

uint64_t safetensors_element_size(const std::string& dtype) {
  for (const auto& d : kDtypeSizes)
    if (dtype == d.name) return d.size;
  return 0;
}

SafetensorsHeader parse_safetensors_header(const unsigned char* prefix, uint64_t prefix_size,
                                           uint64_t file_size, const std::string& path) {
  if (file_size < 8 || prefix_size < 8)
    throw std::runtime_error(path + ": truncated safetensors file (" + std::to_string(file_size) +
                             " bytes, the header length alone needs 8)");
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | prefix[i];
  if (header_len > kMaxSafetensorsHeader)
    throw std::runtime_error(path + ": header length " + std::to_string(header_len) +
                             " (file byte 0) exceeds the cap of " +
                             std::to_string(kMaxSafetensorsHeader) + " bytes: not a safetensors file?");
  if (header_len > file_size - 8)
    throw std::runtime_error(path + ": truncated safetensors file (header of " +
                             std::to_string(header_len) + " bytes from file byte 8, file has " +
                             std::to_string(file_size) + ")");
  if (prefix_size < 8 + header_len)
    throw std::invalid_argument(path + ": parse_safetensors_header needs the header's bytes");
  SafetensorsHeader h;
  h.data_start = 8 + header_len;
  const Json doc = parse_json(reinterpret_cast<const char*>(prefix) + 8, header_len,
                              path + ": header (from file byte 8)");
  if (!doc.is_object()) throw std::runtime_error(path + ": header is not a JSON object" + at_byte(8));
  for (const auto& [name, info] : doc.items()) {
    if (name == "__metadata__") {
      if (!info.is_object() && !info.is_null())
        throw std::runtime_error(path + ": __metadata__ is not an object");
      continue;
    }
    h.tensors.push_back(parse_entry(name, info, path + ": tensor '" + name + "'"));
  }
  // The entries must tile the data region: sorted by offset, each starts where the last ended.
  std::sort(h.tensors.begin(), h.tensors.end(), [](const TensorEntry& a, const TensorEntry& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  const uint64_t data_size = file_size - h.data_start;
  uint64_t at = 0;
  const TensorEntry* prev = nullptr;
  for (const TensorEntry& e : h.tensors) {
    const std::string where = path + ": tensor '" + e.name + "'";
    if (e.begin < at)
      throw std::runtime_error(where + ": data_offsets [" + std::to_string(e.begin) + ", " +
                               std::to_string(e.end) + ")" + at_byte(h.data_start + e.begin) +
                               " overlap tensor '" + prev->name + "' (ends at data offset " +
                               std::to_string(at) + ")");
    if (e.begin > at)
      throw std::runtime_error(where + ": gap of " + std::to_string(e.begin - at) +
                               " unused bytes before it at data offset " + std::to_string(at) +
                               at_byte(h.data_start + at));
    if (e.end > data_size)
      throw std::runtime_error(where + ": data_offsets end " + std::to_string(e.end) +
                               " lies past the data region (" + std::to_string(data_size) +
                               " bytes from file byte " + std::to_string(h.data_start) +
                               "): file truncated?");
    at = e.end;
    prev = &e;
  }
  if (at != data_size)
    throw std::runtime_error(path + ": " + std::to_string(data_size - at) +
                             " bytes after the last tensor" + at_byte(h.data_start + at) +
                             " are not covered by any header entry");
  return h;
}

}  // namespace mage::runtime
