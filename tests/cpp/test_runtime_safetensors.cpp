// safetensors: round trips (single file and sharded checkpoints), the header validation
// (overflow, gaps and overlaps, the header cap, truncation) with errors naming file and byte
// offset, and the loader's host memory (at most about one shard on top of the loaded tensors).
#include <gtest/gtest.h>

#include <malloc.h>

#include <cstring>
#include <fstream>

#include "runtime/base/safetensors_header.h"
#include "runtime/safetensors.h"
#include "runtime_test_util.h"

using namespace mage::runtime;  // NOLINT: the names under test
using mage_test::expect_error;
using mage_test::TempDir;

namespace {

// A file by hand: 8-byte little-endian header length, header, data.
std::string raw_file(const std::string& header, const std::string& data) {
  std::string out(8, '\0');
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xFF);
  return out + header + data;
}

SafetensorsHeader parse(const std::string& bytes, const std::string& path = "f.safetensors") {
  auto p = reinterpret_cast<const unsigned char*>(bytes.data());
  return parse_safetensors_header(p, bytes.size(), bytes.size(), path);
}

// "kB" fields of /proc/self/status (VmRSS, VmHWM); -1 when unreadable.
int64_t status_kb(const std::string& field) {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind(field + ":", 0) == 0) return std::stoll(line.substr(field.size() + 1));
  return -1;
}

}  // namespace

TEST(RuntimeSafetensors, RoundTripKeepsDtypeShapeAndBits) {
  TempDir dir;
  TensorMap in{{"a.bf16", at::randn({3, 5}).to(at::kBFloat16)},
               {"b.f16", at::randn({7}).to(at::kHalf)},
               {"c.f32", at::randn({2, 3, 4})},
               {"d.scalar", at::tensor(3.0f).reshape({})},
               {"e.empty", at::zeros({0, 4})},
               {"f.i64", at::arange(5, at::kLong)}};
  save_safetensors(dir.file("m.safetensors"), in);
  TensorMap out = load_safetensors(dir.file("m.safetensors"));
  ASSERT_EQ(out.size(), in.size());
  for (const auto& [name, t] : in) {
    ASSERT_TRUE(out.count(name)) << name;
    EXPECT_EQ(out[name].scalar_type(), t.scalar_type()) << name;
    EXPECT_EQ(out[name].sizes(), t.sizes()) << name;
    EXPECT_TRUE(at::equal(out[name], t)) << name;
  }
  // Converted while copying out of the map.
  TensorMap f32 = load_safetensors(dir.file("m.safetensors"), at::TensorOptions().dtype(at::kFloat));
  EXPECT_EQ(f32["a.bf16"].scalar_type(), at::kFloat);
  EXPECT_TRUE(at::equal(f32["a.bf16"], in["a.bf16"].to(at::kFloat)));
}

TEST(RuntimeSafetensors, ReadsAHandWrittenFileWithMetadataAndUnalignedData) {
  TempDir dir;
  float vals[2] = {1.5f, -2.0f};
  std::string data(reinterpret_cast<const char*>(vals), sizeof vals);
  // Header of odd length: the F32 data starts at an unaligned address in the map.
  const std::string header =
      R"({"__metadata__":{"format":"pt"},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}} )";
  ASSERT_NE(header.size() % 4, 0u);
  dir.write("x.safetensors", raw_file(header, data));
  TensorMap m = load_safetensors(dir.file("x.safetensors"));
  ASSERT_EQ(m.size(), 1u);
  EXPECT_FLOAT_EQ(m["w"][1].item<float>(), -2.0f);
}

