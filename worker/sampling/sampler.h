// Per-request token sampling: penalties, temperature, top-k / min-p / top-p truncation and one
// seeded draw, plus the logprobs of the model's raw logits that are returned to the client.
//
// For one row of logits, on a working copy (the model's row is never modified):
//   1. Penalties over the request's history. Repetition (HF/CTRL) over prompt and generated tokens:
//      logit > 0 ? logit / p : logit * p. Presence and frequency (OpenAI) over generated tokens only:
//      logit -= presence * (count > 0) + frequency * count.
//   2. Temperature 0: argmax, ties to the lowest id. No random number is drawn.
//   3. Otherwise: top-k, softmax at the temperature, min-p (relative to the most likely survivor),
//      top-p over the renormalised survivors, then ONE uniform number from the request's own
//      mt19937_64 picks by inverse CDF over the kept tokens in id order.
// A request's tokens therefore depend only on its seed, its prompt and the logits it is shown,
// never on the batch it ran in or on other requests.
//
//   COHORT_RETURN_IF_ERROR(ValidateSamplingConfig(config));
//   Sampler sampler(config, /*fallback_seed=*/request_id, prompt_tokens);
//   SampledToken next = sampler.Sample(logits_row);  // once per generated token
#pragma once

#include <cstdint>
#include <optional>
#include <random>
#include <span>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"

namespace cohort {

// Validated sampling settings with defaults applied (the server converts the proto into this).
struct SamplingConfig {
  float temperature = 1.0f;         // >= 0; 0 = greedy (argmax after penalties)
  int32_t top_k = 0;                // >= 0; 0 = off
  float top_p = 1.0f;               // (0, 1]
  float min_p = 0.0f;               // [0, 1]: drop tokens whose probability < min_p * max probability
  float repetition_penalty = 1.0f;  // > 0; over prompt AND generated tokens
  float presence_penalty = 0.0f;    // [-2, 2]; over generated tokens
  float frequency_penalty = 0.0f;   // [-2, 2]; over generated tokens, times their count
  std::optional<uint64_t> seed;     // same seed + same logits sequence => same tokens
  int32_t top_logprobs = 0;         // 0..20 alternatives returned with each token
};

inline constexpr int32_t kMaxTopLogprobs = 20;

// InvalidArgument naming the field ("temperature must be >= 0, got -1") for a value outside the
// ranges above, NaN or infinity included.
absl::Status ValidateSamplingConfig(const SamplingConfig& config);

struct SampledToken {
  int32_t token = 0;
  float logprob = 0.0f;  // log-softmax of the model's raw logits (before penalties/temperature) at `token`
  std::vector<std::pair<int32_t, float>> top;  // min(top_logprobs, vocab) best (token, raw logprob), best first
};

// One per request. Not thread-safe; lives with its request in the scheduler thread.
class Sampler {
 public:
  // `config` must have passed ValidateSamplingConfig. `fallback_seed` seeds the RNG when
  // config.seed is unset. `prompt` feeds the repetition penalty.
  Sampler(const SamplingConfig& config, uint64_t fallback_seed, std::span<const int32_t> prompt);

  // Chooses the next token from one row of logits (vocab floats), and records it for the penalties.
  // Every call must pass the same vocabulary size, larger than every prompt token id.
  SampledToken Sample(std::span<const float> logits);

  // Sampling elsewhere (the CUDA backend samples on the device), equal to Sample() given the same
  // logits: BeginDeviceSample returns the uniform number in [0, 1) that Sample() would draw for this
  // token (0 without drawing when temperature is 0), EndDeviceSample records the token that was
  // chosen. Call them in pairs, once per token.
  double BeginDeviceSample(int64_t vocab);
  void EndDeviceSample(int32_t token) { Record(token); }

  const SamplingConfig& config() const { return config_; }
  // Penalty inputs: the distinct ids of the prompt and the generated tokens, and beside each how
  // often it was generated (0 for a prompt token that never was).
  std::span<const int32_t> history_tokens() const { return history_tokens_; }
  std::span<const int32_t> history_counts() const { return history_counts_; }
  // The same count for one token (0 outside the history).
  int32_t generated_count(int32_t token) const;

 private:
  // Fixes the vocabulary on the first call. Sample() also sizes its scratch (SizeScratch); device
  // sampling needs none, so a request's first token costs the host no vocabulary-sized buffers.
  void SizeForVocab(int64_t vocab);
  void SizeScratch();
  void ApplyPenalties();
  int32_t Argmax() const;
  void KeepTopP();
  int32_t Draw();
  void Record(int32_t token);
  // Where `token`, which is in the history, sits in history_tokens_.
  size_t HistoryIndex(int32_t token) const;

  SamplingConfig config_;
  std::mt19937_64 rng_;
  int64_t vocab_ = 0;  // fixed by the first Sample() or BeginDeviceSample()
  // Distinct ids: the prompt's in ascending order (the first prompt_distinct_), then each generated
  // token not seen before, in generation order (its index in generated_index_).
  std::vector<int32_t> history_tokens_;
  std::vector<int32_t> history_counts_;  // beside history_tokens_: times generated
  size_t prompt_distinct_ = 0;
  absl::flat_hash_map<int32_t, size_t> generated_index_;
  std::vector<bool> in_history_;  // per vocab id (a bit each)

  // Sample()'s scratch, vocab-sized from its first call on, so later calls do not allocate.
  std::vector<float> work_;          // penalised logits
  std::vector<float> weights_;       // per vocab id: unnormalised probability of a candidate
  std::vector<int32_t> candidates_;  // token ids still in the running
};

}  // namespace cohort
