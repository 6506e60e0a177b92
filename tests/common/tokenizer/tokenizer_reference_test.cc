// The demo tokenizer (DeepSeek-V3's pre-tokenizer config) against what Hugging Face tokenizers
// 0.23 produced for the hard strings in tests/fixtures/tokenizer/reference.json: exact ids with
// and without special tokens, exact decoded text with and without skipping special tokens.
#include <atomic>
#include <thread>

#include "common/tokenizer/tokenizer.h"
#include "gtest/gtest.h"
#include "tests/common/tokenizer/tokenizer_test_files.h"

namespace cohort {
namespace {

using testing::DemoReferenceCases;
using testing::DemoTokenizerDir;
using testing::DemoTokenizerJson;
using testing::ExpectMatchesHf;
using testing::LoadTokenizer;

TEST(TokenizerReferenceTest, EveryReferenceCaseMatchesHuggingFace) {
  const auto tokenizer = LoadTokenizer(DemoTokenizerDir());
  ASSERT_NE(tokenizer, nullptr);
  const auto cases = DemoReferenceCases();
  ASSERT_GE(cases.size(), 40u);
  for (const auto& c : cases) ExpectMatchesHf(*tokenizer, c);
}

TEST(TokenizerReferenceTest, MergesInEitherPublishedFormGiveTheSameIds) {
  nlohmann::json json = DemoTokenizerJson();
  auto& merges = json["model"]["merges"];
  ASSERT_TRUE(merges[0].is_array()) << "the demo stores [\"a\", \"b\"] pairs; this test rewrites them as \"a b\"";
  nlohmann::json as_strings = nlohmann::json::array();
  for (const auto& pair : merges) as_strings.push_back(pair[0].get<std::string>() + " " + pair[1].get<std::string>());
  merges = as_strings;
  testing::TempDir dir;
  const auto tokenizer = LoadTokenizer(testing::WriteJson(dir, json));
  ASSERT_NE(tokenizer, nullptr);
  for (const auto& c : DemoReferenceCases()) ExpectMatchesHf(*tokenizer, c);
}

TEST(TokenizerReferenceTest, LoadsFromTheFileOrItsFolderWithTheConfig) {
  const auto from_dir = LoadTokenizer(DemoTokenizerDir());
  const auto from_file = LoadTokenizer(DemoTokenizerDir() + "/tokenizer.json");
  ASSERT_NE(from_dir, nullptr);
  ASSERT_NE(from_file, nullptr);
  for (const Tokenizer* t : {from_dir.get(), from_file.get()}) {
    EXPECT_EQ(t->vocab_size(), 2050);  // 2048 in the model, <think> and </think> added
    EXPECT_EQ(t->bos_id(), 0);
    EXPECT_EQ(t->eos_id(), 1);
    EXPECT_EQ(t->chat_template().rfind("{% if not add_generation_prompt is defined %}", 0), 0u);
  }
  EXPECT_EQ(from_dir->TokenToId("<｜User｜>"), 3);
  EXPECT_EQ(from_dir->TokenToId("</think>"), 2049);
  EXPECT_EQ(from_dir->TokenToId("Ġt"), 261);  // the first merge
  EXPECT_EQ(from_dir->TokenToId("no such token"), std::nullopt);
  EXPECT_TRUE(from_dir->IsSpecial(0));
  EXPECT_TRUE(from_dir->IsSpecial(4));
  EXPECT_FALSE(from_dir->IsSpecial(2048));  // <think> is added but not special
  EXPECT_FALSE(from_dir->IsSpecial(44));
  EXPECT_FALSE(from_dir->IsSpecial(-1));
  EXPECT_FALSE(from_dir->IsSpecial(1 << 30));
}

TEST(TokenizerReferenceTest, ConfigTokensAsObjectsAndNoConfig) {
  testing::TempDir dir;
  testing::WriteJson(dir, DemoTokenizerJson());
  {
    const auto bare = LoadTokenizer(dir.path());
    ASSERT_NE(bare, nullptr);
    EXPECT_EQ(bare->bos_id(), std::nullopt);
    EXPECT_EQ(bare->eos_id(), std::nullopt);
    EXPECT_EQ(bare->chat_template(), "");
  }
  testing::WriteJson(dir, nlohmann::json::parse(R"({
    "bos_token": {"__type": "AddedToken", "content": "<｜User｜>", "lstrip": false},
    "eos_token": "</think>",
    "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
  })"),
                     "tokenizer_config.json");
  const auto configured = LoadTokenizer(dir.path());
  ASSERT_NE(configured, nullptr);
  EXPECT_EQ(configured->bos_id(), 3);
  EXPECT_EQ(configured->eos_id(), 2049);
  EXPECT_EQ(configured->chat_template(), "D");
}

TEST(TokenizerReferenceTest, ConcurrentEncodesAgree) {
  // One tokenizer shared by threads, as a worker shares it: the word cache must not mix them up.
  const auto tokenizer = LoadTokenizer(DemoTokenizerDir());
  ASSERT_NE(tokenizer, nullptr);
  const auto cases = DemoReferenceCases();
  std::vector<std::thread> threads;
  std::atomic<int> mismatches = 0;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int round = 0; round < 50; ++round) {
        for (size_t i = 0; i < cases.size(); ++i) {
          const auto& c = cases[(i + t * 7) % cases.size()];
          auto ids = tokenizer->Encode(c.text, round % 2 == 1);
          if (!ids.ok() || *ids != (round % 2 == 1 ? c.ids_with_special : c.ids)) ++mismatches;
        }
      }
    });
  }
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(mismatches.load(), 0);
}

TEST(TokenizerReferenceTest, DecodeSkipsIdsOutsideTheVocabulary) {
  const auto tokenizer = LoadTokenizer(DemoTokenizerDir());
  ASSERT_NE(tokenizer, nullptr);
  const std::vector<int32_t> ids = {44, -5, 474, 2050, 83, 1 << 30};
  EXPECT_EQ(tokenizer->Decode(ids, false), "Hello");
}

}  // namespace
}  // namespace cohort
