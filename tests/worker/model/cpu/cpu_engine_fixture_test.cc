// The CPU engine against transformers: every fixture checkpoint must reproduce the float32 logits
// and greedy tokens that transformers computed from the same bf16 weights, alone and in batches
// that mix prefill and decode.
#include <algorithm>
#include <cmath>
#include <memory>

#include "gtest/gtest.h"
#include "tests/testing/fixtures.h"
#include "worker/kv/block_manager.h"
#include "worker/model/engine.h"

namespace cohort {
namespace {

using testing::Fixture;

// Logits must match to 1e-3 of their own scale (the largest magnitude in the reference row).
constexpr double kLogitTolerance = 1e-3;

struct Run {
  std::vector<int32_t> generated;
  std::vector<std::vector<float>> logits;  // one row per generated token
};

// One sequence being generated inside a hand-driven batch loop.
struct Sequence {
  std::vector<int32_t> tokens;
  size_t prompt_len = 0;
  int64_t computed = 0;
  std::vector<int32_t> block_table;
  size_t to_generate = 0;
  Run run;
  bool done() const { return run.generated.size() == to_generate; }
};

std::unique_ptr<Engine> MakeEngine(const Fixture& f, int64_t block_size) {
  EngineOptions options;
  options.model_dir = f.model_dir;
  options.kv_block_size = block_size;
  options.num_kv_blocks = 64;
  auto engine = CreateEngine(options);
  EXPECT_TRUE(engine.ok()) << engine.status();
  return engine.ok() ? std::move(engine).value() : nullptr;
}

int32_t Argmax(const std::vector<float>& row) {
  return static_cast<int32_t>(std::max_element(row.begin(), row.end()) - row.begin());
}

// Drives `seqs` to completion. Sequence i joins the batch at step join_step[i]; prefill advances by
// at most `chunk` tokens per step, so prefilling and decoding sequences share steps.
void Generate(Engine& engine, std::vector<Sequence>& seqs, int64_t chunk, const std::vector<int>& join_step) {
  const int64_t vocab = engine.config().vocab_size;
  const int64_t block_size = engine.kv_geometry().block_size_tokens;
  BlockManager blocks({.num_blocks = engine.kv_geometry().num_blocks, .block_size = block_size, .prefix_caching = false});
  for (int step = 0; !std::all_of(seqs.begin(), seqs.end(), [](const Sequence& s) { return s.done(); }); ++step) {
    std::vector<SequenceStep> batch;
    std::vector<Sequence*> in_batch;
    for (size_t i = 0; i < seqs.size(); ++i) {
      Sequence& s = seqs[i];
      if (s.done() || step < join_step[i]) continue;
      const int64_t n = std::min<int64_t>(chunk, static_cast<int64_t>(s.tokens.size()) - s.computed);
      ASSERT_TRUE(blocks.Grow(s.block_table, BlocksForTokens(s.computed + n, block_size)));
      batch.push_back({{s.tokens.data() + s.computed, static_cast<size_t>(n)}, s.computed, s.block_table,
                       s.computed + n == static_cast<int64_t>(s.tokens.size())});
      in_batch.push_back(&s);
    }
    std::vector<float> logits(batch.size() * vocab);
    ASSERT_TRUE(engine.Forward(batch, logits).ok());
    size_t row = 0;
    for (size_t b = 0; b < batch.size(); ++b) {
      Sequence& s = *in_batch[b];
      s.computed += static_cast<int64_t>(batch[b].tokens.size());
      if (!batch[b].compute_logits) continue;
      std::vector<float> r(logits.begin() + row * vocab, logits.begin() + (row + 1) * vocab);
      ++row;
      s.run.generated.push_back(Argmax(r));
      s.run.logits.push_back(std::move(r));
      s.tokens.push_back(s.run.generated.back());
      if (s.done()) blocks.Release(s.block_table);
    }
  }
}

std::vector<Sequence> SequencesFor(const Fixture& f) {
  std::vector<Sequence> seqs;
  for (const auto& c : f.cases) {
    Sequence s;
    s.tokens = c.prompt;
    s.prompt_len = c.prompt.size();
    s.to_generate = c.generated.size();
    seqs.push_back(std::move(s));
  }
  return seqs;
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
