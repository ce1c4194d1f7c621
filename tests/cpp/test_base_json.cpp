// The runtime's JSON layer (nlohmann-json underneath): values, escapes, and errors that name the
// source and byte offset; typed accessors that name the field.
#include <gtest/gtest.h>

#include "runtime/base/json.h"
#include "runtime_test_util.h"

using namespace mage::runtime;  // NOLINT: the names under test
using mage_test::expect_error;

TEST(BaseJson, ParsesEveryValueType) {
  Json v = parse_json(R"( {"a": 1, "b": [true, false, null, -2.5e2, 0], "c": {"d": "x"}} )", "t");
  ASSERT_TRUE(v.is_object());
  EXPECT_EQ(as_int(*find(v, "a"), "a"), 1);
  const Json& b = *find(v, "b");
  ASSERT_EQ(b.size(), 5u);
  EXPECT_TRUE(as_bool(b[0], "b0"));
  EXPECT_FALSE(as_bool(b[1], "b1"));
  EXPECT_TRUE(b[2].is_null());
  EXPECT_DOUBLE_EQ(as_number(b[3], "b3"), -250.0);
  EXPECT_EQ(as_string(*find(*find(v, "c"), "d"), "d"), "x");
  EXPECT_EQ(find(v, "missing"), nullptr);
  EXPECT_EQ(find(b, "a"), nullptr);  // not an object
  EXPECT_TRUE(parse_json("[]", "t").empty());
  EXPECT_TRUE(parse_json("{}", "t").empty());
}

TEST(BaseJson, DecodesStringEscapes) {
  Json v = parse_json(R"("q\"b\\s\/n\nt\tu\u00e9\ud83d\ude00")", "t");
  EXPECT_EQ(as_string(v, "s"), "q\"b\\s/n\nt\tu\xC3\xA9\xF0\x9F\x98\x80");
}

TEST(BaseJson, LastDuplicateKeyWins) {
  EXPECT_EQ(as_int(*find(parse_json(R"({"a": 1, "a": 2})", "t"), "a"), "a"), 2);
}

TEST(BaseJson, IntegersKeepAll64Bits) {
  Json v = parse_json("[18446744073709551615, 9007199254740993, -9223372036854775808, 2.0]", "t");
  EXPECT_EQ(as_uint(v[0], "u"), 18446744073709551615ull);
  EXPECT_EQ(as_int(v[1], "i"), 9007199254740993ll);  // above 2^53: a double would round it
  EXPECT_EQ(as_int(v[2], "i"), INT64_MIN);
  EXPECT_EQ(as_int(v[3], "i"), 2);
  expect_error([&] { as_int(v[0], "field u"); }, {"field u", "out of range"});
  expect_error([&] { as_uint(v[2], "field n"); }, {"field n", "non-negative"});
}

TEST(BaseJson, ErrorsNameSourceAndOffset) {
  expect_error([] { parse_json(R"({"a": 1,})", "cfg.json"); }, {"cfg.json", "byte 8"});
  expect_error([] { parse_json("[1, 2", "x.json"); }, {"x.json", "byte 5"});
  expect_error([] { parse_json("tru", "x"); }, {"x: byte"});
  expect_error([] { parse_json("01", "x"); }, {"byte 1"});
  expect_error([] { parse_json("1.", "x"); }, {"x: byte"});
  expect_error([] { parse_json("+1", "x"); }, {"byte 0"});
  expect_error([] { parse_json(R"("\x")", "x"); }, {"x: byte"});
  expect_error([] { parse_json(R"("\ud83d")", "x"); }, {"surrogate"});
  expect_error([] { parse_json("\"a\nb\"", "x"); }, {"control character"});
  expect_error([] { parse_json("\"\xff\"", "x"); }, {"UTF-8"});
  expect_error([] { parse_json("", "x"); }, {"byte 0"});
  expect_error([] { parse_json(std::string(600, '['), "x"); }, {"nesting deeper than 512"});
  EXPECT_NO_THROW(parse_json(std::string(500, '[') + std::string(500, ']'), "x"));
}

TEST(BaseJson, TypedAccessorsReportMismatch) {
  Json v = parse_json(R"({"n": 1.5, "s": "x"})", "t");
  expect_error([&] { as_int(*find(v, "n"), "n"); }, {"n", "integer"});
  expect_error([&] { as_number(*find(v, "s"), "field s"); }, {"field s", "a number", "a string"});
  expect_error([&] { as_array(*find(v, "s"), "field s"); }, {"field s", "an array"});
  expect_error([&] { as_object(*find(v, "n"), "field n"); }, {"field n", "an object", "a number"});
  expect_error([] { as_number(parse_json("1e400", "x"), "v"); }, {});  // no infinities
}

TEST(BaseJson, MissingFileNamesThePath) {
  expect_error([] { parse_json_file("/nonexistent/x.json"); }, {"/nonexistent/x.json"});
}
