// nlohmann's parser is iterative and validates UTF-8 in strings; its messages are reworded to
// "<source>: byte <offset>: <what>" (0-based offset of the offending byte).
#include "runtime/base/json.h"

#include <cmath>
#include <limits>
#include <stdexcept>

#include "runtime/base/io.h"

namespace mage::runtime {
namespace {

struct TooDeep {};  // thrown from the parser callback, turned into a runtime_error below

[[noreturn]] void type_error(const std::string& what, const char* want, const Json& got) {
  throw std::runtime_error(what + ": expected " + want + ", got " + type_name(got));
}

// "[json.exception.parse_error.101] parse error at line 1, column 9: syntax error ..." ->
// "syntax error ...": the position is reported as a byte offset instead.
std::string reason(const std::string& msg) {
  const std::string tag = "parse error";
  size_t p = msg.find(tag);
  if (p == std::string::npos) return msg;
  size_t colon = msg.find(": ", p);
  return colon == std::string::npos ? msg : msg.substr(colon + 2);
}

}  // namespace

Json parse_json(const char* data, size_t size, const std::string& source) {
  auto depth_cap = [](int depth, Json::parse_event_t, Json&) {
    if (depth > kMaxJsonDepth) throw TooDeep{};
    return true;
  };
  try {
    return Json::parse(data, data + size, depth_cap);
  } catch (const TooDeep&) {
    throw std::runtime_error(source + ": nesting deeper than " + std::to_string(kMaxJsonDepth) +
                             " levels");
  } catch (const Json::parse_error& e) {
    const size_t byte = e.byte > 0 ? e.byte - 1 : 0;
    throw std::runtime_error(source + ": byte " + std::to_string(byte) + ": " + reason(e.what()));
  } catch (const Json::exception& e) {  // e.g. a number too large for a double
    throw std::runtime_error(source + ": " + reason(e.what()));
  }
}

Json parse_json_file(const std::string& path) {
  const std::string text = read_file(path);
  return parse_json(text, path);
}

const Json* find(const Json& object, const std::string& key) {
  if (!object.is_object()) return nullptr;
  auto it = object.find(key);
  return it == object.end() ? nullptr : &*it;
}

const Json& member(const Json& object, const char* key, const std::string& where) {
  const Json* v = find(object, key);
  if (!v) throw std::runtime_error(where + ": missing '" + key + "'");
  return *v;
}

bool bool_or(const Json& object, const char* key, bool fallback, const std::string& where) {
  const Json* v = find(object, key);
  return v && !v->is_null() ? as_bool(*v, where + ": " + key) : fallback;
}

std::optional<std::string> string_if(const Json& object, const char* key, const std::string& where) {
  const Json* v = find(object, key);
  if (!v || v->is_null()) return std::nullopt;
  return as_string(*v, where + ": " + key);
}

double as_number(const Json& v, const std::string& what) {
  if (!v.is_number()) type_error(what, "a number", v);
  const double d = v.get<double>();
  if (!std::isfinite(d)) throw std::runtime_error(what + ": expected a finite number");
  return d;
}

int64_t as_int(const Json& v, const std::string& what) {
  if (v.is_number_unsigned()) {
    const uint64_t u = v.get<uint64_t>();
    if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
      throw std::runtime_error(what + ": integer " + std::to_string(u) + " is out of range");
    return static_cast<int64_t>(u);
  }
  if (v.is_number_integer()) return v.get<int64_t>();
  const double d = as_number(v, what);  // 2.0 counts as an integer (Python's json writes 2.0)
  if (std::floor(d) != d || std::fabs(d) > 9.0e15)
    throw std::runtime_error(what + ": expected an integer, got " + v.dump());
  return static_cast<int64_t>(d);
}

uint64_t as_uint(const Json& v, const std::string& what) {
  if (v.is_number_unsigned()) return v.get<uint64_t>();
  const int64_t i = as_int(v, what);
  if (i < 0) throw std::runtime_error(what + ": expected a non-negative integer, got " + v.dump());
  return static_cast<uint64_t>(i);
}

bool as_bool(const Json& v, const std::string& what) {
  if (!v.is_boolean()) type_error(what, "a boolean", v);
  return v.get<bool>();
}

const std::string& as_string(const Json& v, const std::string& what) {
  if (!v.is_string()) type_error(what, "a string", v);
  return v.get_ref<const std::string&>();
}

const Json& as_array(const Json& v, const std::string& what) {
  if (!v.is_array()) type_error(what, "an array", v);
  return v;
}

const Json& as_object(const Json& v, const std::string& what) {
  if (!v.is_object()) type_error(what, "an object", v);
  return v;
}

const char* type_name(const Json& v) {
  switch (v.type()) {
    case Json::value_t::null: return "null";
    case Json::value_t::boolean: return "a boolean";
    case Json::value_t::string: return "a string";
    case Json::value_t::array: return "an array";
    case Json::value_t::object: return "an object";
    case Json::value_t::binary: return "binary data";
    case Json::value_t::discarded: return "nothing";
    default: return "a number";
  }
}

}  // namespace mage::runtime
