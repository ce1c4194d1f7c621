// safetensors round trips (single file and sharded checkpoints) and the loader's errors.
#include <gtest/gtest.h>

#include <cstring>

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

}  // namespace

TEST(RuntimeSafetensors, RoundTripKeepsDtypeShapeAndBits) {
  TempDir dir;
  TensorMap in{{"a.bf16", at::randn({3, 5}).to(at::kBFloat16)},
               {"b.f16", at::randn({7}).to(at::kHalf)},
               {"c.f32", at::randn({2, 3, 4})},
               {"d.scalar", at::tensor(3.0f).reshape({})}};
  save_safetensors(dir.file("m.safetensors"), in);
  TensorMap out = load_safetensors(dir.file("m.safetensors"));
  ASSERT_EQ(out.size(), in.size());
  for (const auto& [name, t] : in) {
    ASSERT_TRUE(out.count(name)) << name;
    EXPECT_EQ(out[name].scalar_type(), t.scalar_type()) << name;
    EXPECT_EQ(out[name].sizes(), t.sizes()) << name;
    EXPECT_TRUE(at::equal(out[name], t)) << name;
  }
}

TEST(RuntimeSafetensors, ReadsAHandWrittenFileWithMetadata) {
  TempDir dir;
  float vals[2] = {1.5f, -2.0f};
  std::string data(reinterpret_cast<const char*>(vals), sizeof vals);
  dir.write("x.safetensors",
            raw_file(R"({"__metadata__":{"format":"pt"},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
                     data));
  TensorMap m = load_safetensors(dir.file("x.safetensors"));
  ASSERT_EQ(m.size(), 1u);
  EXPECT_FLOAT_EQ(m["w"][1].item<float>(), -2.0f);
}

TEST(RuntimeSafetensors, Errors) {
  TempDir dir;
  expect_error([&] { load_safetensors(dir.file("none.safetensors")); }, {"none.safetensors"});
  dir.write("short.safetensors", "abc");
  expect_error([&] { load_safetensors(dir.file("short.safetensors")); }, {"short.safetensors", "truncated"});
  dir.write("hdr.safetensors", raw_file(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", "").substr(0, 20));
  expect_error([&] { load_safetensors(dir.file("hdr.safetensors")); }, {"hdr.safetensors", "truncated"});
  dir.write("data.safetensors", raw_file(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", "1234"));
  expect_error([&] { load_safetensors(dir.file("data.safetensors")); }, {"'w'", "truncated"});
  dir.write("dtype.safetensors", raw_file(R"({"w":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[0,2]}})", "12"));
  expect_error([&] { load_safetensors(dir.file("dtype.safetensors")); }, {"F8_E4M3", "unsupported dtype"});
  dir.write("size.safetensors", raw_file(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", "12345678"));
  expect_error([&] { load_safetensors(dir.file("size.safetensors")); }, {"'w'", "needs 12 bytes"});
  dir.write("json.safetensors", raw_file(R"({"w":)", ""));
  expect_error([&] { load_safetensors(dir.file("json.safetensors")); }, {"json.safetensors", "byte"});
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
