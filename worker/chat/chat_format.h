// Chat prompts rendered in the model's own format, without a general Jinja engine: the formats of
// the DeepSeek chat models are recognised in tokenizer_config.json's chat_template and rendered
// here. An unknown template is an error that says what to do.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace cohort {

struct ChatMessage {
  std::string role;  // system, user or assistant
  std::string content;
};

enum class ChatFormat {
  kDeepseekV3,  // <｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜>{assistant}<｜end▁of▁sentence｜>
  kDeepseekV2,  // <｜begin▁of▁sentence｜>{system}\n\nUser: {user}\n\nAssistant: {assistant}<｜end▁of▁sentence｜>
};

// Recognises the format from the chat_template string; Unimplemented naming what was found otherwise.
absl::StatusOr<ChatFormat> DetectChatFormat(const std::string& chat_template);

// The prompt text for `messages`, ending with the assistant's turn opening. The text carries the
// BOS token itself: encode it without adding special tokens. InvalidArgument for an unknown role or
// no user message.
absl::StatusOr<std::string> RenderChat(ChatFormat format, const std::vector<ChatMessage>& messages,
                                       const std::string& bos_token, const std::string& eos_token);

}  // namespace cohort
