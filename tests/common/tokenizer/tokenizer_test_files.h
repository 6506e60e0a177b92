// Shared by the tokenizer tests: the committed demo tokenizer, its HF reference cases, and
// writing tokenizer.json variants into scratch folders.
#pragma once

#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "common/tokenizer/tokenizer.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/paths.h"

namespace cohort::testing {

inline const std::string& DemoTokenizerDir() {
  static const std::string dir = SourcePath("models/cohort-demo");
  return dir;
}

inline nlohmann::json ReadJson(const std::string& path) {
  std::ifstream in(path);
  EXPECT_TRUE(in.good()) << path;
  return nlohmann::json::parse(in);
}

inline nlohmann::json DemoTokenizerJson() { return ReadJson(DemoTokenizerDir() + "/tokenizer.json"); }

// Writes `json` as <dir>/<name> and returns the path.
inline std::string WriteJson(const TempDir& dir, const nlohmann::json& json,
                             const std::string& name = "tokenizer.json") {
  const std::string path = dir.Join(name);
  std::ofstream(path) << json.dump();
  return path;
}

inline std::unique_ptr<Tokenizer> LoadTokenizer(const std::string& path) {
  auto tokenizer = Tokenizer::Load(path);
  EXPECT_TRUE(tokenizer.ok()) << tokenizer.status();
  return tokenizer.ok() ? std::move(tokenizer).value() : nullptr;
}

// What HF tokenizers 0.23 gave for one text (tests/fixtures/tokenizer/reference.json and
// tests/common/tokenizer/hf_variants.json hold these).
struct HfCase {
  std::string text;
  std::vector<int32_t> ids;               // add_special_tokens false
  std::vector<int32_t> ids_with_special;  // add_special_tokens true
  std::string decoded;                    // Decode(ids, skip_special_tokens=false)
  std::string decoded_skip_special;       // Decode(ids, skip_special_tokens=true)
};

inline HfCase ParseHfCase(const std::string& text, const nlohmann::json& result) {
  return {text, result["ids"].get<std::vector<int32_t>>(), result["ids_with_special"].get<std::vector<int32_t>>(),
          result["decoded"].get<std::string>(), result["decoded_skip_special"].get<std::string>()};
}

inline std::vector<HfCase> DemoReferenceCases() {
  std::vector<HfCase> cases;
  const nlohmann::json reference = ReadJson(SourcePath("tests/fixtures/tokenizer/reference.json"));
  for (const auto& c : reference["cases"]) {
    cases.push_back(ParseHfCase(c["text"].get<std::string>(), c));
  }
  return cases;
}

// Asserts that `tokenizer` gives exactly what HF gave for `expected`.
inline void ExpectMatchesHf(const Tokenizer& tokenizer, const HfCase& expected) {
  SCOPED_TRACE(nlohmann::json(expected.text).dump());
  auto ids = tokenizer.Encode(expected.text, /*add_special_tokens=*/false);
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_EQ(*ids, expected.ids);
  auto ids_with_special = tokenizer.Encode(expected.text, /*add_special_tokens=*/true);
  ASSERT_TRUE(ids_with_special.ok()) << ids_with_special.status();
  EXPECT_EQ(*ids_with_special, expected.ids_with_special);
  EXPECT_EQ(tokenizer.Decode(expected.ids, /*skip_special_tokens=*/false), expected.decoded);
  EXPECT_EQ(tokenizer.Decode(expected.ids, /*skip_special_tokens=*/true), expected.decoded_skip_special);
}

}  // namespace cohort::testing
