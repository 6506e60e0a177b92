#include "worker/sampling/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace cohort {
namespace {

absl::Status OutOfRange(const char* field, const char* expected, float got) {
  return absl::InvalidArgumentError(absl::StrCat(field, " must be ", expected, ", got ", got));
}

// Ranks by value, highest first; equal values go to the lower id so every order is deterministic.
struct HigherFirst {
  const float* values;
  bool operator()(int32_t a, int32_t b) const { return values[a] > values[b] || (values[a] == values[b] && a < b); }
};

// exp(x) in float, exactly: below about -103.97 std::exp rounds to 0, and glibc takes a slow path
// there (errno and all), 2.2x the cost of an ordinary exp. The null backend's rows are -1e4 but for
// one token, so every sampled token took that path across the whole vocabulary.
inline float ExpOrZero(float x) { return x < -104.0f ? 0.0f : std::exp(x); }

// Uniform in [0, 1) from exactly one engine output. Spelled out rather than
// std::uniform_real_distribution, whose algorithm differs between standard libraries.
double UniformFrom(std::mt19937_64& rng) { return static_cast<double>(rng() >> 11) * 0x1.0p-53; }

}  // namespace

absl::Status ValidateSamplingConfig(const SamplingConfig& c) {
  // Written so that NaN fails every check.
  if (!(c.temperature >= 0.0f && std::isfinite(c.temperature))) {
    return OutOfRange("temperature", ">= 0", c.temperature);
  }
  if (c.top_k < 0) {
    return absl::InvalidArgumentError(absl::StrCat("top_k must be >= 0 (0 = off), got ", c.top_k));
  }
  if (!(c.top_p > 0.0f && c.top_p <= 1.0f)) return OutOfRange("top_p", "in (0, 1]", c.top_p);
  if (!(c.min_p >= 0.0f && c.min_p <= 1.0f)) return OutOfRange("min_p", "in [0, 1]", c.min_p);
  if (!(c.repetition_penalty > 0.0f && std::isfinite(c.repetition_penalty))) {
    return OutOfRange("repetition_penalty", "> 0", c.repetition_penalty);
  }
  if (!(c.presence_penalty >= -2.0f && c.presence_penalty <= 2.0f)) {
    return OutOfRange("presence_penalty", "in [-2, 2]", c.presence_penalty);
  }
  if (!(c.frequency_penalty >= -2.0f && c.frequency_penalty <= 2.0f)) {
    return OutOfRange("frequency_penalty", "in [-2, 2]", c.frequency_penalty);
  }
  if (c.top_logprobs < 0 || c.top_logprobs > kMaxTopLogprobs) {
    return absl::InvalidArgumentError(
        absl::StrCat("top_logprobs must be in [0, ", kMaxTopLogprobs, "], got ", c.top_logprobs));
  }
  return absl::OkStatus();
}

Sampler::Sampler(const SamplingConfig& config, uint64_t fallback_seed, std::span<const int32_t> prompt)
    : config_(config), rng_(config.seed.value_or(fallback_seed)), history_tokens_(prompt.begin(), prompt.end()) {
  std::sort(history_tokens_.begin(), history_tokens_.end());
  history_tokens_.erase(std::unique(history_tokens_.begin(), history_tokens_.end()), history_tokens_.end());
  history_counts_.assign(history_tokens_.size(), 0);
  prompt_distinct_ = history_tokens_.size();
}

size_t Sampler::HistoryIndex(int32_t token) const {
  const auto prompt_end = history_tokens_.begin() + static_cast<std::ptrdiff_t>(prompt_distinct_);
  const auto in_prompt = std::lower_bound(history_tokens_.begin(), prompt_end, token);
  if (in_prompt != prompt_end && *in_prompt == token) return static_cast<size_t>(in_prompt - history_tokens_.begin());
  return generated_index_.at(token);
}

int32_t Sampler::generated_count(int32_t token) const {
  if (token < 0 || token >= vocab_ || !in_history_[token]) return 0;
  return history_counts_[HistoryIndex(token)];
}

void Sampler::SizeForVocab(int64_t vocab) {
  if (vocab_ != 0) {
    COHORT_CHECK(vocab == vocab_, "logits row of ", vocab, " values after rows of ", vocab_);
    return;
  }
  COHORT_CHECK(vocab > 0, "empty logits row");
  vocab_ = vocab;
  in_history_.assign(vocab, false);
  for (int32_t t : history_tokens_) {
    COHORT_CHECK(t >= 0 && t < vocab, "prompt token ", t, " outside the vocabulary of ", vocab);
    in_history_[t] = true;
  }
}

void Sampler::SizeScratch() {
  if (!work_.empty()) return;
  work_.resize(vocab_);
  weights_.resize(vocab_);
  candidates_.reserve(vocab_);
}

