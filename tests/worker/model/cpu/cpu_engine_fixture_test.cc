// The CPU engine against transformers: every fixture checkpoint must reproduce the float32 logits
// and greedy tokens that transformers computed from the same bf16 weights, alone and in batches
// that mix prefill and decode.
#include <algorithm>
#include <cmath>
#include <memory>

#include "gtest/gtest.h"
#include "tests/testing/engine_driver.h"
#include "tests/testing/fixtures.h"
#include "worker/model/engine.h"

namespace cohort {
namespace {

using testing::Fixture;
using testing::Generate;
using testing::Sequence;
using testing::SequencesFor;

// Logits must match to 1e-3 of their own scale (the largest magnitude in the reference row).
constexpr double kLogitTolerance = 1e-3;

std::unique_ptr<Engine> MakeEngine(const Fixture& f, int64_t block_size) {
  EngineOptions options;
  options.model_dir = f.model_dir;
  options.kv_block_size = block_size;
  options.num_kv_blocks = 64;
  auto engine = CreateEngine(options);
  EXPECT_TRUE(engine.ok()) << engine.status();
  return engine.ok() ? std::move(engine).value() : nullptr;
}

class CpuEngineFixtureTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override { fixture_ = testing::LoadFixture(GetParam()); }
  Fixture fixture_;
};

TEST_P(CpuEngineFixtureTest, SingleSequenceMatchesTransformers) {
  auto engine = MakeEngine(fixture_, 16);
  ASSERT_NE(engine, nullptr);
  for (size_t c = 0; c < fixture_.cases.size(); ++c) {
    std::vector<Sequence> seqs = SequencesFor(fixture_);
    std::vector<Sequence> one = {seqs[c]};
    Generate(*engine, one, /*chunk=*/1 << 20, {0});
    EXPECT_EQ(one[0].run.generated, fixture_.cases[c].generated) << "case " << c;
    for (size_t step = 0; step < one[0].run.logits.size(); ++step) {
      const float* ref = fixture_.LogitsRow(c, step);
      double scale = 0, max_diff = 0;
      for (int64_t v = 0; v < fixture_.vocab_size; ++v) {
        scale = std::max(scale, std::abs(static_cast<double>(ref[v])));
        max_diff = std::max(max_diff, std::abs(static_cast<double>(one[0].run.logits[step][v]) - ref[v]));
      }
      EXPECT_LE(max_diff, kLogitTolerance * scale) << "case " << c << " step " << step;
    }
  }
}

// Batching must not change any sequence's numbers: each row of every matrix product is computed
// the same way whatever shares the step. So the logits are compared bit for bit, across a batch
// that staggers the sequences (some prefill in chunks while others decode), a different block
// size, and blocks handed out interleaved between sequences.
TEST_P(CpuEngineFixtureTest, BatchedAndChunkedEqualSingle) {
  auto single_engine = MakeEngine(fixture_, 16);
  auto batch_engine = MakeEngine(fixture_, 3);
  ASSERT_NE(single_engine, nullptr);
  ASSERT_NE(batch_engine, nullptr);

  std::vector<Sequence> singles = SequencesFor(fixture_);
  for (auto& s : singles) {
    std::vector<Sequence> one = {s};
    Generate(*single_engine, one, 1 << 20, {0});
    s = one[0];
  }
  std::vector<Sequence> batched = SequencesFor(fixture_);
  Generate(*batch_engine, batched, /*chunk=*/4, /*join_step=*/{0, 2, 3});

  for (size_t c = 0; c < batched.size(); ++c) {
    EXPECT_EQ(batched[c].run.generated, fixture_.cases[c].generated) << "case " << c;
    ASSERT_EQ(batched[c].run.logits.size(), singles[c].run.logits.size());
    for (size_t step = 0; step < singles[c].run.logits.size(); ++step) {
      EXPECT_EQ(batched[c].run.logits[step], singles[c].run.logits[step]) << "case " << c << " step " << step;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, CpuEngineFixtureTest, ::testing::ValuesIn(testing::FixtureNames()),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace cohort
