// What `cohort bench serve` sends: each request's prompt and output length.
//
// Prompts are random token ids within the model's vocabulary (no tokenizer needed), optionally after
// a shared prefix (a system prompt common to many requests), or come from a JSONL file of prompts.
// Lengths are fixed or drawn per request from a distribution:
//
//   absl::StatusOr<LengthSpec> len = LengthSpec::Parse("--input-len", "uniform:64:512");
//   COHORT_ASSIGN_OR_RETURN(auto workload, Workload::Create({.input_len = *len, ..., .vocab_size = 102400}));
//   BenchRequest r = workload->Next();  // the same sequence for the same options and seed
#pragma once

#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace cohort::bench {

// A length drawn per request: "128" (fixed), "uniform:64:512" (inclusive bounds), "normal:256:64"
// (mean and standard deviation, rounded and kept within 3 deviations and >= 1) or
// "exponential:128:1024" (mean before the cap, and the cap: a long tail, as chat outputs have).
class LengthSpec {
 public:
  // InvalidArgument naming `flag` when `text` is none of the forms above.
  static absl::StatusOr<LengthSpec> Parse(absl::string_view flag, absl::string_view text);
  static LengthSpec Fixed(int64_t n);

  int64_t Draw(std::mt19937_64& rng) const;
  int64_t min() const { return min_; }
  int64_t max() const { return max_; }
  std::string ToString() const;

 private:
  enum class Kind { kFixed, kUniform, kNormal, kExponential };
  Kind kind_ = Kind::kFixed;
  double mean_ = 0;
  double stddev_ = 0;
  int64_t min_ = 1;
  int64_t max_ = 1;
};

struct BenchRequest {
  std::vector<uint32_t> prompt_ids;  // token ids, or empty when the prompt is text
  std::string prompt_text;
  int64_t max_tokens = 0;
  int64_t prompt_tokens() const { return static_cast<int64_t>(prompt_ids.size()); }  // 0 for text
};

struct WorkloadOptions {
  LengthSpec input_len = LengthSpec::Fixed(128);   // tokens after the shared prefix
  LengthSpec output_len = LengthSpec::Fixed(128);  // max_tokens, for prompts that set none
  int64_t shared_prefix_len = 0;  // tokens every prompt starts with
  int64_t num_prefixes = 1;       // distinct shared prefixes, assigned round-robin
  int64_t vocab_size = 0;         // token ids are drawn from [0, vocab_size)
  uint64_t seed = 0;
  // JSONL, one object per line: {"prompt": "text" or [ids]} (or "prompt_token_ids": [ids]) and
  // optionally "output_len" (or "max_tokens"). Used in order, cycling; replaces random prompts.
  std::string prompts_file;
};

class Workload {
 public:
  // InvalidArgument for options that cannot work together, a bad or unreadable prompts file.
  // Random prompts need vocab_size > 0.
  static absl::StatusOr<std::unique_ptr<Workload>> Create(const WorkloadOptions& options);

  BenchRequest Next();
  // The most prompt plus output tokens one request can have; -1 when unknown (text prompts).
  int64_t MaxTotalTokens() const;
  std::string Describe() const;  // for the table's header

 private:
  explicit Workload(const WorkloadOptions& options) : options_(options), rng_(options.seed) {}
  absl::Status LoadPromptsFile();

  WorkloadOptions options_;
  std::mt19937_64 rng_;
  std::vector<std::vector<uint32_t>> prefixes_;
  std::vector<BenchRequest> file_prompts_;  // max_tokens 0: drawn from output_len
  uint64_t next_ = 0;
};

}  // namespace cohort::bench