TEST(RuntimeSafetensors, HeaderValidation) {
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

TEST(RuntimeSafetensors, LoaderErrorsNameTheFile) {
  TempDir dir;
  expect_error([&] { load_safetensors(dir.file("none.safetensors")); }, {"none.safetensors"});
  dir.write("short.safetensors", "abc");
  expect_error([&] { load_safetensors(dir.file("short.safetensors")); }, {"short.safetensors", "truncated"});
  dir.write("dtype.safetensors", raw_file(R"({"w":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[0,2]}})", "12"));
  expect_error([&] { load_safetensors(dir.file("dtype.safetensors")); }, {"F8_E4M3", "unsupported dtype"});
}

TEST(RuntimeSafetensors, ShardedCheckpointThroughTheIndex) {
  TempDir dir;
  at::Tensor a = at::randn({4}), b = at::randn({2, 2});
  save_safetensors(dir.file("s1.safetensors"), {{"a", a}});
  save_safetensors(dir.file("s2.safetensors"), {{"b", b}});
  dir.write("model.safetensors.index.json",
            R"({"metadata":{},"weight_map":{"a":"s1.safetensors","b":"s2.safetensors"}})");
  TensorMap m = load_checkpoint_weights(dir.path);
  ASSERT_EQ(m.size(), 2u);
  EXPECT_TRUE(at::equal(m["a"], a));
  EXPECT_TRUE(at::equal(m["b"], b));
  dir.write("model.safetensors.index.json", R"({"weight_map":{"a":"s1.safetensors","c":"s3.safetensors"}})");
  expect_error([&] { load_checkpoint_weights(dir.path); }, {"s3.safetensors", "missing"});
  dir.write("model.safetensors.index.json", R"({"weight_map":{"a":"../s1.safetensors"}})");
  expect_error([&] { load_checkpoint_weights(dir.path); }, {"../s1.safetensors", "not a file name"});
  expect_error([&] { load_checkpoint_weights(dir.file("nope")); }, {"nope", "does not exist"});
}

TEST(RuntimeSafetensors, SingleFileAndDuplicateNames) {
  TempDir dir;
  save_safetensors(dir.file("x-1.safetensors"), {{"a", at::ones({1})}});
  save_safetensors(dir.file("x-2.safetensors"), {{"a", at::zeros({1})}});
  expect_error([&] { load_checkpoint_weights(dir.path); }, {"'a'", "another shard"});
  save_safetensors(dir.file("model.safetensors"), {{"z", at::ones({2})}});
  EXPECT_EQ(load_checkpoint_weights(dir.path).count("z"), 1u);  // model.safetensors wins
  TempDir empty;
  expect_error([&] { load_checkpoint_weights(empty.path); }, {"no *.safetensors"});
}

// Target: host memory while loading <= the loaded tensors + the largest shard + 10%. Three bf16
// shards of 24 MB are loaded as float32 (48 MB each on the host): the peak resident size may grow
// by the 144 MB of tensors plus at most 1.1 x 24 MB.
TEST(RuntimeSafetensors, LoadingHoldsAtMostOneShardOnTopOfTheTensors) {
  TempDir dir;
  const int64_t per_tensor = 3 << 20, tensors_per_shard = 4, shards = 3;  // 6 MB bf16 tensors
  std::string index = R"({"weight_map":{)";
  for (int64_t s = 0; s < shards; ++s) {
    TensorMap shard;
    for (int64_t t = 0; t < tensors_per_shard; ++t) {
      const std::string name = "s" + std::to_string(s) + ".t" + std::to_string(t);
      shard[name] = at::full({per_tensor}, static_cast<double>(s * 10 + t), at::kBFloat16);
      index += (s || t ? "," : "") + ("\"" + name + "\":\"shard" + std::to_string(s) + ".safetensors\"");
    }
    save_safetensors(dir.file("shard" + std::to_string(s) + ".safetensors"), shard);
  }
  dir.write("model.safetensors.index.json", index + "}}");
  const int64_t shard_kb = per_tensor * 2 * tensors_per_shard / 1024;
  const int64_t loaded_kb = per_tensor * 4 * tensors_per_shard * shards / 1024;
  ::malloc_trim(0);  // the shards' tensors were freed: give their memory back first
  {
    std::ofstream reset("/proc/self/clear_refs");
    reset << "5";  // resets VmHWM to the current VmRSS
    if (!reset.good()) GTEST_SKIP() << "/proc/self/clear_refs is not writable here";
  }
  const int64_t base_kb = status_kb("VmRSS");
  if (base_kb < 0 || status_kb("VmHWM") > base_kb + 1024)
    GTEST_SKIP() << "VmHWM cannot be reset here";
  TensorMap m = load_checkpoint_weights(dir.path, at::TensorOptions().dtype(at::kFloat));
  const int64_t growth_kb = status_kb("VmHWM") - base_kb;
  ASSERT_EQ(m.size(), static_cast<size_t>(shards * tensors_per_shard));
  EXPECT_EQ(m["s2.t3"][7].item<float>(), 23.0f);
  std::printf("peak RSS growth %lld kB: tensors %lld kB + %lld kB (largest shard %lld kB)\n",
              static_cast<long long>(growth_kb), static_cast<long long>(loaded_kb),
              static_cast<long long>(growth_kb - loaded_kb), static_cast<long long>(shard_kb));
  EXPECT_LE(growth_kb, loaded_kb + shard_kb * 11 / 10);
}
