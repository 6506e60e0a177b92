#include "worker/chat/chat_format.h"

#include "absl/strings/str_cat.h"

namespace cohort {

absl::StatusOr<ChatFormat> DetectChatFormat(const std::string& chat_template) {
  if (chat_template.empty()) {
    return absl::UnimplementedError(
        "the model has no chat_template in tokenizer_config.json: send a rendered prompt as text instead");
  }
  if (chat_template.find("<｜User｜>") != std::string::npos &&
      chat_template.find("<｜Assistant｜>") != std::string::npos) {
    return ChatFormat::kDeepseekV3;
  }
  if (chat_template.find("'User: '") != std::string::npos &&
      chat_template.find("'Assistant:") != std::string::npos) {
    return ChatFormat::kDeepseekV2;
  }
  return absl::UnimplementedError(
      "the model's chat_template is not one Cohort knows (DeepSeek-V3/R1 or DeepSeek-V2 chat): render the "
      "conversation yourself and send it as a text prompt");
}

absl::StatusOr<std::string> RenderChat(ChatFormat format, const std::vector<ChatMessage>& messages,
                                       const std::string& bos_token, const std::string& eos_token) {
  std::string system;
  bool has_user = false;
  for (size_t i = 0; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    if (m.role == "system") {
      absl::StrAppend(&system, system.empty() ? "" : "\n\n", m.content);
    } else if (m.role == "user") {
      has_user = true;
    } else if (m.role != "assistant") {
      return absl::InvalidArgumentError(
          absl::StrCat("messages[", i, "].role: '", m.role, "' is not one of system, user, assistant"));
    }
  }
  if (!has_user) return absl::InvalidArgumentError("messages: no message with role 'user'");

  std::string out = bos_token;
  if (format == ChatFormat::kDeepseekV3) {
    out += system;
    for (const ChatMessage& m : messages) {
      if (m.role == "user") absl::StrAppend(&out, "<｜User｜>", m.content);
      if (m.role == "assistant") absl::StrAppend(&out, "<｜Assistant｜>", m.content, eos_token);
    }
    out += "<｜Assistant｜>";
  } else {
    if (!system.empty()) absl::StrAppend(&out, system, "\n\n");
    for (const ChatMessage& m : messages) {
      if (m.role == "user") absl::StrAppend(&out, "User: ", m.content, "\n\n");
      if (m.role == "assistant") absl::StrAppend(&out, "Assistant: ", m.content, eos_token);
    }
    out += "Assistant:";
  }
  return out;
}

}  // namespace cohort
