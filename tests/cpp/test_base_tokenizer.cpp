// The tokenizer's building blocks and edge cases: UTF-8 repair and streaming boundaries, the
// byte-level alphabet, the regex iteration, BPE merge order, added tokens, and the errors a bad
// tokenizer.json or text gets. (Token-for-token parity with the Python library on a corpus is
// tests/python/test_cpp_tokenizer.py.)
#include <gtest/gtest.h>

#include "runtime/base/regex.h"
#include "runtime/base/tokenizer.h"
#include "runtime/base/unicode.h"
#include "runtime_test_util.h"

using namespace mage::runtime;  // NOLINT: the names under test
using mage_test::expect_error;
namespace u = mage::runtime::unicode;

namespace {

const std::string kFffd = "\xEF\xBF\xBD";

// A byte-level BPE over "a", "b", "c", " " (Ġ) with merges in rank order.
Json bpe_doc(Json merges, Json added = Json::array()) {
  Json vocab = {{"a", 0}, {"b", 1}, {"c", 2}, {"\xC4\xA0", 3}, {"ab", 4}, {"bc", 5}, {"abc", 6},
                {"\xC4\xA0" "a", 7}};
  return Json{{"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", merges}}},
              {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}}},
              {"decoder", {{"type", "ByteLevel"}}},
              {"added_tokens", added}};
}

}  // namespace

TEST(BaseUnicode, LossyRepairReplacesMaximalSubparts) {
  EXPECT_EQ(u::utf8_lossy("ok \xC3\xA9"), "ok \xC3\xA9");
  EXPECT_EQ(u::utf8_lossy("\xF0\x9F\x98"), kFffd);            // a cut emoji: one replacement
  EXPECT_EQ(u::utf8_lossy("a\xC3"), "a" + kFffd);
  EXPECT_EQ(u::utf8_lossy("\xE0\x80"), kFffd + kFffd);        // 80 cannot follow E0
  EXPECT_EQ(u::utf8_lossy("\xED\xA0\x80"), kFffd + kFffd + kFffd);  // a surrogate
  EXPECT_EQ(u::utf8_lossy("\xC0\xAF"), kFffd + kFffd);        // overlong
  EXPECT_EQ(u::utf8_lossy("\xFF" "a"), kFffd + "a");
}

TEST(BaseUnicode, ValidationAndStreamingBoundaries) {
  EXPECT_EQ(u::invalid_utf8_offset("abc \xE6\x95\xB0"), u::kValid);
  EXPECT_EQ(u::invalid_utf8_offset("ab\xFF"), 2u);
  EXPECT_EQ(u::invalid_utf8_offset("ab\xE6\x95"), 2u);  // cut at the end
  EXPECT_EQ(u::incomplete_utf8_tail("ab\xF0\x9F"), 2u);
  EXPECT_EQ(u::incomplete_utf8_tail("ab\xF0\x9F\x98\x80"), 0u);
  EXPECT_EQ(u::incomplete_utf8_tail("a\xC3"), 1u);
  EXPECT_EQ(u::incomplete_utf8_tail("\xE0\x80"), 0u);  // already broken: nothing to wait for
  EXPECT_EQ(u::incomplete_utf8_tail(""), 0u);
}

TEST(BaseUnicode, ByteLevelAlphabetIsABijection) {
  for (int b = 0; b < 256; ++b) EXPECT_EQ(u::char_to_byte(u::byte_to_char(static_cast<unsigned char>(b))), b);
  EXPECT_EQ(u::byte_to_char(' '), U'\u0120');  // Ġ
  EXPECT_EQ(u::byte_to_char('a'), U'a');
  EXPECT_EQ(u::char_to_byte(U'\u0144'), -1);
  EXPECT_EQ(u::normalize("e\xCC\x81", u::NormalForm::NFC), "\xC3\xA9");
  EXPECT_TRUE(u::is_white_space(0x85));
  EXPECT_FALSE(u::is_white_space(0x180E));
}

TEST(BaseRegex, IteratesLikeOniguruma) {
  using V = std::vector<std::pair<size_t, size_t>>;
  EXPECT_EQ(Regex("a*", "t").find_all("ba"), (V{{0, 0}, {1, 2}}));  // no empty match after "a"
  EXPECT_EQ(Regex(R"(\s+)", "t").find_all("a\xC2\x85" "b"), (V{{1, 3}}));  // NEL is \s
  EXPECT_EQ(Regex(R"(\s+)", "t").find_all("a\xE1\xA0\x8E" "b"), V{});      // U+180E is not
  EXPECT_EQ(Regex(Regex::escape("a.b"), "t").find_all("axb a.b"), (V{{4, 7}}));
  expect_error([] { Regex("(", "pre_tokenizer"); }, {"pre_tokenizer", "invalid regex"});
  const Regex slow("(a+)+[bc]", "t");  // catastrophic backtracking: an error, not a hang
  expect_error([&] { slow.find_all(std::string(40, 'a')); }, {"regex matching failed"});
}

