#include "worker/server/generate_request.h"

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace cohort {

absl::StatusOr<GenerateSpec> ParseGenerateRequest(const cohort::v1::GenerateRequest& request,
                                                  const ModelLimits& limits) {
  if (!request.model().empty() && request.model() != limits.model_name) {
    return absl::NotFoundError(
        absl::StrCat("model '", request.model(), "' is not served here (this worker serves '", limits.model_name, "')"));
  }
  GenerateSpec spec;
  switch (request.prompt_case()) {
    case cohort::v1::GenerateRequest::kTokenIds:
      for (uint32_t id : request.token_ids().ids()) {
        if (id >= static_cast<uint64_t>(limits.vocab_size)) {
          return absl::InvalidArgumentError(absl::StrCat("token_ids: id ", id, " is outside the vocabulary of ",
                                                         limits.vocab_size, " tokens"));
        }
        spec.prompt.push_back(static_cast<int32_t>(id));
      }
      break;
    case cohort::v1::GenerateRequest::kText: {
      if (limits.tokenizer == nullptr) {
        return absl::UnimplementedError(
            "text prompts need the model's tokenizer; this model folder has no tokenizer.json: send token_ids");
      }
      absl::StatusOr<std::vector<int32_t>> ids = limits.tokenizer->Encode(request.text(), /*add_special_tokens=*/true);
      if (!ids.ok()) return absl::InvalidArgumentError(absl::StrCat("text: ", ids.status().message()));
      spec.prompt = std::move(*ids);
      break;
    }
    case cohort::v1::GenerateRequest::kChat: {
      if (limits.tokenizer == nullptr) {
        return absl::UnimplementedError(
            "chat needs the model's tokenizer; this model folder has no tokenizer.json: send token_ids");
      }
      if (!limits.chat_format) {
        COHORT_RETURN_IF_ERROR(DetectChatFormat(limits.tokenizer->chat_template()).status());
      }
      std::vector<ChatMessage> messages;
      for (const auto& m : request.chat().messages()) messages.push_back({m.role(), m.content()});
      auto token_text = [&](std::optional<int32_t> id) {
        return id ? limits.tokenizer->Decode(std::vector<int32_t>{*id}, /*skip_special_tokens=*/false) : std::string();
      };
      absl::StatusOr<std::string> text = RenderChat(*limits.chat_format, messages, token_text(limits.tokenizer->bos_id()),
                                                    token_text(limits.tokenizer->eos_id()));
      if (!text.ok()) return absl::InvalidArgumentError(absl::StrCat("chat.", text.status().message()));
      // The rendered text carries its own BOS.
      absl::StatusOr<std::vector<int32_t>> ids = limits.tokenizer->Encode(*text, /*add_special_tokens=*/false);
      if (!ids.ok()) return absl::InvalidArgumentError(absl::StrCat("chat: ", ids.status().message()));
      spec.prompt = std::move(*ids);
      break;
    }
    case cohort::v1::GenerateRequest::PROMPT_NOT_SET:
      break;
  }
  if (spec.prompt.empty()) return absl::InvalidArgumentError("prompt: empty; set token_ids, text or chat");
  const int64_t prompt_len = static_cast<int64_t>(spec.prompt.size());
  if (prompt_len >= limits.max_context_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("token_ids: the prompt has ", prompt_len,
                                                   " tokens; the model's context is ", limits.max_context_tokens,
                                                   " and must leave room for one generated token"));
  }

  const auto& stopping = request.stopping();
  spec.max_tokens = limits.max_context_tokens - prompt_len;
  if (stopping.has_max_tokens()) {
    if (stopping.max_tokens() == 0) return absl::InvalidArgumentError("stopping.max_tokens must be at least 1");
    if (stopping.max_tokens() > spec.max_tokens) {
      return absl::InvalidArgumentError(absl::StrCat("stopping.max_tokens (", stopping.max_tokens(),
                                                     ") plus the prompt (", prompt_len,
                                                     " tokens) exceeds the model's context of ",
                                                     limits.max_context_tokens, " tokens"));
    }
    spec.max_tokens = stopping.max_tokens();
  }
  if (stopping.stop_size() > 0 && limits.tokenizer == nullptr) {
    return absl::UnimplementedError(
        "stopping.stop: stop strings need the model's tokenizer; this model folder has no tokenizer.json: "
        "use stopping.stop_token_ids");
  }
  for (const std::string& stop : stopping.stop()) {
    if (stop.empty()) return absl::InvalidArgumentError("stopping.stop: empty stop string");
    spec.stop_strings.push_back(stop);
  }
  for (uint32_t id : stopping.stop_token_ids()) {
    if (id >= static_cast<uint64_t>(limits.vocab_size)) {
      return absl::InvalidArgumentError(absl::StrCat("stopping.stop_token_ids: id ", id, " is outside the vocabulary"));
    }
    spec.stop_token_ids.push_back(static_cast<int32_t>(id));
  }
  spec.ignore_eos = stopping.ignore_eos();

  const auto& s = request.sampling();
  SamplingConfig& c = spec.sampling;
  if (s.has_temperature()) c.temperature = s.temperature();
  if (s.has_top_k()) c.top_k = static_cast<int32_t>(std::min<uint32_t>(s.top_k(), INT32_MAX));
  if (s.has_top_p()) c.top_p = s.top_p();
  if (s.has_min_p()) c.min_p = s.min_p();
  if (s.has_repetition_penalty()) c.repetition_penalty = s.repetition_penalty();
  if (s.has_presence_penalty()) c.presence_penalty = s.presence_penalty();
  if (s.has_frequency_penalty()) c.frequency_penalty = s.frequency_penalty();
  if (s.has_seed()) c.seed = s.seed();
  if (request.has_top_logprobs()) c.top_logprobs = static_cast<int32_t>(std::min<uint32_t>(request.top_logprobs(), 1000));
  if (absl::Status st = ValidateSamplingConfig(c); !st.ok()) {
    // The sampler names the field; the public API nests it under `sampling` (top_logprobs excepted).
    const std::string message(st.message());
    return absl::InvalidArgumentError(message.rfind("top_logprobs", 0) == 0 ? message : "sampling." + message);
  }

  spec.priority = request.priority() == cohort::v1::PRIORITY_BATCH ? RequestPriority::kBatch
                                                                   : RequestPriority::kInteractive;
  return spec;
}

}  // namespace cohort
