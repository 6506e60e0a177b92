#include "worker/model/rope.h"

#include <cmath>
#include <random>

#include "gtest/gtest.h"

namespace cohort {
namespace {

ModelConfig RopeConfigFor(bool yarn, bool interleave) {
  ModelConfig c;
  c.qk_nope_head_dim = 128;
  c.qk_rope_head_dim = 64;
  c.rope_interleave = interleave;
  c.rope.theta = 10000.0;
  if (yarn) {  // DeepSeek-V3's published values
    c.rope.yarn = true;
    c.rope.factor = 40.0;
    c.rope.original_max_position_embeddings = 4096;
    c.rope.mscale = 1.0;
    c.rope.mscale_all_dim = 1.0;
  }
  return c;
}

TEST(RopeTest, PlainFrequenciesAreThetaPowers) {
  Rope rope(RopeConfigFor(/*yarn=*/false, true));
  ASSERT_EQ(rope.inv_freq().size(), 32u);
  for (int i = 0; i < 32; ++i) {
    EXPECT_FLOAT_EQ(rope.inv_freq()[i], static_cast<float>(std::pow(10000.0, -2.0 * i / 64)));
  }
  EXPECT_FLOAT_EQ(rope.attention_factor(), 1.0f);
  EXPECT_FLOAT_EQ(rope.softmax_scale(), static_cast<float>(1.0 / std::sqrt(192.0)));
}

TEST(RopeTest, YarnKeepsFastDimensionsAndInterpolatesSlowOnes) {
  Rope plain(RopeConfigFor(false, true));
  Rope yarn(RopeConfigFor(true, true));
  // With beta_fast 32 over an original context of 4096 the correction range is [10, 23]: below it
  // frequencies are kept, above it they are divided by the factor, in between they blend.
  for (int i = 0; i < 10; ++i) EXPECT_FLOAT_EQ(yarn.inv_freq()[i], plain.inv_freq()[i]) << i;
  for (int i = 23; i < 32; ++i) EXPECT_FLOAT_EQ(yarn.inv_freq()[i], plain.inv_freq()[i] / 40.0f) << i;
  for (int i = 11; i < 23; ++i) {
    EXPECT_LT(yarn.inv_freq()[i], plain.inv_freq()[i]) << i;
    EXPECT_GT(yarn.inv_freq()[i], plain.inv_freq()[i] / 40.0f) << i;
  }
}

TEST(RopeTest, YarnMscaleScalesSoftmaxNotRotationWhenBothMscalesAgree) {
  Rope yarn(RopeConfigFor(true, true));
  EXPECT_FLOAT_EQ(yarn.attention_factor(), 1.0f);
  const double mscale = 0.1 * std::log(40.0) + 1.0;  // DeepSeek-V3: 0.1 * 1.0 * ln(40) + 1
  EXPECT_NEAR(yarn.softmax_scale(), mscale * mscale / std::sqrt(192.0), 1e-7);
  EXPECT_NEAR(YarnMscale(40.0, 0.707), 0.1 * 0.707 * std::log(40.0) + 1.0, 1e-12);
  EXPECT_EQ(YarnMscale(1.0, 0.707), 1.0);
}

TEST(RopeTest, YarnAttentionFactorIsRatioOfMscales) {
  ModelConfig c = RopeConfigFor(true, true);
  c.rope.mscale = 1.0;
  c.rope.mscale_all_dim = 0.8;
  Rope rope(c);
  EXPECT_NEAR(rope.attention_factor(), YarnMscale(40.0, 1.0) / YarnMscale(40.0, 0.8), 1e-6);
}

float Dot(const std::vector<float>& a, const std::vector<float>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return static_cast<float>(s);
}

// The point of rope: q.k after rotation depends on the distance between positions, not on where
// the pair sits; and rotation keeps the norm. Checked for both pair layouts.
class RopeLayoutTest : public ::testing::TestWithParam<bool> {};

TEST_P(RopeLayoutTest, ScoresDependOnlyOnRelativePosition) {
  Rope rope(RopeConfigFor(/*yarn=*/true, GetParam()));
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  std::vector<float> q(64), k(64);
  for (auto& v : q) v = normal(rng);
  for (auto& v : k) v = normal(rng);
  auto score = [&](int64_t pq, int64_t pk) {
    std::vector<float> a = q, b = k;
    rope.Apply(a, pq);
    rope.Apply(b, pk);
    return Dot(a, b);
  };
  EXPECT_NEAR(score(10, 3), score(1007, 1000), 1e-3);
  EXPECT_NEAR(score(5, 5), Dot(q, k), 1e-3);
  EXPECT_GT(std::abs(score(10, 3) - score(10, 9)), 1e-2);  // distance does matter
  std::vector<float> rotated = q;
  rope.Apply(rotated, 123);
  EXPECT_NEAR(Dot(rotated, rotated), Dot(q, q), 1e-3);
}

TEST_P(RopeLayoutTest, RotatesTheConfiguredPairs) {
  Rope rope(RopeConfigFor(false, GetParam()));
  std::vector<float> x(64, 0.0f);
  x[0] = 1.0f;  // first element of pair 0 in both layouts
  rope.Apply(x, 1);
  const int partner = GetParam() ? 1 : 32;
  EXPECT_NEAR(x[0], std::cos(1.0f), 1e-6);
  EXPECT_NEAR(x[partner], std::sin(1.0f), 1e-6);
  for (int i = 0; i < 64; ++i) {
    if (i != 0 && i != partner) EXPECT_EQ(x[i], 0.0f) << i;
  }
}

INSTANTIATE_TEST_SUITE_P(Layouts, RopeLayoutTest, ::testing::Bool(),
                         [](const auto& info) { return info.param ? "Interleaved" : "Halves"; });

}  // namespace
}  // namespace cohort
