#include "router/http/openai_response.h"

#include <random>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "router/http/openai_request.h"

namespace cohort {
namespace {

using nlohmann::ordered_json;

ordered_json EmptyLogprobs() {
  return {{"tokens", ordered_json::array()},
          {"token_logprobs", ordered_json::array()},
          {"top_logprobs", ordered_json::array()},
          {"text_offset", ordered_json::array()}};
}

std::string TokenName(uint32_t id) { return absl::StrCat("token_id:", id); }

ordered_json FinishReason(cohort::v1::FinishReason reason) {
  switch (reason) {
    case cohort::v1::FINISH_REASON_STOP:
      return "stop";
    case cohort::v1::FINISH_REASON_LENGTH:
      return "length";
    default:
      return nullptr;
  }
}

ordered_json Usage(const cohort::v1::Usage& usage) {
  return {{"prompt_tokens", usage.prompt_tokens()},
          {"completion_tokens", usage.completion_tokens()},
          {"total_tokens", usage.prompt_tokens() + usage.completion_tokens()},
          {"prompt_tokens_details", {{"cached_tokens", usage.cached_prompt_tokens()}}}};
}

}  // namespace

std::string NewCompletionId() {
  thread_local std::mt19937_64 rng(std::random_device{}());
  return absl::StrFormat("cmpl-%016x%016x", rng(), rng());
}

CompletionBuilder::CompletionBuilder(CompletionHeader header, bool with_logprobs, bool include_usage)
    : header_(std::move(header)), with_logprobs_(with_logprobs), include_usage_(include_usage) {
  if (with_logprobs_) logprobs_ = EmptyLogprobs();
}

ordered_json CompletionBuilder::Add(const cohort::v1::GenerateResponse& response) {
  ordered_json choice = {{"index", 0}};
  ordered_json usage = nullptr;
  if (response.has_final()) {
    const cohort::v1::Final& final = response.final();
    text_ += final.text();
    finish_reason_ = FinishReason(final.finish_reason());
    usage_ = Usage(final.usage());
    usage = usage_;
    choice["text"] = final.text();
    choice["token_ids"] = ordered_json::array();
    choice["logprobs"] = nullptr;
  } else {
    const cohort::v1::Chunk& chunk = response.chunk();
    ordered_json logprobs = nullptr;
    if (with_logprobs_) {
      logprobs = EmptyLogprobs();
      AppendLogprobs(chunk, text_.size(), logprobs);
      AppendLogprobs(chunk, text_.size(), logprobs_);
    }
    text_ += chunk.text();
    token_ids_.insert(token_ids_.end(), chunk.token_ids().begin(), chunk.token_ids().end());
    choice["text"] = chunk.text();
    choice["token_ids"] = std::vector<uint32_t>(chunk.token_ids().begin(), chunk.token_ids().end());
    choice["logprobs"] = std::move(logprobs);
  }
  choice["finish_reason"] = response.has_final() ? finish_reason_ : ordered_json(nullptr);
  if (header_.chat) {  // the text goes in a delta message
    ordered_json delta = ordered_json::object();
    if (!role_sent_) delta["role"] = "assistant";
    role_sent_ = true;
    delta["content"] = std::move(choice["text"]);
    choice.erase("text");
    choice["delta"] = std::move(delta);
  }
  ordered_json event = Object(std::move(choice), /*event=*/true);
  if (include_usage_) event["usage"] = std::move(usage);  // null but in the last event, as OpenAI does
  return event;
}

ordered_json CompletionBuilder::Completion() const {
  ordered_json choice = {{"index", 0}};
  if (header_.chat) {
    choice["message"] = {{"role", "assistant"}, {"content", text_}};
  } else {
    choice["text"] = text_;
  }
  choice["token_ids"] = token_ids_;
  choice["logprobs"] = logprobs_;
  choice["finish_reason"] = finish_reason_;
  ordered_json completion = Object(std::move(choice), /*event=*/false);
  completion["usage"] = usage_;
  return completion;
}

ordered_json CompletionBuilder::Object(ordered_json choice, bool event) const {
  const char* object = !header_.chat ? "text_completion" : event ? "chat.completion.chunk" : "chat.completion";
  return {{"id", header_.id},
          {"object", object},
          {"created", header_.created},
          {"model", header_.model},
          {"choices", ordered_json::array({std::move(choice)})}};
}

void CompletionBuilder::AppendLogprobs(const cohort::v1::Chunk& chunk, size_t text_offset,
                                       ordered_json& logprobs) const {
  for (const cohort::v1::TokenLogprob& token : chunk.logprobs()) {
    ordered_json top = ordered_json::object();
    for (const cohort::v1::TopLogprob& alternative : token.top())
      top[TokenName(alternative.token_id())] = alternative.logprob();
    logprobs["tokens"].push_back(TokenName(token.token_id()));
    logprobs["token_logprobs"].push_back(token.logprob());
    logprobs["top_logprobs"].push_back(std::move(top));
    logprobs["text_offset"].push_back(text_offset);
  }
}

int HttpStatusFor(absl::StatusCode code) {
  switch (code) {
    case absl::StatusCode::kOk:
      return 200;
    case absl::StatusCode::kInvalidArgument:
      return 400;
    case absl::StatusCode::kNotFound:
      return 404;
    case absl::StatusCode::kResourceExhausted:
      return 429;
    case absl::StatusCode::kCancelled:
      return 499;  // nginx's "client closed request"
    case absl::StatusCode::kUnimplemented:
      return 501;
    case absl::StatusCode::kUnavailable:
      return 503;
    case absl::StatusCode::kDeadlineExceeded:
      return 504;
    default:
      return 500;
  }
}

ordered_json ErrorBody(int http_status, const absl::Status& status) {
  const char* type = "server_error";
  switch (http_status) {
    case 400:
    case 404:
    case 413:
      type = "invalid_request_error";
      break;
    case 429:
      type = "rate_limit_error";
      break;
    case 499:
      type = "cancelled";
      break;
    case 501:
      type = "not_implemented";
      break;
    case 503:
      type = "service_unavailable";
      break;
    case 504:
      type = "timeout";
      break;
  }
  const std::optional<std::string> param = ErrorParam(status);
  return {{"error",
           {{"message", std::string(status.message())},
            {"type", type},
            {"param", param ? ordered_json(*param) : ordered_json(nullptr)},
            {"code", absl::AsciiStrToLower(absl::StatusCodeToString(status.code()))}}}};
}

}  // namespace cohort
