// The format is specified at https://github.com/huggingface/safetensors (Apache-2.0). Tensors are
// copied out of the file buffer (little-endian hosts only, like the format itself assumes).
#include "runtime/safetensors.h"

#include <dirent.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <set>
#include <stdexcept>
#include <vector>

#include "runtime/io.h"
#include "runtime/json.h"

namespace mage::runtime {
namespace {

struct DtypeName {
  const char* name;
  at::ScalarType type;
};
constexpr DtypeName kDtypes[] = {{"BF16", at::kBFloat16}, {"F16", at::kHalf},
                                 {"F32", at::kFloat},     {"I32", at::kInt},
                                 {"I64", at::kLong},      {"BOOL", at::kBool}};

at::ScalarType dtype_from_name(const std::string& name, const std::string& where) {
  for (const auto& d : kDtypes)
    if (name == d.name) return d.type;
  throw std::runtime_error(where + ": unsupported dtype '" + name +
                           "' (supported: BF16, F16, F32, I32, I64, BOOL)");
}

const char* dtype_to_name(at::ScalarType t) {
  for (const auto& d : kDtypes)
    if (t == d.type) return d.name;
  throw std::runtime_error(std::string("save_safetensors: unsupported dtype ") + c10::toString(t));
}

std::string json_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    if (static_cast<unsigned char>(c) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      out += buf;
    } else {
      out += c;
    }
  }
  return out;
}

at::Tensor read_entry(const std::string& name, const Json& info, const std::string& file,
                      const char* data, uint64_t data_size) {
  const std::string where = file + ": tensor '" + name + "'";
  if (!info.is_object()) throw std::runtime_error(where + ": header entry is not an object");
  const Json* dtype = info.find("dtype");
  const Json* shape = info.find("shape");
  const Json* offsets = info.find("data_offsets");
  if (!dtype || !shape || !offsets)
    throw std::runtime_error(where + ": header entry needs dtype, shape and data_offsets");
  at::ScalarType type = dtype_from_name(dtype->as_string(where + " dtype"), where);
  if (!shape->is_array()) throw std::runtime_error(where + ": shape is not an array");
  std::vector<int64_t> sizes;
  int64_t numel = 1;
  for (const Json& s : shape->items) {
    int64_t n = s.as_int(where + " shape");
    if (n < 0) throw std::runtime_error(where + ": negative dimension in shape");
    sizes.push_back(n);
    numel *= n;
  }
  if (!offsets->is_array() || offsets->items.size() != 2)
    throw std::runtime_error(where + ": data_offsets must be [begin, end]");
  int64_t begin = offsets->items[0].as_int(where + " data_offsets");
  int64_t end = offsets->items[1].as_int(where + " data_offsets");
  if (begin < 0 || end < begin)
    throw std::runtime_error(where + ": invalid data_offsets [" + std::to_string(begin) + ", " +
                             std::to_string(end) + "]");
  if (static_cast<uint64_t>(end) > data_size)
    throw std::runtime_error(where + ": data_offsets end " + std::to_string(end) +
                             " lies past the data (" + std::to_string(data_size) +
                             " bytes): file truncated?");
  const int64_t nbytes = numel * static_cast<int64_t>(c10::elementSize(type));
  if (end - begin != nbytes)
    throw std::runtime_error(where + ": shape " + c10::str(at::IntArrayRef(sizes)) + " of " +
                             dtype->string + " needs " + std::to_string(nbytes) +
                             " bytes, data_offsets give " + std::to_string(end - begin));
  at::Tensor t = at::empty(sizes, at::TensorOptions().dtype(type));
  if (nbytes) std::memcpy(t.data_ptr(), data + begin, nbytes);
  return t;
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

TensorMap load_safetensors(const std::string& path) {
  const std::string bytes = read_file(path);
  if (bytes.size() < 8)
    throw std::runtime_error(path + ": truncated safetensors file (" + std::to_string(bytes.size()) +
                             " bytes, the header length alone needs 8)");
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | static_cast<unsigned char>(bytes[i]);
  if (header_len > bytes.size() - 8)
    throw std::runtime_error(path + ": truncated safetensors file (header of " +
                             std::to_string(header_len) + " bytes, file has " +
                             std::to_string(bytes.size()) + ")");
  Json header = parse_json(bytes.substr(8, header_len), path + " (header)");
  if (!header.is_object()) throw std::runtime_error(path + ": header is not a JSON object");
  const char* data = bytes.data() + 8 + header_len;
  const uint64_t data_size = bytes.size() - 8 - header_len;
  TensorMap out;
  for (size_t i = 0; i < header.keys.size(); ++i) {
    if (header.keys[i] == "__metadata__") continue;
    out[header.keys[i]] = read_entry(header.keys[i], header.items[i], path, data, data_size);
  }
  return out;
}

void save_safetensors(const std::string& path, const TensorMap& tensors) {
  std::string header = "{";
  std::vector<at::Tensor> parts;
  int64_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    at::Tensor t = tensor.contiguous().cpu();
    const int64_t n = t.numel() * static_cast<int64_t>(t.element_size());
    if (header.size() > 1) header += ",";
    header += "\"" + json_escape(name) + "\":{\"dtype\":\"" + dtype_to_name(t.scalar_type()) +
              "\",\"shape\":[";
    for (int64_t i = 0; i < t.dim(); ++i) header += (i ? "," : "") + std::to_string(t.size(i));
    header += "],\"data_offsets\":[" + std::to_string(offset) + "," + std::to_string(offset + n) + "]}";
    offset += n;
    parts.push_back(t);
  }
  header += "}";
  std::ofstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error(path + ": cannot open for writing");
  uint64_t len = header.size();
  char len_bytes[8];
  for (int i = 0; i < 8; ++i) len_bytes[i] = static_cast<char>((len >> (8 * i)) & 0xFF);
  f.write(len_bytes, 8);
  f.write(header.data(), static_cast<std::streamsize>(header.size()));
  for (const at::Tensor& t : parts)
    f.write(static_cast<const char*>(t.data_ptr()), t.numel() * t.element_size());
  if (!f) throw std::runtime_error(path + ": write error");
}

TensorMap load_checkpoint_weights(const std::string& dir) {
  if (!dir_exists(dir)) throw std::runtime_error(dir + ": checkpoint directory does not exist");
  std::vector<std::string> files;
  const std::string index = join_path(dir, "model.safetensors.index.json");
  if (file_exists(index)) {
    Json idx = parse_json_file(index);
    const Json* map = idx.find("weight_map");
    if (!map || !map->is_object()) throw std::runtime_error(index + ": no weight_map object");
    std::set<std::string> shards;
    for (size_t i = 0; i < map->items.size(); ++i)
      shards.insert(map->items[i].as_string(index + ": weight_map['" + map->keys[i] + "']"));
    for (const auto& s : shards) {
      if (!file_exists(join_path(dir, s)))
        throw std::runtime_error(index + ": lists shard '" + s + "', which is missing");
      files.push_back(s);
    }
  } else if (file_exists(join_path(dir, "model.safetensors"))) {
    files.push_back("model.safetensors");
  } else {
    files = safetensors_in(dir);
  }
  if (files.empty()) throw std::runtime_error(dir + ": no *.safetensors weights");
  TensorMap all;
  for (const auto& f : files) {
    for (auto& [name, t] : load_safetensors(join_path(dir, f))) {
      if (all.count(name))
        throw std::runtime_error(join_path(dir, f) + ": tensor '" + name +
                                 "' also appears in another shard");
      all[name] = t;
    }
  }
  return all;
}

}  // namespace mage::runtime
