#include "worker/sampling/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace cohort {
namespace {

SamplingConfig Greedy() {
  SamplingConfig c;
  c.temperature = 0.0f;
  return c;
}

SamplingConfig Seeded(uint64_t seed) {
  SamplingConfig c;
  c.seed = seed;
  return c;
}

// Logits whose softmax is `p` (which sums to 1).
std::vector<float> LogitsOf(const std::vector<double>& p) {
  std::vector<float> out;
  for (double v : p) out.push_back(static_cast<float>(std::log(v)));
  return out;
}

std::vector<double> Softmax(const std::vector<float>& logits, double temperature = 1.0) {
  std::vector<double> p;
  double sum = 0;
  for (float l : logits) sum += std::exp(l / temperature);
  for (float l : logits) p.push_back(std::exp(l / temperature) / sum);
  return p;
}

// How often each token comes out of `draws` samples from the same row.
std::vector<double> Frequencies(const SamplingConfig& c, const std::vector<float>& logits, int draws) {
  Sampler sampler(c, /*fallback_seed=*/0, {});
  std::vector<int> count(logits.size(), 0);
  for (int i = 0; i < draws; ++i) ++count[sampler.Sample(logits).token];
  std::vector<double> freq;
  for (int n : count) freq.push_back(static_cast<double>(n) / draws);
  return freq;
}

std::vector<int32_t> Tokens(Sampler& sampler, const std::vector<float>& logits, int n) {
  std::vector<int32_t> out;
  for (int i = 0; i < n; ++i) out.push_back(sampler.Sample(logits).token);
  return out;
}

TEST(SamplerTest, GreedyPicksArgmaxAndBreaksTiesToTheLowestId) {
  Sampler sampler(Greedy(), 0, {});
  EXPECT_EQ(sampler.Sample(std::vector<float>{0.1f, -2.0f, 3.5f, 1.0f}).token, 2);
  EXPECT_EQ(sampler.Sample(std::vector<float>{0.0f, 4.0f, -1.0f, 4.0f}).token, 1);
}

// The null backend's rows: -1e4 everywhere but one 0. Every other token's weight is exactly 0 (exp
// underflows), so greedy and seeded draws alike take the hot token, with logprob 0, and the others'
// logprobs are their logits.
TEST(SamplerTest, RowsOfOneLikelyTokenDrawItWithLogprobZero) {
  std::vector<float> row(1000, -1e4f);
  row[617] = 0.0f;
  row[3] = -103.5f;  // a weight of the smallest floats, not 0
  for (SamplingConfig c : {Greedy(), Seeded(7)}) {
    c.top_logprobs = 3;
    Sampler sampler(c, 0, {});
    for (int i = 0; i < 50; ++i) {
      const SampledToken t = sampler.Sample(row);
      ASSERT_EQ(t.token, 617);
      EXPECT_EQ(t.logprob, 0.0f);
      ASSERT_EQ(t.top.size(), 3u);
      EXPECT_EQ(t.top[1], std::make_pair(3, -103.5f));
      EXPECT_EQ(t.top[2], std::make_pair(0, -1e4f));
    }
  }
}

TEST(SamplerTest, RepetitionPenaltyDividesPositiveAndMultipliesNegativeLogitsOfPromptTokens) {
  SamplingConfig c = Greedy();
  c.repetition_penalty = 1.5f;
  const std::vector<int32_t> prompt = {0, 0, 3};
  const std::vector<float> positive = {2.0f, 1.5f, 0.1f, -5.0f};  // token 0: 2 / 1.5 = 1.33 < 1.5
  const std::vector<float> negative = {-1.0f, -1.2f, -9.0f, -9.0f};  // token 0: -1 * 1.5 = -1.5 < -1.2
  EXPECT_EQ(Sampler(Greedy(), 0, prompt).Sample(positive).token, 0);  // without the penalty
  EXPECT_EQ(Sampler(c, 0, prompt).Sample(positive).token, 1);
  EXPECT_EQ(Sampler(Greedy(), 0, prompt).Sample(negative).token, 0);
  EXPECT_EQ(Sampler(c, 0, prompt).Sample(negative).token, 1);
}

TEST(SamplerTest, RepetitionPenaltyCoversGeneratedTokens) {
  SamplingConfig c = Greedy();
  c.repetition_penalty = 2.0f;
  Sampler sampler(c, 0, {});
  const std::vector<float> logits = {3.0f, 2.0f, 0.5f};
  // 0 (3), then 0 is 1.5 < 2 so 1, then 0 is 1.5 and 1 is 1.0 so 0 again: the penalty does not compound.
  EXPECT_EQ(Tokens(sampler, logits, 3), (std::vector<int32_t>{0, 1, 0}));
}

TEST(SamplerTest, PresencePenaltyAppliesOnceToGeneratedTokensButNotToThePrompt) {
  SamplingConfig c = Greedy();
  c.presence_penalty = 0.5f;
  Sampler sampler(c, 0, /*prompt=*/std::vector<int32_t>{0});
  const std::vector<float> logits = {1.0f, 0.8f, 0.0f};
  // 0 is in the prompt only: unpenalised. Once generated it scores 0.5 < 0.8; once both are
  // generated 0 (0.5) leads 1 (0.3) for good, however often it repeats.
  EXPECT_EQ(Tokens(sampler, logits, 5), (std::vector<int32_t>{0, 1, 0, 0, 0}));
}

TEST(SamplerTest, FrequencyPenaltyGrowsWithTheCount) {
  SamplingConfig c = Greedy();
  c.frequency_penalty = 0.3f;
  Sampler sampler(c, 0, {});
  const std::vector<float> logits = {1.0f, 0.5f};
  // Scores before each pick: (1.0, 0.5) (0.7, 0.5) (0.4, 0.5) (0.4, 0.2) (0.1, 0.2)
  EXPECT_EQ(Tokens(sampler, logits, 5), (std::vector<int32_t>{0, 0, 1, 0, 1}));
}

// The CUDA backend's path: BeginDeviceSample / EndDeviceSample keep the penalty inputs and the
// random stream exactly as Sample() does, so a request continues the same wherever it was sampled.
TEST(SamplerTest, DeviceSamplingKeepsThePenaltyInputsAndTheRandomStreamOfSample) {
  SamplingConfig c = Seeded(11);
  c.temperature = 0.9f;
  c.repetition_penalty = 1.3f;
  c.presence_penalty = 0.4f;
  c.frequency_penalty = 0.2f;
  const std::vector<int32_t> prompt = {7, 3, 3, 90};
  std::vector<float> logits(100);
  for (size_t i = 0; i < logits.size(); ++i) logits[i] = std::sin(static_cast<float>(i) * 0.7f) * 3.0f;
  Sampler on_host(c, 0, prompt), on_device(c, 0, prompt);
  std::vector<int32_t> generated;
  for (int step = 0; step < 40; ++step) {
    const int32_t token = on_host.Sample(logits).token;
    (void)on_device.BeginDeviceSample(static_cast<int64_t>(logits.size()));
    on_device.EndDeviceSample(token);  // the device chose what the host did
    generated.push_back(token);
  }
  std::vector<int32_t> history(on_device.history_tokens().begin(), on_device.history_tokens().end());
  ASSERT_EQ(on_device.history_counts().size(), history.size());
  for (size_t i = 0; i < history.size(); ++i) {
    EXPECT_EQ(on_device.history_counts()[i], std::ranges::count(generated, history[i])) << "token " << history[i];
  }
  std::ranges::sort(history);
  std::vector<int32_t> want = prompt;
  want.insert(want.end(), generated.begin(), generated.end());
  std::ranges::sort(want);
  want.erase(std::unique(want.begin(), want.end()), want.end());
  EXPECT_EQ(history, want);
  for (int32_t t = 0; t < static_cast<int32_t>(logits.size()); ++t) {
    // Prompt tokens count only when generated (the presence and frequency penalties).
    EXPECT_EQ(on_device.generated_count(t), std::ranges::count(generated, t)) << "token " << t;
  }
  // Both continue alike on the host: same penalties, same next uniform number.
  for (int step = 0; step < 10; ++step) {
    const SampledToken a = on_host.Sample(logits), b = on_device.Sample(logits);
    EXPECT_EQ(a.token, b.token) << "step " << step;
    EXPECT_EQ(a.logprob, b.logprob) << "step " << step;
  }
}

TEST(SamplerTest, TopKOfOneAlwaysGivesTheArgmaxAtAnyTemperature) {
  SamplingConfig c = Seeded(11);
  c.temperature = 5.0f;
  c.top_k = 1;
  Sampler sampler(c, 0, {});
  const std::vector<float> logits = {0.3f, 0.1f, 0.45f, 0.2f, 0.44f};
  for (int i = 0; i < 500; ++i) ASSERT_EQ(sampler.Sample(logits).token, 2) << "draw " << i;
}

TEST(SamplerTest, TopKKeepsOnlyTheKMostLikely) {
  SamplingConfig c = Seeded(12);
  c.top_k = 2;
  const auto freq = Frequencies(c, LogitsOf({0.3, 0.1, 0.35, 0.25}), 4000);
  EXPECT_EQ(freq[1], 0.0);
  EXPECT_EQ(freq[3], 0.0);
  EXPECT_NEAR(freq[0], 0.3 / 0.65, 0.03);
}

TEST(SamplerTest, SmallTopPKeepsOnlyTheMostLikelyToken) {
  SamplingConfig c = Seeded(13);
  c.top_p = 0.05f;
  const auto freq = Frequencies(c, LogitsOf({0.2, 0.4, 0.1, 0.3}), 1000);
  EXPECT_EQ(freq[1], 1.0);
}

TEST(SamplerTest, TopPKeepsTheSmallestSetReachingItAndRenormalises) {
  SamplingConfig c = Seeded(14);
  c.top_p = 0.7f;  // 0.5 alone is short of 0.7; 0.5 + 0.3 reaches it
  const auto freq = Frequencies(c, LogitsOf({0.5, 0.2, 0.3}), 10000);
  EXPECT_EQ(freq[1], 0.0);
  EXPECT_NEAR(freq[0], 0.5 / 0.8, 0.02);
  EXPECT_NEAR(freq[2], 0.3 / 0.8, 0.02);
}

TEST(SamplerTest, TopPOverAFlatDistributionKeepsTheLowestIdsThatReachIt) {
  SamplingConfig c = Seeded(16);
  c.top_p = 0.499f;  // 150 of 300 equally likely tokens; equal probabilities rank by id
  Sampler sampler(c, 0, {});
  const std::vector<float> logits(300, 0.5f);
  int32_t highest = 0;
  for (int i = 0; i < 3000; ++i) highest = std::max(highest, sampler.Sample(logits).token);
  EXPECT_EQ(highest, 149);  // each of 0..149 has 1/150 per draw: 149 shows up in 3000 draws
}

TEST(SamplerTest, MinPDropsTokensBelowItsShareOfTheBest) {
  SamplingConfig c = Seeded(15);
  c.min_p = 0.2f;  // threshold 0.2 * 0.5 = 0.1
  const auto freq = Frequencies(c, LogitsOf({0.5, 0.3, 0.12, 0.08}), 10000);
  EXPECT_EQ(freq[3], 0.0);
  EXPECT_NEAR(freq[0], 0.5 / 0.92, 0.02);
  EXPECT_GT(freq[2], 0.08);  // 0.12 / 0.92 = 0.13 survives
}

TEST(SamplerTest, SameSeedGivesTheSameTokensAndAnotherSeedDoesNot) {
  const std::vector<float> logits = {0.0f, 0.2f, -0.1f, 0.3f, 0.1f, -0.2f, 0.05f, 0.15f};
  Sampler a(Seeded(42), /*fallback_seed=*/1, {});
  Sampler b(Seeded(42), /*fallback_seed=*/2, {});  // an explicit seed overrides the fallback
  Sampler other(Seeded(43), 1, {});
  const auto first = Tokens(a, logits, 50);
  EXPECT_EQ(Tokens(b, logits, 50), first);
  EXPECT_NE(Tokens(other, logits, 50), first);
}

TEST(SamplerTest, UnseededRequestsFollowTheFallbackSeed) {
  const std::vector<float> logits = {0.0f, 0.2f, -0.1f, 0.3f, 0.1f, -0.2f, 0.05f, 0.15f};
  Sampler a(SamplingConfig{}, 7, {});
  Sampler b(SamplingConfig{}, 7, {});
  Sampler c(SamplingConfig{}, 8, {});
  const auto first = Tokens(a, logits, 50);
  EXPECT_EQ(Tokens(b, logits, 50), first);
  EXPECT_NE(Tokens(c, logits, 50), first);
}

TEST(SamplerTest, TokensDoNotDependOnOtherRequestsOrOnTruncationSettings) {
  const std::vector<float> logits = {0.0f, 0.2f, -0.1f, 0.3f, 0.1f, -0.2f, 0.05f, 0.15f};
  Sampler alone(Seeded(5), 0, {});
  const auto expected = Tokens(alone, logits, 30);
  // Interleaved with another request, including a greedy one that draws nothing.
  Sampler a(Seeded(5), 0, {});
  Sampler noisy(Seeded(5), 0, {});
  Sampler greedy(Greedy(), 0, {});
  std::vector<int32_t> got;
  for (int i = 0; i < 30; ++i) {
    noisy.Sample(logits);
    greedy.Sample(logits);
    got.push_back(a.Sample(logits).token);
  }
  EXPECT_EQ(got, expected);

  // A top-k that only drops an impossible (masked) token changes nothing either.
  std::vector<float> masked = logits;
  masked.push_back(-std::numeric_limits<float>::infinity());
  SamplingConfig truncated = Seeded(5);
  truncated.top_k = static_cast<int32_t>(logits.size());
  Sampler untruncated_sampler(Seeded(5), 0, {});
  Sampler truncated_sampler(truncated, 0, {});
  const auto untruncated_tokens = Tokens(untruncated_sampler, masked, 30);
  EXPECT_EQ(untruncated_tokens, expected);
  EXPECT_EQ(Tokens(truncated_sampler, masked, 30), expected);
}

TEST(SamplerTest, FrequenciesMatchSoftmaxAtTemperatureOne) {
  const std::vector<float> logits = {1.0f, 0.0f, 2.0f, -0.5f};
  const auto want = Softmax(logits);
  const auto freq = Frequencies(Seeded(2024), logits, 20000);
  for (size_t t = 0; t < logits.size(); ++t) {
    EXPECT_NEAR(freq[t], want[t], 0.02 * std::max(want[t], 0.25)) << "token " << t;
  }
}

TEST(SamplerTest, LowerTemperatureSharpensAndHigherFlattens) {
  const std::vector<float> logits = {1.0f, 0.0f, 2.0f, -0.5f};
  SamplingConfig cold = Seeded(3);
  cold.temperature = 0.5f;
  SamplingConfig hot = Seeded(3);
  hot.temperature = 2.0f;
  const auto cold_freq = Frequencies(cold, logits, 20000);
  const auto hot_freq = Frequencies(hot, logits, 20000);
  const auto cold_want = Softmax(logits, 0.5);
  const auto hot_want = Softmax(logits, 2.0);
  for (size_t t = 0; t < logits.size(); ++t) {
    EXPECT_NEAR(cold_freq[t], cold_want[t], 0.015) << "token " << t;
    EXPECT_NEAR(hot_freq[t], hot_want[t], 0.015) << "token " << t;
  }
  EXPECT_GT(cold_freq[2], 0.8);  // softmax at T=1 gives it 0.61
  EXPECT_LT(hot_freq[2], 0.45);
}

TEST(SamplerTest, TinyTemperatureBehavesLikeGreedyWithoutOverflow) {
  SamplingConfig c = Seeded(4);
  c.temperature = 1e-37f;  // valid; 100 / 1e-37 alone would overflow float
  Sampler sampler(c, 0, {});
  const std::vector<float> logits = {100.5f, 100.0f, -100.0f};
  for (int i = 0; i < 100; ++i) ASSERT_EQ(sampler.Sample(logits).token, 0);
}

TEST(SamplerTest, LogprobsAreThoseOfTheRawLogitsBestFirst) {
  SamplingConfig c = Seeded(6);
  c.temperature = 0.7f;
  c.repetition_penalty = 1.3f;
  c.presence_penalty = 0.4f;
  c.top_k = 3;
  c.top_logprobs = 3;
  const std::vector<float> logits = {0.5f, 2.0f, -1.0f, 1.5f, 0.0f};
  const std::vector<int32_t> prompt = {1};
  Sampler sampler(c, 0, prompt);
  const auto p = Softmax(logits);
  for (int i = 0; i < 20; ++i) {
    const SampledToken got = sampler.Sample(logits);
    EXPECT_NEAR(got.logprob, std::log(p[got.token]), 1e-5);
    ASSERT_EQ(got.top.size(), 3u);
    const std::vector<int32_t> best = {1, 3, 0};
    for (size_t k = 0; k < 3; ++k) {
      EXPECT_EQ(got.top[k].first, best[k]);
      EXPECT_NEAR(got.top[k].second, std::log(p[best[k]]), 1e-5);
    }
  }
}

TEST(SamplerTest, TopLogprobsIsCappedByTheVocabularyAndEmptyWhenOff) {
  SamplingConfig c = Greedy();
  c.top_logprobs = 20;
  const std::vector<float> logits = {0.0f, 1.0f, 1.0f};
  const SampledToken got = Sampler(c, 0, {}).Sample(logits);
  ASSERT_EQ(got.top.size(), 3u);
  EXPECT_EQ(got.top[0].first, 1);  // equal logits: lower id first
  EXPECT_EQ(got.top[1].first, 2);
  EXPECT_EQ(got.top[2].first, 0);
  EXPECT_TRUE(Sampler(Greedy(), 0, {}).Sample(logits).top.empty());
}

// The error for `c` is InvalidArgument and its message contains each of `words`.
void ExpectInvalid(const SamplingConfig& c, const std::vector<std::string>& words) {
  const absl::Status st = ValidateSamplingConfig(c);
  ASSERT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  for (const std::string& w : words) EXPECT_NE(std::string(st.message()).find(w), std::string::npos) << st;
}

TEST(SamplerTest, ValidationAcceptsDefaultsAndRangeEnds) {
  EXPECT_TRUE(ValidateSamplingConfig(SamplingConfig{}).ok());
  SamplingConfig c;
  c.temperature = 0.0f;
  c.top_p = 1.0f;
  c.min_p = 1.0f;
  c.presence_penalty = -2.0f;
  c.frequency_penalty = 2.0f;
  c.top_logprobs = 20;
  c.top_k = 100000;
  EXPECT_TRUE(ValidateSamplingConfig(c).ok()) << ValidateSamplingConfig(c);
}

TEST(SamplerTest, ValidationNamesTheBadField) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  auto with = [](auto set) {
    SamplingConfig c;
    set(c);
    return c;
  };
  ExpectInvalid(with([](auto& c) { c.temperature = -1.0f; }), {"temperature", ">= 0", "-1"});
  ExpectInvalid(with([&](auto& c) { c.temperature = nan; }), {"temperature", "nan"});
  ExpectInvalid(with([&](auto& c) { c.temperature = inf; }), {"temperature", "inf"});
  ExpectInvalid(with([](auto& c) { c.top_k = -1; }), {"top_k", "-1"});
  ExpectInvalid(with([](auto& c) { c.top_p = 0.0f; }), {"top_p", "0"});
  ExpectInvalid(with([](auto& c) { c.top_p = 1.5f; }), {"top_p", "1.5"});
  ExpectInvalid(with([&](auto& c) { c.top_p = nan; }), {"top_p", "nan"});
  ExpectInvalid(with([](auto& c) { c.min_p = -0.1f; }), {"min_p", "-0.1"});
  ExpectInvalid(with([](auto& c) { c.min_p = 1.1f; }), {"min_p", "1.1"});
  ExpectInvalid(with([&](auto& c) { c.min_p = nan; }), {"min_p", "nan"});
  ExpectInvalid(with([](auto& c) { c.repetition_penalty = 0.0f; }), {"repetition_penalty", "> 0"});
  ExpectInvalid(with([&](auto& c) { c.repetition_penalty = nan; }), {"repetition_penalty", "nan"});
  ExpectInvalid(with([&](auto& c) { c.repetition_penalty = inf; }), {"repetition_penalty", "inf"});
  ExpectInvalid(with([](auto& c) { c.presence_penalty = 2.5f; }), {"presence_penalty", "2.5"});
  ExpectInvalid(with([&](auto& c) { c.presence_penalty = nan; }), {"presence_penalty", "nan"});
  ExpectInvalid(with([](auto& c) { c.frequency_penalty = -3.0f; }), {"frequency_penalty", "-3"});
  ExpectInvalid(with([&](auto& c) { c.frequency_penalty = nan; }), {"frequency_penalty", "nan"});
  ExpectInvalid(with([](auto& c) { c.top_logprobs = 21; }), {"top_logprobs", "21"});
  ExpectInvalid(with([](auto& c) { c.top_logprobs = -1; }), {"top_logprobs", "-1"});
}

}  // namespace
}  // namespace cohort
