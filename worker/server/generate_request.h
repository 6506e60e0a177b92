// Turns a public GenerateRequest into what the engine loop runs, checking every field first.
// Errors are InvalidArgument (or NotFound / Unimplemented) with a message that names the field.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "cohort/v1/inference.pb.h"
#include "common/tokenizer/tokenizer.h"
#include "worker/chat/chat_format.h"
#include "worker/model/config.h"
#include "worker/sampling/sampler.h"
#include "worker/scheduler/request.h"

namespace cohort {

struct GenerateSpec {
  std::vector<int32_t> prompt;
  int64_t max_tokens = 0;
  std::vector<int32_t> stop_token_ids;
  std::vector<std::string> stop_strings;
  bool ignore_eos = false;
  SamplingConfig sampling;
  RequestPriority priority = RequestPriority::kInteractive;
};

struct ModelLimits {
  std::string model_name;
  int64_t vocab_size = 0;
  int64_t max_context_tokens = 0;
  // Null when the model folder has no tokenizer.json: text prompts, chat and stop strings are then
  // refused, and chunks carry token ids only.
  const Tokenizer* tokenizer = nullptr;
  std::optional<ChatFormat> chat_format;  // when tokenizer_config.json's template is a known one
};

absl::StatusOr<GenerateSpec> ParseGenerateRequest(const cohort::v1::GenerateRequest& request,
                                                  const ModelLimits& limits);

}  // namespace cohort
