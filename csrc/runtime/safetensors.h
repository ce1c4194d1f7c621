// safetensors reading (and writing, for tests and tools): an 8-byte little-endian header length,
// a JSON header {name: {dtype, shape, data_offsets}}, then the raw tensor bytes.
#pragma once

#include <ATen/ATen.h>

#include <map>
#include <string>

namespace mage::runtime {

using TensorMap = std::map<std::string, at::Tensor>;

// Loads every tensor of one file (BF16, F16, F32; also I32/I64/BOOL for completeness) on the CPU.
// Errors (std::runtime_error) name the file: missing, truncated, bad header, unknown dtype,
// shape/size mismatch.
TensorMap load_safetensors(const std::string& path);

// Writes `tensors` (contiguous copies are taken) in the same format.
void save_safetensors(const std::string& path, const TensorMap& tensors);

// The weights of a checkpoint directory: shards listed by model.safetensors.index.json, else
// model.safetensors, else every *.safetensors file. A name in two files is an error.
TensorMap load_checkpoint_weights(const std::string& dir);

}  // namespace mage::runtime
