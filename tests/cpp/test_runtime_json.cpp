// The runtime's JSON reader: values, escapes, and errors that name the source and byte offset.
#include <gtest/gtest.h>

#include "runtime/json.h"
#include "runtime_test_util.h"

using mage::runtime::Json;
using mage::runtime::parse_json;
using mage_test::expect_error;

TEST(RuntimeJson, ParsesEveryValueType) {
  Json v = parse_json(R"( {"a": 1, "b": [true, false, null, -2.5e2, 0], "c": {"d": "x"}} )", "t");
  ASSERT_TRUE(v.is_object());
  EXPECT_EQ(v.find("a")->as_int("a"), 1);
  const Json& b = *v.find("b");
  ASSERT_EQ(b.items.size(), 5u);
  EXPECT_TRUE(b.items[0].as_bool("b0"));
  EXPECT_FALSE(b.items[1].as_bool("b1"));
  EXPECT_TRUE(b.items[2].is_null());
  EXPECT_DOUBLE_EQ(b.items[3].as_number("b3"), -250.0);
  EXPECT_EQ(v.find("c")->find("d")->as_string("d"), "x");
  EXPECT_EQ(v.find("missing"), nullptr);
  EXPECT_TRUE(parse_json("[]", "t").items.empty());
  EXPECT_TRUE(parse_json("{}", "t").keys.empty());
}

TEST(RuntimeJson, DecodesStringEscapes) {
  Json v = parse_json(R"("q\"b\\s\/n\nt\tu\u00e9\ud83d\ude00")", "t");
  EXPECT_EQ(v.as_string("s"), "q\"b\\s/n\nt\tu\xC3\xA9\xF0\x9F\x98\x80");
}

TEST(RuntimeJson, LastDuplicateKeyWins) {
  EXPECT_EQ(parse_json(R"({"a": 1, "a": 2})", "t").find("a")->as_int("a"), 2);
}

TEST(RuntimeJson, ErrorsNameSourceAndOffset) {
  expect_error([] { parse_json(R"({"a": 1,})", "cfg.json"); }, {"cfg.json", "byte 8"});
  expect_error([] { parse_json("[1, 2", "x.json"); }, {"x.json", "unexpected end of input"});
  expect_error([] { parse_json("tru", "x"); }, {"invalid literal"});
  expect_error([] { parse_json("01", "x"); }, {"trailing"});
  expect_error([] { parse_json("1.", "x"); }, {"decimal point"});
  expect_error([] { parse_json("+1", "x"); }, {"byte 0", "unexpected character"});
  expect_error([] { parse_json(R"("\x")", "x"); }, {"invalid escape"});
  expect_error([] { parse_json(R"("\ud83d")", "x"); }, {"surrogate"});
  expect_error([] { parse_json("\"a\nb\"", "x"); }, {"control character"});
  expect_error([] { parse_json("", "x"); }, {"byte 0"});
  expect_error([] { parse_json(std::string(600, '['), "x"); }, {"nesting"});
}

TEST(RuntimeJson, TypedAccessorsReportMismatch) {
  Json v = parse_json(R"({"n": 1.5, "s": "x"})", "t");
  expect_error([&] { v.find("n")->as_int("n"); }, {"n", "integer"});
  expect_error([&] { v.find("s")->as_number("field s"); }, {"field s", "a number", "a string"});
}

TEST(RuntimeJson, MissingFileNamesThePath) {
  expect_error([] { mage::runtime::parse_json_file("/nonexistent/x.json"); },
               {"/nonexistent/x.json"});
}
