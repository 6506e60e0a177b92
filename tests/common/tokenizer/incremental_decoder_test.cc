// Streaming detokenization: every chunk is whole UTF-8 characters, and the chunks add up to
// exactly what Decode gives for all the ids at once.
#include "common/tokenizer/internal/utf8.h"
#include "common/tokenizer/tokenizer.h"
#include "gtest/gtest.h"
#include "tests/common/tokenizer/tokenizer_test_files.h"

namespace cohort {
namespace {

bool IsValidUtf8(const std::string& text) { return tokenizer_internal::FirstInvalidUtf8(text) == text.size(); }

// Pushes `ids` one at a time, checks each chunk, and returns everything Push and Flush gave.
std::string Stream(const Tokenizer& tokenizer, const std::vector<int32_t>& ids, bool skip_special_tokens) {
  IncrementalDecoder decoder(tokenizer, skip_special_tokens);
  std::string streamed;
  for (size_t i = 0; i < ids.size(); ++i) {
    const std::string chunk = decoder.Push(ids[i]);
    EXPECT_TRUE(IsValidUtf8(chunk)) << "chunk after id #" << i << " (" << ids[i] << ")";
    streamed += chunk;
  }
  const std::string rest = decoder.Flush();
  EXPECT_TRUE(IsValidUtf8(rest));
  return streamed + rest;
}

TEST(IncrementalDecoderTest, EveryReferenceCaseStreamsToItsDecode) {
  const auto tokenizer = testing::LoadTokenizer(testing::DemoTokenizerDir());
  ASSERT_NE(tokenizer, nullptr);
  for (const auto& c : testing::DemoReferenceCases()) {
    SCOPED_TRACE(nlohmann::json(c.text).dump());
    for (const auto* ids : {&c.ids, &c.ids_with_special}) {
      for (bool skip : {false, true}) {
        EXPECT_EQ(Stream(*tokenizer, *ids, skip), tokenizer->Decode(*ids, skip));
      }
    }
    EXPECT_EQ(Stream(*tokenizer, c.ids, false), c.decoded);
    EXPECT_EQ(Stream(*tokenizer, c.ids, true), c.decoded_skip_special);
  }
}

TEST(IncrementalDecoderTest, HoldsBackAPartialCharacterUntilItCompletes) {
  const auto tokenizer = testing::LoadTokenizer(testing::DemoTokenizerDir());
  ASSERT_NE(tokenizer, nullptr);
  // "👍" is four single-byte tokens in the demo vocabulary.
  const std::vector<int32_t> thumbs = *tokenizer->Encode("👍", false);
  ASSERT_EQ(thumbs.size(), 4u);
  IncrementalDecoder decoder(*tokenizer, false);
  EXPECT_EQ(decoder.Push(thumbs[0]), "");
  EXPECT_EQ(decoder.Push(thumbs[1]), "");
  EXPECT_EQ(decoder.Push(thumbs[2]), "");
  EXPECT_EQ(decoder.Push(thumbs[3]), "👍");
  EXPECT_EQ(decoder.Flush(), "");
}

TEST(IncrementalDecoderTest, BrokenBytesComeOutAsDecodeGivesThem) {
  const auto tokenizer = testing::LoadTokenizer(testing::DemoTokenizerDir());
  ASSERT_NE(tokenizer, nullptr);
  const std::vector<int32_t> thumbs = *tokenizer->Encode("👍", false);
  const std::vector<int32_t> a = *tokenizer->Encode("a", false);
  // A character cut short by another: one U+FFFD for the cut part, as from_utf8_lossy does.
  const std::vector<int32_t> cut = {thumbs[0], thumbs[1], a[0], thumbs[0]};
  EXPECT_EQ(tokenizer->Decode(cut, false),
            "\xEF\xBF\xBD"
            "a\xEF\xBF\xBD");
  EXPECT_EQ(Stream(*tokenizer, cut, false), tokenizer->Decode(cut, false));
  IncrementalDecoder decoder(*tokenizer, false);
  EXPECT_EQ(decoder.Push(thumbs[0]), "");
  EXPECT_EQ(decoder.Push(thumbs[1]), "");
  EXPECT_EQ(decoder.Push(a[0]),
            "\xEF\xBF\xBD"
            "a");
  EXPECT_EQ(decoder.Push(thumbs[0]), "");
  EXPECT_EQ(decoder.Flush(), "\xEF\xBF\xBD");
  // A lone continuation byte is final at once.
  EXPECT_EQ(decoder.Push(thumbs[1]), "\xEF\xBF\xBD");
}

TEST(IncrementalDecoderTest, SkipsSpecialTokensAndUnknownIds) {
  const auto tokenizer = testing::LoadTokenizer(testing::DemoTokenizerDir());
  ASSERT_NE(tokenizer, nullptr);
  const std::string text = "<｜User｜>hi<think>x</think><｜end▁of▁sentence｜>";
  const std::vector<int32_t> ids = *tokenizer->Encode(text, true);
  IncrementalDecoder skipping(*tokenizer, true);
  std::string streamed;
  for (int32_t id : ids) streamed += skipping.Push(id);
  streamed += skipping.Push(-1) + skipping.Push(999999);
  EXPECT_EQ(streamed + skipping.Flush(), "hi<think>x</think>");
}

TEST(IncrementalDecoderTest, TokensJoinedWithSpacesWithoutADecoder) {
  nlohmann::json json = testing::DemoTokenizerJson();
  json["decoder"] = nullptr;
  testing::TempDir dir;
  const auto tokenizer = testing::LoadTokenizer(testing::WriteJson(dir, json));
  ASSERT_NE(tokenizer, nullptr);
  for (const auto& c : testing::DemoReferenceCases()) {
    SCOPED_TRACE(nlohmann::json(c.text).dump());
    EXPECT_EQ(Stream(*tokenizer, c.ids_with_special, false), tokenizer->Decode(c.ids_with_special, false));
    EXPECT_EQ(Stream(*tokenizer, c.ids_with_special, true), tokenizer->Decode(c.ids_with_special, true));
  }
}

}  // namespace
}  // namespace cohort
