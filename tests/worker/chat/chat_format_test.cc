#include "worker/chat/chat_format.h"

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/paths.h"
#include "tests/testing/safetensors_writer.h"

namespace cohort {
namespace {

const std::string kBos = "<｜begin▁of▁sentence｜>", kEos = "<｜end▁of▁sentence｜>";

TEST(ChatFormatTest, RecognisesTheDemoModelsDeepSeekV3Template) {
  auto config = nlohmann::json::parse(testing::ReadFile(testing::SourcePath("models/cohort-demo/tokenizer_config.json")));
  auto format = DetectChatFormat(config["chat_template"].get<std::string>());
  ASSERT_TRUE(format.ok()) << format.status();
  EXPECT_EQ(*format, ChatFormat::kDeepseekV3);
}

TEST(ChatFormatTest, RendersDeepSeekV3Conversation) {
  auto text = RenderChat(ChatFormat::kDeepseekV3,
                         {{"system", "Be brief."}, {"system", "Be kind."}, {"user", "Hi"},
                          {"assistant", "Hello!"}, {"user", "Joke?"}},
                         kBos, kEos);
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(*text, kBos + "Be brief.\n\nBe kind.<｜User｜>Hi<｜Assistant｜>Hello!" + kEos +
                       "<｜User｜>Joke?<｜Assistant｜>");
}

TEST(ChatFormatTest, RendersDeepSeekV2Conversation) {
  auto text = RenderChat(ChatFormat::kDeepseekV2, {{"system", "S"}, {"user", "Hi"}, {"assistant", "Yo"}, {"user", "Q"}},
                         kBos, kEos);
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(*text, kBos + "S\n\nUser: Hi\n\nAssistant: Yo" + kEos + "User: Q\n\nAssistant:");
}

TEST(ChatFormatTest, UnknownTemplateSaysWhatToDo) {
  auto format = DetectChatFormat("{% for m in messages %}<|im_start|>{{ m.role }}{% endfor %}");
  EXPECT_TRUE(absl::IsUnimplemented(format.status()));
  EXPECT_NE(std::string(format.status().message()).find("text prompt"), std::string::npos);
  EXPECT_TRUE(absl::IsUnimplemented(DetectChatFormat("").status()));
}

TEST(ChatFormatTest, BadRolesAndMissingUserAreRejected) {
  auto tool = RenderChat(ChatFormat::kDeepseekV3, {{"user", "a"}, {"tool", "b"}}, kBos, kEos);
  EXPECT_TRUE(absl::IsInvalidArgument(tool.status()));
  EXPECT_NE(std::string(tool.status().message()).find("messages[1].role"), std::string::npos);
  EXPECT_TRUE(absl::IsInvalidArgument(RenderChat(ChatFormat::kDeepseekV3, {{"system", "s"}}, kBos, kEos).status()));
}

}  // namespace
}  // namespace cohort