TEST(BaseTokenizer, BpeAppliesMergesByRankLeftmostFirst) {
  // "abc": ab (rank 0) then ab+c? no such merge; bc has rank 1 but b is taken.
  Tokenizer t = Tokenizer::from_json(bpe_doc({"a b", "b c", "ab c"}), "t");
  EXPECT_EQ(t.encode("abc"), (std::vector<int64_t>{6}));
  Tokenizer r = Tokenizer::from_json(bpe_doc({"b c", "a b"}), "t");  // bc first: a + bc
  EXPECT_EQ(r.encode("abc"), (std::vector<int64_t>{0, 5}));
  Tokenizer pairs = Tokenizer::from_json(bpe_doc(Json::array({Json::array({"a", "b"})})), "t");
  EXPECT_EQ(pairs.encode("abab"), (std::vector<int64_t>{4, 4}));
  EXPECT_EQ(t.encode("a a"), (std::vector<int64_t>{0, 3, 0}));  // "Ġa" has no merge here
  EXPECT_EQ(t.decode({0, 3, 6}), "a abc");
  EXPECT_EQ(t.encode(""), std::vector<int64_t>{});
}

TEST(BaseTokenizer, AddedTokensLeftmostLongestAndSpecialSkipping) {
  Json added = Json::array({{{"id", 10}, {"content", "<s>"}, {"special", true}, {"normalized", false}},
                            {{"id", 11}, {"content", "<s>x"}, {"special", false}, {"normalized", false}},
                            {{"id", 12}, {"content", "c"}, {"special", true}, {"normalized", false},
                             {"single_word", true}}});
  Tokenizer t = Tokenizer::from_json(bpe_doc({"a b"}, added), "t");
  EXPECT_EQ(t.encode("ab<s>xa<s>"), (std::vector<int64_t>{4, 11, 0, 10}));  // longest wins
  EXPECT_EQ(t.encode("ac c"), (std::vector<int64_t>{0, 2, 3, 12}));       // single_word
  EXPECT_EQ(t.decode({4, 10, 11, 0}), "ab<s>xa");
  EXPECT_EQ(t.decode({4, 10, 11, 0}, /*skip_special=*/false), "ab<s><s>xa");
  EXPECT_EQ(t.token_to_id("<s>x"), 11);
  EXPECT_EQ(t.token_to_id("ab"), 4);
  EXPECT_FALSE(t.token_to_id("zz"));
}

TEST(BaseTokenizer, StreamingHoldsBackCutCharacters) {
  Json vocab = {{"\xC3\x83", 0}, {"\xC2\xA9", 1}, {"a", 2}};  // byte-level chars of C3, A9
  Json doc = {{"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", Json::array()}}},
              {"decoder", {{"type", "ByteLevel"}}}};
  Tokenizer t = Tokenizer::from_json(doc, "t");
  TextStream s(t);
  EXPECT_EQ(s.push({2, 0}), "a");  // C3 alone: held back
  EXPECT_EQ(s.push({1}), "\xC3\xA9");
  EXPECT_EQ(s.push({0}), "");
  EXPECT_EQ(s.finish(), kFffd);  // never completed
  EXPECT_EQ(t.decode({2, 0, 1, 0}), "a\xC3\xA9" + kFffd);
}

TEST(BaseTokenizer, ErrorsNameTheProblem) {
  expect_error([] { Tokenizer::from_json(bpe_doc({"a x"}), "tok.json"); },
               {"tok.json", "merges[0]", "'x' is not in the vocab"});
  expect_error([] { Tokenizer::from_json(bpe_doc({"abc"}), "tok.json"); }, {"merges[0]", "left right"});
  Json doc = bpe_doc(Json::array());
  doc["model"]["type"] = "Unigram";
  expect_error([&] { Tokenizer::from_json(doc, "tok.json"); }, {"tok.json", "Unigram"});
  doc = bpe_doc(Json::array());
  doc["normalizer"] = {{"type", "Lowercase"}};
  expect_error([&] { Tokenizer::from_json(doc, "tok.json"); }, {"normalizer", "Lowercase"});
  doc = bpe_doc(Json::array());
  doc["truncation"] = {{"max_length", 8}};
  expect_error([&] { Tokenizer::from_json(doc, "tok.json"); }, {"truncation"});
  Tokenizer t = Tokenizer::from_json(bpe_doc(Json::array()), "t");
  expect_error([&] { t.encode("ab\xFF"); }, {"not valid UTF-8", "byte 2"});
  expect_error([] { Tokenizer::from_file("/nonexistent/tokenizer.json"); }, {"/nonexistent/tokenizer.json"});
}

TEST(BaseTokenizer, WordLevelUsesUnk) {
  Json doc = {{"model", {{"type", "WordLevel"}, {"vocab", {{"hi", 0}, {"<unk>", 1}}}, {"unk_token", "<unk>"}}},
              {"pre_tokenizer", {{"type", "Whitespace"}}},
              {"decoder", {{"type", "WordPiece"}, {"prefix", "##"}, {"cleanup", false}}}};
  Tokenizer t = Tokenizer::from_json(doc, "t");
  EXPECT_EQ(t.encode("hi  there, hi"), (std::vector<int64_t>{0, 1, 1, 0}));
  EXPECT_EQ(t.decode({0, 1, 0}, false), "hi <unk> hi");
}
