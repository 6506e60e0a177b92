// The pieces under common/tokenizer/internal/ on their own: UTF-8 handling, the Oniguruma to
// PCRE2 rewrite, regex iteration, split behaviors and the word cache.
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/tokenizer/internal/oniguruma_syntax.h"
#include "common/tokenizer/internal/regex.h"
#include "common/tokenizer/internal/split.h"
#include "common/tokenizer/internal/utf8.h"
#include "common/tokenizer/internal/word_cache.h"
#include "gtest/gtest.h"

namespace cohort::tokenizer_internal {
namespace {

constexpr const char* kFffd = "\xEF\xBF\xBD";

std::string Lossy(std::string_view bytes) {
  std::string out;
  AppendUtf8Lossy(bytes, /*final=*/true, out);
  return out;
}

TEST(Utf8Test, LossyReplacesEachMaximalIllFormedSubpart) {
  // Unicode 15 section 3.9, table 3-8's example: 61 F1 80 80 E1 80 C2 62 80 63 80 BF 64.
  EXPECT_EQ(Lossy("\x61\xF1\x80\x80\xE1\x80\xC2\x62\x80\x63\x80\xBF\x64"),
            absl::StrCat("a", kFffd, kFffd, kFffd, "b", kFffd, "c", kFffd, kFffd, "d"));
  EXPECT_EQ(Lossy("\xED\xA0\x80"), absl::StrCat(kFffd, kFffd, kFffd));  // surrogate: byte by byte
  EXPECT_EQ(Lossy("\xF0\x9F\x98"), kFffd);                              // truncated at the end: one
  EXPECT_EQ(Lossy("\xC0\xAF"), absl::StrCat(kFffd, kFffd));
  EXPECT_EQ(Lossy("ok \xE2\x82\xAC"), "ok \xE2\x82\xAC");
}

TEST(Utf8Test, NonFinalLossyKeepsAnIncompleteTail) {
  std::string out;
  EXPECT_EQ(AppendUtf8Lossy("ab\xF0\x9F\x98", /*final=*/false, out), 2u);
  EXPECT_EQ(out, "ab");
  out.clear();
  EXPECT_EQ(AppendUtf8Lossy("ab\xF0\x41", /*final=*/false, out), 4u);  // cannot complete any more
  EXPECT_EQ(out, absl::StrCat("ab", kFffd, "A"));
}

TEST(Utf8Test, WhiteSpaceIsRustsDefinition) {
  for (char32_t c :
       {0x09, 0x0A, 0x0D, 0x20, 0x85, 0xA0, 0x1680, 0x2000, 0x200A, 0x2028, 0x2029, 0x202F, 0x205F, 0x3000}) {
    EXPECT_TRUE(IsWhiteSpace(c)) << std::hex << static_cast<uint32_t>(c);
  }
  for (char32_t c : {0x08, 0x1F, 0x41, 0x180E, 0x200B, 0xFEFF})
    EXPECT_FALSE(IsWhiteSpace(c)) << std::hex << static_cast<uint32_t>(c);
}

TEST(OnigurumaSyntaxTest, RewritesShorthandsOutsideAndInsideClasses) {
  EXPECT_EQ(*OnigurumaToPcre2("\\s+(?!\\S)"),
            "[\\t-\\r\\x{85}\\p{Zl}\\p{Zp}\\p{Zs}]+(?![^\\t-\\r\\x{85}\\p{Zl}\\p{Zp}\\p{Zs}])");
  EXPECT_EQ(*OnigurumaToPcre2("[^\\s\\p{L}]"), "[^\\t-\\r\\x{85}\\p{Zl}\\p{Zp}\\p{Zs}\\p{L}]");
  EXPECT_EQ(*OnigurumaToPcre2("\\h"), "[0-9a-fA-F]");
  EXPECT_EQ(*OnigurumaToPcre2("[]\\s]"), "[]\\t-\\r\\x{85}\\p{Zl}\\p{Zp}\\p{Zs}]");  // leading ']' is literal
  EXPECT_EQ(*OnigurumaToPcre2("[[:alpha:]\\s]x\\\\s"), "[[:alpha:]\\t-\\r\\x{85}\\p{Zl}\\p{Zp}\\p{Zs}]x\\\\s");
  EXPECT_EQ(*OnigurumaToPcre2("\\p{N}{1,3}|\\d"), "\\p{N}{1,3}|\\d");
  EXPECT_FALSE(OnigurumaToPcre2("[\\H]").ok());
}

std::vector<Span> FindAll(const char* pattern, std::string_view text,
                          Regex::Syntax syntax = Regex::Syntax::kOniguruma) {
  auto regex = Regex::Compile(pattern, syntax);
  EXPECT_TRUE(regex.ok()) << regex.status();
  std::vector<Span> matches;
  EXPECT_TRUE((*regex)->FindAll(text, matches).ok());
  return matches;
}

TEST(RegexTest, IteratesLikeOniguruma) {
  // An empty match right after a match is skipped; elsewhere it is kept.
  EXPECT_EQ(FindAll("a*", "baab"), (std::vector<Span>{{0, 0}, {1, 3}, {4, 4}}));
  EXPECT_EQ(FindAll("", "ab"), (std::vector<Span>{{0, 0}, {1, 1}, {2, 2}}));
  EXPECT_EQ(FindAll("x*", "\xC3\xA9"), (std::vector<Span>{{0, 0}, {2, 2}}));  // steps over whole characters
  EXPECT_EQ(FindAll(".$", "ab\ncd"), (std::vector<Span>{{1, 2}, {4, 5}}));    // $ is a line anchor
  EXPECT_EQ(FindAll("a.", "a.a.ab", Regex::Syntax::kLiteral), (std::vector<Span>{{0, 2}, {2, 4}}));
  EXPECT_EQ(FindAll("\\s",
                    "a\xE1\xA0\x8E"
                    "b c"),
            (std::vector<Span>{{5, 6}}));  // U+180E is not \s
}

std::vector<std::string> Split(std::string_view text, const char* pattern, SplitBehavior behavior, bool invert) {
  std::vector<Span> matches = FindAll(pattern, text);
  SplitScratch scratch;
  std::vector<Span> pieces;
  SplitAroundMatches(text.size(), matches, invert, behavior, scratch, pieces);
  std::vector<std::string> out;
  for (const Span& p : pieces) out.emplace_back(text.substr(p.begin, p.end - p.begin));
  return out;
}

using Pieces = std::vector<std::string>;

TEST(SplitTest, BehaviorsAsTokenizersDocumentsThem) {
  // The examples of tokenizers' SplitDelimiterBehavior docs: "the-final--countdown" split on '-'.
  const std::string text = "the-final--countdown";
  EXPECT_EQ(Split(text, "-", SplitBehavior::kRemoved, false), (Pieces{"the", "final", "countdown"}));
  EXPECT_EQ(Split(text, "-", SplitBehavior::kIsolated, false), (Pieces{"the", "-", "final", "-", "-", "countdown"}));
  EXPECT_EQ(Split(text, "-", SplitBehavior::kMergedWithPrevious, false), (Pieces{"the-", "final-", "-", "countdown"}));
  EXPECT_EQ(Split(text, "-", SplitBehavior::kMergedWithNext, false), (Pieces{"the", "-final", "-", "-countdown"}));
  EXPECT_EQ(Split(text, "-", SplitBehavior::kContiguous, false), (Pieces{"the", "-", "final", "--", "countdown"}));
  EXPECT_EQ(Split(text, "-", SplitBehavior::kRemoved, true), (Pieces{"-", "-", "-"}));
  EXPECT_EQ(Split("", "-", SplitBehavior::kIsolated, false), (Pieces{""}));
  EXPECT_EQ(ParseSplitBehavior("MergedWithNext").value(), SplitBehavior::kMergedWithNext);
  EXPECT_FALSE(ParseSplitBehavior("merged_with_next").ok());
}

TEST(WordCacheTest, EvictsTheLeastRecentlyUsed) {
  WordCache cache(16);  // one entry per shard
  const int32_t ids[] = {1, 2, 3};
  cache.Insert("word", ids, 3);
  std::vector<int32_t> out;
  ASSERT_TRUE(cache.Lookup("word", out));
  EXPECT_EQ(out, (std::vector<int32_t>{1, 2, 3}));
  EXPECT_FALSE(cache.Lookup("other", out));
  // Filling every shard many times over leaves at most 16 words and never breaks a lookup.
  for (int i = 0; i < 1000; ++i) cache.Insert(absl::StrCat("w", i), ids, 1 + i % 3);
  int hits = 0;
  for (int i = 0; i < 1000; ++i) {
    out.clear();
    if (cache.Lookup(absl::StrCat("w", i), out)) {
      ++hits;
      EXPECT_EQ(out.size(), static_cast<size_t>(1 + i % 3));
    }
  }
  EXPECT_LE(hits, 16);
  EXPECT_GE(hits, 1);
}

}  // namespace
}  // namespace cohort::tokenizer_internal
