// The format is specified at https://github.com/huggingface/safetensors (Apache-2.0); tensors
// are little-endian, as on every host this runs on. The header is validated in full
// (safetensors_header.cpp) before any tensor byte is touched.
#include "runtime/safetensors.h"

#include <dirent.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <set>
#include <stdexcept>
#include <vector>

#include "runtime/base/io.h"
#include "runtime/base/json.h"
#include "runtime/base/safetensors_header.h"

namespace mage::runtime {
namespace {

struct DtypeName {
  const char* name;
  at::ScalarType type;
};
constexpr DtypeName kDtypes[] = {{"BF16", at::kBFloat16}, {"F16", at::kHalf}, {"F32", at::kFloat},
                                 {"F64", at::kDouble},    {"I8", at::kChar},  {"U8", at::kByte},
                                 {"I16", at::kShort},     {"I32", at::kInt},  {"I64", at::kLong},
                                 {"BOOL", at::kBool}};

const char* dtype_to_name(at::ScalarType t) {
  for (const auto& d : kDtypes)
    if (t == d.type) return d.name;
  throw std::runtime_error(std::string("save_safetensors: unsupported dtype ") + c10::toString(t));
}

std::vector<std::string> safetensors_in(const std::string& dir) {
  std::vector<std::string> files;
  DIR* d = ::opendir(dir.c_str());
  if (!d) throw std::runtime_error(dir + ": cannot open the checkpoint directory");
  const std::string ext = ".safetensors";
  while (dirent* e = ::readdir(d)) {
    std::string n = e->d_name;
    if (n.size() > ext.size() && n.compare(n.size() - ext.size(), ext.size(), ext) == 0)
      files.push_back(n);
  }
  ::closedir(d);
  std::sort(files.begin(), files.end());
  return files;
}

}  // namespace

at::ScalarType torch_dtype(const std::string& name, const std::string& where) {
  for (const auto& d : kDtypes)
    if (name == d.name) return d.type;
  throw std::runtime_error(where + ": unsupported dtype '" + name +
                           "' (supported: BF16, F16, F32, F64, I8, U8, I16, I32, I64, BOOL)");
}

void visit_safetensors(const std::string& path, const TensorVisitor& fn) {
  const MappedFile file(path);
  const SafetensorsHeader h = parse_safetensors_header(file.data(), file.size(), file.size(), path);
  for (const TensorEntry& e : h.tensors) {
    const at::ScalarType type = torch_dtype(e.dtype, path + ": tensor '" + e.name + "'");
    const unsigned char* p = file.data() + h.data_start + e.begin;
    at::Tensor view;
    if (reinterpret_cast<uintptr_t>(p) % e.element_size == 0) {
      view = at::from_blob(const_cast<unsigned char*>(p), e.shape, at::TensorOptions().dtype(type));
    } else {  // a writer that did not pad the header: an aligned copy of this one tensor
      view = at::empty(e.shape, at::TensorOptions().dtype(type));
      std::memcpy(view.data_ptr(), p, e.end - e.begin);
    }
    fn(e.name, view);
    file.release(h.data_start + e.begin, e.end - e.begin);
  }
}

at::Tensor copy_to(const at::Tensor& view, const at::TensorOptions& options) {
  const at::ScalarType dtype = options.has_dtype() ? options.dtype().toScalarType() : view.scalar_type();
  const at::Device device = options.has_device() ? options.device() : at::Device(at::kCPU);
  if (device.is_cpu()) {  // one pass: read the mapped bytes, write the converted values
    at::Tensor out = at::empty(view.sizes(), at::TensorOptions().dtype(dtype));
    out.copy_(view);
    return out;
  }
  // Upload in the file's dtype, convert on the device: no converted host copy.
  at::Tensor dev = at::empty(view.sizes(), at::TensorOptions().dtype(view.scalar_type()).device(device));
  dev.copy_(view);
  return dtype == view.scalar_type() ? dev : dev.to(dtype);
}

TensorMap load_safetensors(const std::string& path, std::optional<at::TensorOptions> options) {
  TensorMap out;
  visit_safetensors(path, [&](const std::string& name, const at::Tensor& view) {
    out[name] = copy_to(view, options.value_or(at::TensorOptions()));
  });
  return out;
}

void save_safetensors(const std::string& path, const TensorMap& tensors) {
  Json header = Json::object();
  std::vector<at::Tensor> parts;
  uint64_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    at::Tensor t = tensor.contiguous().cpu();
    const uint64_t n = static_cast<uint64_t>(t.numel()) * t.element_size();
    header[name] = {{"dtype", dtype_to_name(t.scalar_type())},
                    {"shape", std::vector<int64_t>(t.sizes().begin(), t.sizes().end())},
                    {"data_offsets", {offset, offset + n}}};
    offset += n;
    parts.push_back(t);
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // data starts 8-byte aligned, as the crate writes
  std::ofstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error(path + ": cannot open for writing");
  const uint64_t len = text.size();
  char len_bytes[8];
  for (int i = 0; i < 8; ++i) len_bytes[i] = static_cast<char>((len >> (8 * i)) & 0xFF);
  f.write(len_bytes, 8);
  f.write(text.data(), static_cast<std::streamsize>(text.size()));
  for (const at::Tensor& t : parts)
    f.write(static_cast<const char*>(t.data_ptr()), t.numel() * t.element_size());
  if (!f) throw std::runtime_error(path + ": write error");
}

std::vector<std::string> checkpoint_files(const std::string& dir) {
  if (!dir_exists(dir)) throw std::runtime_error(dir + ": checkpoint directory does not exist");
  std::vector<std::string> files;
  const std::string index = join_path(dir, "model.safetensors.index.json");
  if (file_exists(index)) {
    const Json idx = parse_json_file(index);
    const Json* map = find(idx, "weight_map");
    if (!map || !map->is_object()) throw std::runtime_error(index + ": no weight_map object");
    std::set<std::string> shards;
    for (const auto& [name, file] : map->items())
      shards.insert(as_string(file, index + ": weight_map['" + name + "']"));
    for (const auto& s : shards) {
      if (s.find('/') != std::string::npos || s == "..")
        throw std::runtime_error(index + ": shard '" + s + "' is not a file name in the directory");
      if (!file_exists(join_path(dir, s)))
        throw std::runtime_error(index + ": lists shard '" + s + "', which is missing");
      files.push_back(join_path(dir, s));
    }
  } else if (file_exists(join_path(dir, "model.safetensors"))) {
    files.push_back(join_path(dir, "model.safetensors"));
  } else {
    for (const auto& f : safetensors_in(dir)) files.push_back(join_path(dir, f));
  }
  if (files.empty()) throw std::runtime_error(dir + ": no *.safetensors weights");
  return files;
}

void visit_checkpoint(const std::string& dir,
                      const std::function<void(const std::string& file, const std::string& name,
                                               const at::Tensor& view)>& fn) {
  std::set<std::string> seen;
  for (const auto& file : checkpoint_files(dir)) {
    visit_safetensors(file, [&](const std::string& name, const at::Tensor& view) {
      if (!seen.insert(name).second)
        throw std::runtime_error(file + ": tensor '" + name + "' also appears in another shard");
      fn(file, name, view);
    });
  }
}

TensorMap load_checkpoint_weights(const std::string& dir, std::optional<at::TensorOptions> options) {
  TensorMap all;
  visit_checkpoint(dir, [&](const std::string&, const std::string& name, const at::Tensor& view) {
    all[name] = copy_to(view, options.value_or(at::TensorOptions()));
  });
  return all;
}

}  // namespace mage::runtime
