// Request bodies of OpenAI's /v1/completions and /v1/chat/completions, parsed into a cohort.v1
// GenerateRequest. Pure functions, no I/O.
//
//   absl::StatusOr<CompletionRequest> request = ParseCompletionRequest(nlohmann::json::parse(body));
//   if (!request.ok()) ...  // INVALID_ARGUMENT: "temperature: expected a number, got string"
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "cohort/v1/inference.pb.h"
#include "nlohmann/json.hpp"

namespace cohort {

// A request as the HTTP front needs it: what goes to the workers, and how to answer.
struct CompletionRequest {
  cohort::v1::GenerateRequest generate;
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage
  bool chat = false;           // from /v1/chat/completions: answer with chat.completion objects
};

// Only the fields the body sets are set in `generate`; JSON null counts as not set. `prompt` is
// token ids (or a batch of one); a string is passed on as text, for the worker to tokenize or refuse.
// Errors are INVALID_ARGUMENT whose message starts with the field, which ErrorParam returns.
absl::StatusOr<CompletionRequest> ParseCompletionRequest(const nlohmann::json& body);

struct ChatMessage {
  std::string role;     // system, developer, user, assistant or tool
  std::string content;  // text parts joined by "\n"
};

struct ChatRequest {
  std::vector<ChatMessage> messages;
  // Everything but the prompt, which is `messages` rendered with the model's chat template.
  CompletionRequest options;
};

absl::StatusOr<ChatRequest> ParseChatRequest(const nlohmann::json& body);

// The field a parse error above names ("temperature", "messages[1].role"), for OpenAI's "param".
std::optional<std::string> ErrorParam(const absl::Status& status);

}  // namespace cohort
