// What a user gets wrong, or a file the tokenizer cannot honour, must come back as a clear
// status, never a crash or a silently different tokenization.
#include "absl/strings/match.h"
#include "common/tokenizer/tokenizer.h"
#include "gtest/gtest.h"
#include "tests/common/tokenizer/tokenizer_test_files.h"

namespace cohort {
namespace {

using testing::DemoTokenizerJson;

TEST(TokenizerErrorsTest, InvalidUtf8IsInvalidArgument) {
  const auto tokenizer = testing::LoadTokenizer(testing::DemoTokenizerDir());
  ASSERT_NE(tokenizer, nullptr);
  const std::vector<std::string> invalid = {
      "\x80",                      // lone continuation byte
      "ab\xBFxy",                  // continuation byte in the middle
      "\xC0\xAF",                  // overlong '/'
      "\xC1\xBF",                  // overlong
      "\xE0\x80\xAF",              // overlong 3-byte
      "\xF0\x80\x80\xAF",          // overlong 4-byte
      "\xC3",                      // truncated 2-byte
      "x\xE2\x82",                 // truncated 3-byte
      "\xF0\x9F\x98",              // truncated 4-byte
      "\xE2\x82x",                 // interrupted 3-byte
      "\xED\xA0\x80",              // surrogate U+D800
      "\xED\xBF\xBF",              // surrogate U+DFFF
      "\xED\xA0\xBD\xED\xB8\x80",  // a surrogate pair spelled in UTF-8 (CESU-8)
      "\xF4\x90\x80\x80",          // above U+10FFFF
      "\xF5\x80\x80\x80",          // invalid lead byte
      "\xFE",
      "\xFF",
      "<\xEF\xBD\x9CUser\xEF\xBD\x9C>\x80",  // after a special token
  };
  for (const std::string& text : invalid) {
    for (bool special : {false, true}) {
      auto ids = tokenizer->Encode(text, special);
      ASSERT_FALSE(ids.ok()) << nlohmann::json::binary({text.begin(), text.end()}).dump();
      EXPECT_TRUE(absl::IsInvalidArgument(ids.status())) << ids.status();
      EXPECT_TRUE(absl::StrContains(ids.status().message(), "not valid UTF-8")) << ids.status();
    }
  }
  // The largest valid forms at each length still encode.
  for (const std::string text : {"\x7F", "\xDF\xBF", "\xEF\xBF\xBF", "\xF4\x8F\xBF\xBF", "\xEE\x80\x80"}) {
    EXPECT_TRUE(tokenizer->Encode(text, false).ok()) << text;
  }
}

// Writes the demo with `field` replaced by `value` and returns Load's status.
absl::Status LoadWith(const std::string& field, const nlohmann::json& value, std::string* path = nullptr) {
  nlohmann::json json = DemoTokenizerJson();
  if (field == "model") {
    json["model"] = value;
  } else if (absl::StartsWith(field, "model.")) {
    json["model"][field.substr(6)] = value;
  } else {
    json[field] = value;
  }
  testing::TempDir dir;
  const std::string file = testing::WriteJson(dir, json);
  if (path != nullptr) *path = file;
  return Tokenizer::Load(file).status();
}

TEST(TokenizerErrorsTest, UnsupportedTypesNameTheTypeAndTheFile) {
  struct Case {
    std::string field;
    std::string value;  // JSON
    std::string type;
  };
  const std::vector<Case> cases = {
      {"normalizer", R"({"type": "Lowercase"})", "Lowercase"},
      {"normalizer", R"({"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "BertNormalizer"}]})",
       "BertNormalizer"},
      {"pre_tokenizer", R"({"type": "Metaspace", "replacement": "▁"})", "Metaspace"},
      {"pre_tokenizer", R"({"type": "Sequence", "pretokenizers": [{"type": "Whitespace"}]})", "Whitespace"},
      {"model", R"({"type": "WordPiece", "vocab": {"a": 0}})", "WordPiece"},
      {"model", R"({"type": "Unigram", "vocab": []})", "Unigram"},
      {"decoder", R"({"type": "WordPiece"})", "WordPiece"},
      {"decoder", R"({"type": "Sequence", "decoders": [{"type": "ByteLevel"}, {"type": "Strip"}]})", "Strip"},
      {"post_processor", R"({"type": "RobertaProcessing"})", "RobertaProcessing"},
  };
  for (const Case& c : cases) {
    std::string path;
    const absl::Status status = LoadWith(c.field, nlohmann::json::parse(c.value), &path);
    SCOPED_TRACE(c.value);
    EXPECT_TRUE(absl::IsInvalidArgument(status)) << status;
    EXPECT_TRUE(absl::StrContains(status.message(), "\"" + c.type + "\" is not supported")) << status;
    EXPECT_TRUE(absl::StrContains(status.message(), path)) << status;
    EXPECT_TRUE(absl::StrContains(status.message(), c.field)) << status;
  }
}

