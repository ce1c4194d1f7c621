// safetensors reading (memory-mapped, validated by safetensors_header.h) and writing (for tests
// and tools).
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <map>
#include <optional>
#include <string>

namespace mage::runtime {

using TensorMap = std::map<std::string, at::Tensor>;

// The torch dtype of a safetensors dtype name (BF16, F16, F32, F64, I8, U8, I16, I32, I64, BOOL);
// std::runtime_error naming `where` for the others.
at::ScalarType torch_dtype(const std::string& safetensors_dtype, const std::string& where);

// Visits every tensor of one file, memory-mapped: `fn(name, view)` gets a CPU tensor that views
// the mapped bytes (only valid during the call: copy what you keep). Pages of a visited tensor
// are dropped from the process after the call, so host memory stays near one tensor's size.
// Errors (std::runtime_error) name the file and byte offset.
using TensorVisitor = std::function<void(const std::string& name, const at::Tensor& view)>;
void visit_safetensors(const std::string& path, const TensorVisitor& fn);

// Every tensor of one file copied to `options` (default: CPU, the file's dtype).
TensorMap load_safetensors(const std::string& path,
                           std::optional<at::TensorOptions> options = std::nullopt);

// Writes `tensors` (contiguous copies are taken) in the same format.
void save_safetensors(const std::string& path, const TensorMap& tensors);

// The weight files of a checkpoint directory: shards listed by model.safetensors.index.json,
// else model.safetensors, else every *.safetensors file (sorted). Paths include `dir`.
std::vector<std::string> checkpoint_files(const std::string& dir);

// Visits every tensor of a checkpoint, one shard mapped at a time; `fn` also gets the file. A
// name in two files is an error.
void visit_checkpoint(const std::string& dir,
                      const std::function<void(const std::string& file, const std::string& name,
                                               const at::Tensor& view)>& fn);

// Every tensor of a checkpoint directory, copied to `options` (default: CPU, the file's dtype).
TensorMap load_checkpoint_weights(const std::string& dir,
                                  std::optional<at::TensorOptions> options = std::nullopt);

// A copy of a mapped view in `options`' device and dtype, made without a second host buffer:
// on CUDA the file's bytes are copied to the device and converted there.
at::Tensor copy_to(const at::Tensor& view, const at::TensorOptions& options);

}  // namespace mage::runtime
