// Parts of tokenizer.json the demo does not use (GPT-2's ByteLevel regex, Digits, every Split
// behavior, Oniguruma shorthands, normalizers, added-token flags, decoders, post-processors),
// each applied to the demo tokenizer and checked against what Hugging Face tokenizers 0.23.2
// gave (tests/common/tokenizer/hf_variants.json, written by make_hf_variants.js).
#include "common/tokenizer/tokenizer.h"
#include "gtest/gtest.h"
#include "tests/common/tokenizer/tokenizer_test_files.h"

namespace cohort {
namespace {

using testing::DemoTokenizerJson;
using testing::ReadJson;
using testing::SourcePath;

class TokenizerVariantsTest : public ::testing::TestWithParam<std::string> {};

const nlohmann::json& Variants() {
  static const nlohmann::json variants = ReadJson(SourcePath("tests/common/tokenizer/hf_variants.json"));
  return variants;
}

std::vector<std::string> VariantNames() {
  std::vector<std::string> names;
  for (const auto& v : Variants()["variants"]) names.push_back(v["name"].get<std::string>());
  return names;
}

TEST_P(TokenizerVariantsTest, MatchesHuggingFace) {
  const nlohmann::json& all = Variants();
  const nlohmann::json* variant = nullptr;
  for (const auto& v : all["variants"]) {
    if (v["name"] == GetParam()) variant = &v;
  }
  ASSERT_NE(variant, nullptr);
  nlohmann::json json = DemoTokenizerJson();
  for (const auto& [key, value] : (*variant)["patch"].items()) json[key] = value;
  for (const auto& [key, value] : (*variant)["model_patch"].items()) json["model"][key] = value;
  for (const auto& token : (*variant)["added_tokens"]) json["added_tokens"].push_back(token);
  testing::TempDir dir;
  const auto tokenizer = testing::LoadTokenizer(testing::WriteJson(dir, json));
  ASSERT_NE(tokenizer, nullptr);
  const auto& texts = all["texts"];
  const auto& results = (*variant)["results"];
  ASSERT_EQ(texts.size(), results.size());
  for (size_t i = 0; i < texts.size(); ++i) {
    testing::ExpectMatchesHf(*tokenizer, testing::ParseHfCase(texts[i].get<std::string>(), results[i]));
  }
}

INSTANTIATE_TEST_SUITE_P(HfVariants, TokenizerVariantsTest, ::testing::ValuesIn(VariantNames()),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace cohort
