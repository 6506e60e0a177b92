// Engine::last_step_stats() and weight_value_bytes(), what the economics metrics read after a step.
#include <numeric>
#include <vector>

#include "gtest/gtest.h"
#include "tests/testing/paths.h"
#include "worker/model/engine.h"

namespace cohort {
namespace {

int64_t MoeLayers(const ModelConfig& c) {
  int64_t n = 0;
  for (int64_t l = 0; l < c.num_layers; ++l) n += c.IsMoeLayer(l) ? 1 : 0;
  return n;
}

std::unique_ptr<Engine> Create(const std::string& device) {
  EngineOptions options;
  options.model_dir = testing::SourcePath("tests/fixtures/models/v3_plain");
  options.device = device;
  options.kv_block_size = 16;
  options.num_kv_blocks = 8;
  auto engine = CreateEngine(options);
  EXPECT_TRUE(engine.ok()) << engine.status();
  return engine.ok() ? std::move(*engine) : nullptr;
}

TEST(StepStatsTest, CpuEngineCountsTheExpertsEachStepRan) {
  auto engine = Create("cpu");
  ASSERT_NE(engine, nullptr);
  const ModelConfig& c = engine->config();
  const int64_t moe_layers = MoeLayers(c);
  ASSERT_GT(moe_layers, 0);
  EXPECT_EQ(engine->weight_value_bytes(), 4);  // float32
  EXPECT_EQ(engine->last_step_stats().routed_expert_reads, 0);  // no step yet

  std::vector<int32_t> table(8);
  std::iota(table.begin(), table.end(), 0);
  std::vector<float> logits(c.vocab_size);

  // A prompt of 64 different tokens spreads over more than top-k experts in every MoE layer.
  std::vector<int32_t> prompt(64);
  std::iota(prompt.begin(), prompt.end(), 2);
  SequenceStep prefill{prompt, 0, table, true};
  ASSERT_TRUE(engine->Forward({&prefill, 1}, logits).ok());
  const int64_t prefill_reads = engine->last_step_stats().routed_expert_reads;
  EXPECT_GT(prefill_reads, moe_layers * c.num_experts_per_tok);
  EXPECT_LE(prefill_reads, moe_layers * c.n_routed_experts);

  // One token goes to exactly top-k distinct experts per MoE layer; the count is per step.
  const int32_t next = 7;
  SequenceStep decode{{&next, 1}, 64, table, true};
  ASSERT_TRUE(engine->Forward({&decode, 1}, logits).ok());
  EXPECT_EQ(engine->last_step_stats().routed_expert_reads, moe_layers * c.num_experts_per_tok);
}

TEST(StepStatsTest, NullEngineReadsNoExpert) {
  auto engine = Create("null");
  ASSERT_NE(engine, nullptr);
  std::vector<int32_t> table = {0};
  std::vector<float> logits(engine->config().vocab_size);
  const int32_t token = 3;
  SequenceStep step{{&token, 1}, 0, table, true};
  ASSERT_TRUE(engine->Forward({&step, 1}, logits).ok());
  EXPECT_EQ(engine->last_step_stats().routed_expert_reads, 0);
}

}  // namespace
}  // namespace cohort
