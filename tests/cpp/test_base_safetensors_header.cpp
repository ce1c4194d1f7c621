// safetensors header validation (torch-free): overflow, gaps and overlaps, the header cap,
// truncation, with errors naming the file and byte offset.
#include <gtest/gtest.h>

#include "runtime/base/safetensors_header.h"
#include "runtime_test_util.h"

using namespace mage::runtime;  // NOLINT: the names under test
using mage_test::expect_error;

namespace {

std::string raw_file(const std::string& header, const std::string& data) {
  return mage_test::raw_safetensors(header, data);
}

SafetensorsHeader parse(const std::string& bytes, const std::string& path = "f.safetensors") {
  auto p = reinterpret_cast<const unsigned char*>(bytes.data());
  return parse_safetensors_header(p, bytes.size(), bytes.size(), path);
}

}  // namespace

TEST(BaseSafetensorsHeader, Validation) {
  const std::string w8 = R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  EXPECT_EQ(parse(raw_file(w8, "12345678")).tensors.size(), 1u);
  EXPECT_EQ(parse(raw_file(w8, "12345678")).data_start, 8 + w8.size());
  // Truncation: the length prefix, the header, the data.
  expect_error([&] { parse("abc"); }, {"f.safetensors", "truncated", "needs 8"});
  expect_error([&] { parse(raw_file(w8, "").substr(0, 20)); }, {"f.safetensors", "truncated", "file byte 8"});
  expect_error([&] { parse(raw_file(w8, "1234")); }, {"'w'", "past the data region", "truncated"});
  // The header cap: refused before anything is read.
  std::string huge(8, '\0');
  const uint64_t big = kMaxSafetensorsHeader + 1;
  for (int i = 0; i < 8; ++i) huge[i] = static_cast<char>((big >> (8 * i)) & 0xFF);
  expect_error([&] { parse(huge + "{}"); }, {"header length 100000001", "cap"});
  // Sizes: numel * element size overflowing 64 bits, and numel alone.
  expect_error([&] {
    parse(raw_file(R"({"w":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,0]}})", ""));
  }, {"'w'", "overflows 64-bit"});
  expect_error([&] {
    parse(raw_file(R"({"w":{"dtype":"U8","shape":[4294967296,4294967297],"data_offsets":[0,0]}})", ""));
  }, {"'w'", "overflows 64-bit"});
  expect_error([&] {
    parse(raw_file(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", "12345678"));
  }, {"'w'", "needs 12 bytes"});
  expect_error([&] {
    parse(raw_file(R"({"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", "1234"));
  }, {"'w'", "negative dimension"});
  expect_error([&] {
    parse(raw_file(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[8,4]}})", "1234"));
  }, {"'w'", "end before they begin"});
  expect_error([&] {
    parse(raw_file(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,18446744073709551615]}})", "1234"));
  }, {"'w'", "needs 4 bytes"});
  // Tiling: a gap, an overlap, bytes after the last tensor.
  expect_error([&] {
    parse(raw_file(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                   R"("b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})", "123456789012"));
  }, {"'b'", "gap of 4", "data offset 4"});
  expect_error([&] {
    parse(raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                   R"("b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", "12345678"));
  }, {"'b'", "overlap tensor 'a'"});
  expect_error([&] {
    parse(raw_file(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", "12345678"));
  }, {"'a'", "gap of 4", "data offset 0"});
  expect_error([&] { parse(raw_file(w8, "123456789")); }, {"1 bytes after the last tensor", "file byte"});
  // Entries and JSON.
  expect_error([&] { parse(raw_file(R"({"w":{"dtype":"F32","shape":[2]}})", "")); }, {"'w'", "data_offsets"});
  expect_error([&] { parse(raw_file(R"({"w":{"dtype":"Q4","shape":[2],"data_offsets":[0,1]}})", "1")); },
               {"'w'", "unknown dtype 'Q4'"});
  expect_error([&] { parse(raw_file(R"({"w":)", "")); }, {"f.safetensors", "header", "byte"});
  expect_error([&] { parse(raw_file("[1]", "")); }, {"not a JSON object"});
}
