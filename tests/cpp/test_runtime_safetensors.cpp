// safetensors loading: round trips (single file and sharded checkpoints), errors naming the
// file, and the loader's host memory (at most about one shard on top of the loaded tensors).
// The header validation itself is tests/cpp/test_base_safetensors_header.cpp.
#include <gtest/gtest.h>

#include <malloc.h>

#include <cstring>
#include <fstream>

#include "runtime/safetensors.h"
#include "runtime_test_util.h"

using mage_test::raw_safetensors;

using namespace mage::runtime;  // NOLINT: the names under test
using mage_test::expect_error;
using mage_test::TempDir;

namespace {


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
  dir.write("x.safetensors", raw_safetensors(header, data));
  TensorMap m = load_safetensors(dir.file("x.safetensors"));
  ASSERT_EQ(m.size(), 1u);
  EXPECT_FLOAT_EQ(m["w"][1].item<float>(), -2.0f);
}

TEST(RuntimeSafetensors, LoaderErrorsNameTheFile) {
  TempDir dir;
  expect_error([&] { load_safetensors(dir.file("none.safetensors")); }, {"none.safetensors"});
  dir.write("short.safetensors", "abc");
  expect_error([&] { load_safetensors(dir.file("short.safetensors")); }, {"short.safetensors", "truncated"});
  dir.write("dtype.safetensors", raw_safetensors(R"({"w":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[0,2]}})", "12"));
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
