// The safetensors header, parsed and validated without touching tensor data (torch-free, so
// the fuzz target builds without LibTorch). Layout: an 8-byte little-endian header length N,
// N bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}},
// then the data region; offsets are relative to the data region's start (file byte 8 + N).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace mage::runtime {

// The safetensors crate's own cap: a larger header is refused before it is read.
constexpr uint64_t kMaxSafetensorsHeader = 100'000'000;

struct TensorEntry {
  std::string name;
  std::string dtype;           // safetensors name: BF16, F16, F32, F64, I8 ... BOOL
  uint64_t element_size = 0;   // bytes per element
  std::vector<int64_t> shape;
  uint64_t numel = 0;
  uint64_t begin = 0, end = 0; // data_offsets, relative to data_start
};

struct SafetensorsHeader {
  uint64_t data_start = 0;           // file offset of the data region (8 + header length)
  std::vector<TensorEntry> tensors;  // sorted by begin
};

// Bytes per element of a safetensors dtype name, or 0 if the name is unknown.
uint64_t safetensors_element_size(const std::string& dtype);

// Validates everything the loader relies on: the header length against the cap and the file
// size, the JSON, each entry's dtype / shape / offsets (sizes checked for uint64 overflow;
// end - begin must equal numel * element size), and that the entries tile the data region
// exactly (no gap, no overlap, nothing after the last). `prefix` holds the file's first bytes
// (at least min(file_size, 8 + header length)); `file_size` is the whole file's. Errors are
// std::runtime_error naming `path` and the file byte offset.
SafetensorsHeader parse_safetensors_header(const unsigned char* prefix, uint64_t prefix_size,
                                           uint64_t file_size, const std::string& path);

}  // namespace mage::runtime
