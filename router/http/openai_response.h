// OpenAI's response bodies built from what the Dispatcher relays: text_completion objects, their
// server-sent-event form, and error bodies. Pure functions, no I/O.
//
//   CompletionBuilder completion({.id = NewCompletionId(), .created = now, .model = "v3"}, false, false);
//   for (const GenerateResponse& r : responses) send_event(completion.Add(r));  // streaming
//   send(completion.Completion());                                              // or all at once
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "cohort/v1/inference.pb.h"
#include "nlohmann/json.hpp"

namespace cohort {

// What every object and event of one completion repeats.
struct CompletionHeader {
  std::string id;       // "cmpl-<hex>"
  int64_t created = 0;  // Unix seconds
  std::string model;
  bool chat = false;  // chat.completion objects (message / delta) instead of text_completion ones
};

std::string NewCompletionId();  // thread-safe

// Turns one generation's responses into text_completion objects. Without a tokenizer the logprobs
// name tokens "token_id:<id>", and each token's text_offset is where its chunk's text begins.
class CompletionBuilder {
 public:
  CompletionBuilder(CompletionHeader header, bool with_logprobs, bool include_usage);

  // Adds a chunk or the final message and returns its stream event: the chunk's text and tokens
  // with finish_reason null, or for the final message the text held back, the finish_reason and,
  // with include_usage, the usage (null in the other events, as OpenAI does).
  nlohmann::ordered_json Add(const cohort::v1::GenerateResponse& response);
  // Everything added so far as one object: the answer when not streaming.
  nlohmann::ordered_json Completion() const;

 private:
  nlohmann::ordered_json Object(nlohmann::ordered_json choice, bool event) const;
  void AppendLogprobs(const cohort::v1::Chunk& chunk, size_t text_offset, nlohmann::ordered_json& logprobs) const;

  const CompletionHeader header_;
  const bool with_logprobs_;
  const bool include_usage_;
  std::string text_;
  bool role_sent_ = false;  // chat streams name the assistant role in their first event
  std::vector<uint32_t> token_ids_;
  nlohmann::ordered_json logprobs_;  // null without logprobs
  nlohmann::ordered_json finish_reason_;
  nlohmann::ordered_json usage_;
};

// The HTTP status for a status code: INVALID_ARGUMENT 400, NOT_FOUND 404, RESOURCE_EXHAUSTED 429,
// UNAVAILABLE 503, DEADLINE_EXCEEDED 504, UNIMPLEMENTED 501, CANCELLED 499, others 500.
int HttpStatusFor(absl::StatusCode code);

// {"error": {"message", "type", "param", "code"}}: "type" from the HTTP status, "param" the field a
// parse error names, "code" the status code's name ("invalid_argument").
nlohmann::ordered_json ErrorBody(int http_status, const absl::Status& status);

}  // namespace cohort
