// A minimal JSON reader for config.json, the safetensors header and the shard index: torch ships
// no JSON library and these files need nothing beyond RFC 8259 values.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace mage::runtime {

struct Json {
  enum class Type { Null, Bool, Number, String, Array, Object };
  Type type = Type::Null;
  bool boolean = false;
  double number = 0.0;
  std::string string;
  std::vector<Json> items;         // array elements, or object values (parallel to keys)
  std::vector<std::string> keys;   // object keys in file order

  bool is_null() const { return type == Type::Null; }
  bool is_number() const { return type == Type::Number; }
  bool is_string() const { return type == Type::String; }
  bool is_array() const { return type == Type::Array; }
  bool is_object() const { return type == Type::Object; }

  // Object member or nullptr (the last one wins when a key repeats, as in Python's json).
  const Json* find(const std::string& key) const;
  // Typed accessors: throw std::runtime_error naming `what` on a type mismatch.
  double as_number(const std::string& what) const;
  int64_t as_int(const std::string& what) const;  // must be integral
  bool as_bool(const std::string& what) const;
  const std::string& as_string(const std::string& what) const;
};

// Parses `text`; errors are std::runtime_error "<source>: byte <offset>: <what>".
Json parse_json(const std::string& text, const std::string& source);
// Reads and parses a file; a missing or unreadable file is an error naming the path.
Json parse_json_file(const std::string& path);

}  // namespace mage::runtime
