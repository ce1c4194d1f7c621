// JSON through nlohmann-json (Debian nlohmann-json3-dev): config.json, the safetensors header,
// the shard index and tokenizer.json. This header adds what the runtime needs on top: parse errors
// that name the source and byte offset, a nesting cap, and typed accessors whose errors name the
// field. Torch-free (the fuzz targets build it without LibTorch).
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <optional>
#include <string>

namespace mage::runtime {

using Json = nlohmann::json;

constexpr int kMaxJsonDepth = 512;  // deeper documents are rejected (no config needs more)

// Parses `size` bytes; errors are std::runtime_error "<source>: byte <offset>: <what>".
// A key that repeats keeps its last value (as Python's json).
Json parse_json(const char* data, size_t size, const std::string& source);
inline Json parse_json(const std::string& text, const std::string& source) {
  return parse_json(text.data(), text.size(), source);
}
// Reads and parses a file; a missing or unreadable file is an error naming the path.
Json parse_json_file(const std::string& path);

// Object member or nullptr (also for a non-object).
const Json* find(const Json& object, const std::string& key);
// A required member: std::runtime_error "<where>: missing '<key>'" when absent.
const Json& member(const Json& object, const char* key, const std::string& where);
// Optional members (absent or null: the fallback / nullopt), type-checked.
bool bool_or(const Json& object, const char* key, bool fallback, const std::string& where);
std::optional<std::string> string_if(const Json& object, const char* key, const std::string& where);
// Typed accessors: std::runtime_error "<what>: expected <type>, got <type>" on a mismatch.
double as_number(const Json& v, const std::string& what);         // finite
int64_t as_int(const Json& v, const std::string& what);           // integral, fits int64
uint64_t as_uint(const Json& v, const std::string& what);         // integral, >= 0, fits uint64
bool as_bool(const Json& v, const std::string& what);
const std::string& as_string(const Json& v, const std::string& what);
const Json& as_array(const Json& v, const std::string& what);
const Json& as_object(const Json& v, const std::string& what);
// "a number", "a string", ... for messages.
const char* type_name(const Json& v);

}  // namespace mage::runtime