void Sampler::ApplyPenalties() {
  const float repetition = config_.repetition_penalty;
  for (size_t i = 0; i < history_tokens_.size(); ++i) {
    float& logit = work_[history_tokens_[i]];
    if (repetition != 1.0f) logit = logit > 0.0f ? logit / repetition : logit * repetition;
    const int32_t count = history_counts_[i];
    if (count > 0) logit -= config_.presence_penalty + config_.frequency_penalty * static_cast<float>(count);
  }
}

int32_t Sampler::Argmax() const {
  int32_t best = 0;
  for (int32_t t = 1; t < vocab_; ++t) {
    if (work_[t] > work_[best]) best = t;
  }
  return best;
}

void Sampler::KeepTopP() {
  double mass = 0.0;
  for (int32_t t : candidates_) mass += weights_[t];
  const double target = config_.top_p * mass;  // > 0, so the most likely token is always kept
  // Sorts the most likely candidates in growing slices rather than the whole vocabulary: the
  // kept set is usually small.
  const HigherFirst higher{weights_.data()};
  const auto first = candidates_.begin();
  const size_t n = candidates_.size();
  double cumulative = 0.0;
  size_t keep = 0;
  for (size_t sorted = 0, slice = 64; keep == sorted && sorted < n; slice *= 4) {
    const size_t end = std::min(n, sorted + slice);
    std::nth_element(first + sorted, first + end - 1, first + n, higher);
    std::sort(first + sorted, first + end, higher);
    sorted = end;
    while (keep < sorted && cumulative < target) cumulative += weights_[candidates_[keep++]];
  }
  candidates_.resize(keep);
}

int32_t Sampler::Draw() {
  candidates_.resize(vocab_);
  std::iota(candidates_.begin(), candidates_.end(), 0);
  bool in_id_order = true;
  if (config_.top_k > 0 && config_.top_k < vocab_) {
    std::nth_element(candidates_.begin(), candidates_.begin() + config_.top_k, candidates_.end(),
                     HigherFirst{work_.data()});
    candidates_.resize(config_.top_k);
    in_id_order = false;
  }

  // Softmax weights relative to the best candidate, which gets exactly 1. Subtracting before
  // dividing keeps a tiny temperature from overflowing.
  float best = -INFINITY;
  for (int32_t t : candidates_) best = std::max(best, work_[t]);
  for (int32_t t : candidates_) weights_[t] = ExpOrZero((work_[t] - best) / config_.temperature);

  if (config_.min_p > 0.0f) {
    const float threshold = config_.min_p;  // min_p times the best weight, 1
    std::erase_if(candidates_, [&](int32_t t) { return weights_[t] < threshold; });
  }

  if (config_.top_p < 1.0f) {
    KeepTopP();
    in_id_order = false;
  }

  if (!in_id_order) std::sort(candidates_.begin(), candidates_.end());
  double total = 0.0;
  for (int32_t t : candidates_) total += weights_[t];
  const double target = UniformFrom(rng_) * total;
  double cumulative = 0.0;
  int32_t last_possible = candidates_.front();
  for (int32_t t : candidates_) {
    if (weights_[t] <= 0.0f) continue;
    cumulative += weights_[t];
    last_possible = t;
    if (cumulative > target) return t;
  }
  return last_possible;  // rounding left `target` at the very top of the range
}

double Sampler::BeginDeviceSample(int64_t vocab) {
  SizeForVocab(vocab);
  return config_.temperature == 0.0f ? 0.0 : UniformFrom(rng_);
}

void Sampler::Record(int32_t token) {
  if (!in_history_[token]) {
    in_history_[token] = true;
    generated_index_.emplace(token, history_tokens_.size());
    history_tokens_.push_back(token);
    history_counts_.push_back(1);
    return;
  }
  ++history_counts_[HistoryIndex(token)];
}

SampledToken Sampler::Sample(std::span<const float> logits) {
  SizeForVocab(static_cast<int64_t>(logits.size()));
  SizeScratch();
  std::copy(logits.begin(), logits.end(), work_.begin());
  ApplyPenalties();

  SampledToken out;
  out.token = config_.temperature == 0.0f ? Argmax() : Draw();

  // log-softmax of the raw logits: logit - (max + log(sum(exp(logit - max)))).
  const float max = *std::max_element(logits.begin(), logits.end());
  double sum = 0.0;
  for (float l : logits) sum += ExpOrZero(l - max);
  const double log_normalizer = max + std::log(sum);
  out.logprob = static_cast<float>(logits[out.token] - log_normalizer);

  const int64_t top = std::min<int64_t>(config_.top_logprobs, vocab_);
  if (top > 0) {
    candidates_.resize(vocab_);
    std::iota(candidates_.begin(), candidates_.end(), 0);
    std::partial_sort(candidates_.begin(), candidates_.begin() + top, candidates_.end(), HigherFirst{logits.data()});
    out.top.reserve(top);
    for (int64_t i = 0; i < top; ++i) {
      const int32_t t = candidates_[i];
      out.top.emplace_back(t, static_cast<float>(logits[t] - log_normalizer));
    }
  }

  Record(out.token);
  return out;
}

}  // namespace cohort
