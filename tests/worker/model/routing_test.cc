#include "worker/model/routing.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "gtest/gtest.h"

namespace cohort {
namespace {

ModelConfig V3Routing(int64_t experts, int64_t top_k, int64_t groups, int64_t topk_group, bool normalize,
                      double scaling) {
  ModelConfig c;
  c.n_routed_experts = experts;
  c.num_experts_per_tok = top_k;
  c.n_group = groups;
  c.topk_group = topk_group;
  c.scoring_func = ScoringFunc::kSigmoid;
  c.topk_method = TopkMethod::kNoAuxTc;
  c.norm_topk_prob = normalize;
  c.routed_scaling_factor = scaling;
  return c;
}

ModelConfig V2Routing(int64_t experts, int64_t top_k, TopkMethod method, int64_t groups, int64_t topk_group,
                      double scaling) {
  ModelConfig c;
  c.n_routed_experts = experts;
  c.num_experts_per_tok = top_k;
  c.n_group = groups;
  c.topk_group = topk_group;
  c.scoring_func = ScoringFunc::kSoftmax;
  c.topk_method = method;
  c.routed_scaling_factor = scaling;
  return c;
}

struct Choice {
  std::vector<int32_t> experts;
  std::vector<float> weights;
};

Choice Route(const ModelConfig& c, const std::vector<float>& logits, const std::vector<float>& bias = {}) {
  Choice out{std::vector<int32_t>(c.num_experts_per_tok), std::vector<float>(c.num_experts_per_tok)};
  TopkRouter(c).Select(logits, bias, out.experts, out.weights);
  return out;
}

float Sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

// Logits whose sigmoid is `p`: lets the tables below be written in probabilities.
std::vector<float> LogitsOf(const std::vector<float>& p) {
  std::vector<float> out;
  for (float v : p) out.push_back(std::log(v / (1 - v)));
  return out;
}

TEST(RoutingTest, GreedySoftmaxPicksHighestAndScalesUnnormalisedWeights) {
  const ModelConfig c = V2Routing(4, 2, TopkMethod::kGreedy, 1, 1, 16.0);
  const std::vector<float> logits = {0.0f, 2.0f, 1.0f, -1.0f};
  Choice got = Route(c, logits);
  EXPECT_EQ(got.experts, (std::vector<int32_t>{1, 2}));
  double z = std::exp(0.0) + std::exp(2.0) + std::exp(1.0) + std::exp(-1.0);
  EXPECT_NEAR(got.weights[0], 16.0 * std::exp(2.0) / z, 1e-5);
  EXPECT_NEAR(got.weights[1], 16.0 * std::exp(1.0) / z, 1e-5);
}

TEST(RoutingTest, GroupLimitedGreedyRanksGroupsByTheirBestExpert) {
  // Groups {0,1} {2,3} {4,5}; one group kept. Group 1 holds the single best expert (3), so it
  // wins even though group 2 has the two next-best experts.
  const ModelConfig c = V2Routing(6, 2, TopkMethod::kGroupLimitedGreedy, 3, 1, 1.0);
  const std::vector<float> logits = {0.0f, 0.1f, -3.0f, 3.0f, 2.9f, 2.8f};
  Choice got = Route(c, logits);
  EXPECT_EQ(got.experts, (std::vector<int32_t>{3, 2}));
}

TEST(RoutingTest, NoAuxTcRanksGroupsBySumOfTopTwo) {
  // Group 0 = {0,1,2,3} has the best single expert (0.95) but a weak second; group 1's top two
  // sum higher. With one group kept the choice comes from group 1 only.
  const ModelConfig c = V3Routing(8, 2, 2, 1, /*normalize=*/false, 1.0);
  const auto logits = LogitsOf({0.95f, 0.10f, 0.10f, 0.10f, 0.80f, 0.70f, 0.20f, 0.10f});
  Choice got = Route(c, logits, std::vector<float>(8, 0.0f));
  EXPECT_EQ(got.experts, (std::vector<int32_t>{4, 5}));
  EXPECT_NEAR(got.weights[0], 0.80f, 1e-6);
  EXPECT_NEAR(got.weights[1], 0.70f, 1e-6);
}

TEST(RoutingTest, CorrectionBiasChangesTheChoiceButNotTheWeights) {
  const ModelConfig c = V3Routing(4, 1, 1, 1, /*normalize=*/false, 2.5);
  const auto logits = LogitsOf({0.9f, 0.6f, 0.5f, 0.4f});
  EXPECT_EQ(Route(c, logits, {0, 0, 0, 0}).experts[0], 0);
  Choice biased = Route(c, logits, {0.0f, 0.5f, 0.0f, 0.0f});
  EXPECT_EQ(biased.experts[0], 1);
  EXPECT_NEAR(biased.weights[0], 2.5f * 0.6f, 1e-6);  // the unbiased score, scaled
}

TEST(RoutingTest, NormTopkProbMakesWeightsSumToScalingFactor) {
  const ModelConfig c = V3Routing(8, 3, 4, 2, /*normalize=*/true, 2.5);
  const std::vector<float> logits = {0.3f, -1.0f, 2.0f, 0.5f, -0.2f, 1.5f, 0.0f, 0.9f};
  Choice got = Route(c, logits, std::vector<float>(8, 0.0f));
  float sum = 0;
  for (float w : got.weights) sum += w;
  EXPECT_NEAR(sum, 2.5f, 1e-5);
  // Ratios between weights are those of the sigmoid scores.
  EXPECT_NEAR(got.weights[0] / got.weights[1], Sigmoid(logits[got.experts[0]]) / Sigmoid(logits[got.experts[1]]),
              1e-5);
}

TEST(RoutingTest, ExpertsComeOutBestFirstAndDistinct) {
  const ModelConfig c = V3Routing(16, 8, 8, 4, true, 1.0);
  std::vector<float> logits(16);
  for (int e = 0; e < 16; ++e) logits[e] = std::sin(3.7f * e);
  Choice got = Route(c, logits, std::vector<float>(16, 0.0f));
  for (size_t i = 1; i < got.experts.size(); ++i) {
    EXPECT_GE(logits[got.experts[i - 1]], logits[got.experts[i]]);
    for (size_t j = 0; j < i; ++j) EXPECT_NE(got.experts[i], got.experts[j]);
  }
  // Only experts of the four kept groups (pairs 2g, 2g+1) appear: at most 4 distinct groups.
  std::vector<bool> group_used(8, false);
  for (int32_t e : got.experts) group_used[e / 2] = true;
  EXPECT_LE(std::count(group_used.begin(), group_used.end(), true), 4);
}

}  // namespace
}  // namespace cohort