TEST(TokenizerErrorsTest, BrokenFilesSayWhatIsWrong) {
  struct Case {
    std::string field;
    std::string value;  // JSON
    std::string message;
  };
  const std::vector<Case> cases = {
      {"model.merges", R"(["Ġ t h"])", "merges[0]: \"Ġ t h\" is not two tokens separated by a space"},
      {"model.merges", R"([["Ġ", "nope"]])", "merges[0]: \"nope\" is not in the vocabulary"},
      {"model.merges", R"([42])", "merges[0]: expected \"left right\" or [\"left\", \"right\"]"},
      {"model.unk_token", R"("<unk>")", "unk_token: \"<unk>\" is not in the vocabulary"},
      {"model.dropout", R"(0.1)", "dropout"},
      {"model.vocab", R"({"a": -1})", "the id of \"a\" is not an integer"},
      {"pre_tokenizer", R"({"type": "Split", "pattern": {"Regex": "(unclosed"}, "behavior": "Isolated"})",
       "pre_tokenizer.pattern: invalid regex /(unclosed/"},
      {"pre_tokenizer", R"({"type": "Split", "pattern": {"Regex": "a"}, "behavior": "Sideways"})",
       "behavior: split behavior \"Sideways\""},
      {"post_processor",
       R"({"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "X"}}], "special_tokens": {}})",
       "special token \"X\" has no ids"},
      {"added_tokens", R"([{"id": 5}])", "added_tokens[0].content: expected a string"},
  };
  for (const Case& c : cases) {
    const absl::Status status = LoadWith(c.field, nlohmann::json::parse(c.value));
    SCOPED_TRACE(c.value);
    EXPECT_TRUE(absl::IsInvalidArgument(status)) << status;
    EXPECT_TRUE(absl::StrContains(status.message(), c.message)) << status;
  }
}

TEST(TokenizerErrorsTest, MissingOrUnreadableFiles) {
  auto missing = Tokenizer::Load("/nonexistent/model");
  EXPECT_TRUE(absl::IsNotFound(missing.status())) << missing.status();
  EXPECT_TRUE(absl::StrContains(missing.status().message(), "/nonexistent/model")) << missing.status();

  testing::TempDir dir;
  auto empty_dir = Tokenizer::Load(dir.path());
  EXPECT_TRUE(absl::IsNotFound(empty_dir.status())) << empty_dir.status();
  EXPECT_TRUE(absl::StrContains(empty_dir.status().message(), dir.Join("tokenizer.json"))) << empty_dir.status();

  std::ofstream(dir.Join("tokenizer.json")) << "{\"model\": ";
  auto truncated = Tokenizer::Load(dir.path());
  EXPECT_TRUE(absl::IsInvalidArgument(truncated.status())) << truncated.status();
  EXPECT_TRUE(absl::StrContains(truncated.status().message(), "not valid JSON")) << truncated.status();

  testing::WriteJson(dir, DemoTokenizerJson());
  testing::WriteJson(dir, {{"eos_token", "<not-a-token>"}}, "tokenizer_config.json");
  auto bad_eos = Tokenizer::Load(dir.path());
  EXPECT_TRUE(absl::IsInvalidArgument(bad_eos.status())) << bad_eos.status();
  EXPECT_TRUE(absl::StrContains(bad_eos.status().message(), "eos_token \"<not-a-token>\" is not in the vocabulary"))
      << bad_eos.status();
}

}  // namespace
}  // namespace cohort
