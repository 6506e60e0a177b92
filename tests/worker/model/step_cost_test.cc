#include "worker/model/step_cost.h"

#include <deque>
#include <vector>

#include "gtest/gtest.h"

namespace cohort {
namespace {

// Two layers, the first dense and the second MoE, no q LoRA, no biases: small enough to count by hand.
//   attention matrices per layer: q_proj 8*2*(2+2) = 64, kv_a_proj_with_mqa 8*(4+2) = 48,
//     kv_b_proj 4*2*(2+2) = 32, o_proj 2*2*8 = 32: 176; plus kv_a_layernorm 4 and two layer norms 16.
//   dense MLP 3*8*6 = 144. MoE: router 4*8 = 32, one shared expert 3*8*3 = 72, each routed expert 72.
//   layer 0: 176 + 4 + 16 + 144 = 340 values; layer 1 without routed experts: 176 + 4 + 16 + 32 + 72 = 300.
ModelConfig SmallConfig() {
  ModelConfig c;
  c.vocab_size = 16;
  c.hidden_size = 8;
  c.intermediate_size = 6;
  c.moe_intermediate_size = 3;
  c.num_layers = 2;
  c.num_heads = 2;
  c.kv_lora_rank = 4;
  c.qk_nope_head_dim = 2;
  c.qk_rope_head_dim = 2;
  c.v_head_dim = 2;
  c.max_position_embeddings = 4096;
  c.n_routed_experts = 4;
  c.n_shared_experts = 1;
  c.num_experts_per_tok = 2;
  c.first_k_dense_replace = 1;
  return c;
}

// A batch whose sequences own their tokens (SequenceStep only points at them).
struct Batch {
  std::deque<std::vector<int32_t>> tokens;  // growing it moves no element
  std::vector<SequenceStep> steps;

  Batch& Add(int64_t num_tokens, int64_t start, bool logits = true) {
    tokens.emplace_back(num_tokens, 3);
    steps.push_back({tokens.back(), start, {}, logits});
    return *this;
  }
};

TEST(StepCostTest, OneDecodeTokenCountedByHand) {
  Batch b;
  b.Add(1, 5);
  const StepCost cost = EstimateStepCost(SmallConfig(), b.steps, /*routed_expert_reads=*/2,
                                         /*weight_value_bytes=*/4, /*kv_value_bytes=*/2);
  // 8 (embedding row) + 340 + 300 + 2 routed experts * 72 + final norm 8 + LM head 16*8: 928 values.
  EXPECT_EQ(cost.weight_bytes, 928 * 4);
  // 2 layers * (4 + 2) values * 2 bytes = 24 bytes per token; positions 0..5 are read, 5 is written.
  EXPECT_EQ(cost.kv_read_bytes, 6 * 24);
  EXPECT_EQ(cost.kv_write_bytes, 24);
  // Matrices per token: layer 0 176 + 144, layer 1 176 + 32 + 72 + 2 * 72: 744 -> 1488 FLOPs; LM head
  // 2 * 128 = 256; attention: 6 entries * 2 layers * 2 heads * 2 * (2 * 4 + 2) = 480.
  EXPECT_DOUBLE_EQ(cost.flops, 1488 + 256 + 480);
  EXPECT_EQ(cost.memory_bytes(), 928 * 4 + 7 * 24);
}

TEST(StepCostTest, PrefillChunkWithoutLogitsSkipsTheHeadAndCountsCausalAttention) {
  Batch b;
  b.Add(3, 2, /*logits=*/false);
  const StepCost cost = EstimateStepCost(SmallConfig(), b.steps, 3, 2, 2);
  // 3 embedding rows + 340 + 300 + 3 * 72, no final norm or LM head.
  EXPECT_EQ(cost.weight_bytes, (24 + 640 + 216) * 2);
  EXPECT_EQ(cost.kv_read_bytes, 5 * 24);  // positions 0..4
  EXPECT_EQ(cost.kv_write_bytes, 3 * 24);
  // Tokens at positions 2, 3, 4 attend to 3 + 4 + 5 = 12 entries, 80 FLOPs each.
  EXPECT_DOUBLE_EQ(cost.flops, 2.0 * 744 * 3 + 12 * 80);
}

TEST(StepCostTest, EmptyBatchCostsNothing) {
  const StepCost cost = EstimateStepCost(SmallConfig(), {}, 0, 4, 4);
  EXPECT_EQ(cost.memory_bytes(), 0);
  EXPECT_EQ(cost.flops, 0);
}

TEST(StepCostTest, WeightsAreSharedByTheBatchAndExpertsAddTheirSize) {
  const ModelConfig c = SmallConfig();
  Batch one, many;
  one.Add(1, 10);
  for (int i = 0; i < 32; ++i) many.Add(1, 10);
  const StepCost a = EstimateStepCost(c, one.steps, 2, 4, 4);
  const StepCost b = EstimateStepCost(c, many.steps, 2, 4, 4);
  // 31 more decodes with the same experts read 31 more embedding rows, nothing else of the weights.
  EXPECT_EQ(b.weight_bytes - a.weight_bytes, 31 * c.hidden_size * 4);
  // Their KV and FLOPs scale with them.
  EXPECT_EQ(b.kv_read_bytes, 32 * a.kv_read_bytes);
  EXPECT_EQ(b.kv_write_bytes, 32 * a.kv_write_bytes);
  EXPECT_DOUBLE_EQ(b.flops, 32 * a.flops);
  // Each further routed expert read is one expert's weights; it changes no FLOP (top-k fixes those).
  const StepCost more_experts = EstimateStepCost(c, many.steps, 4, 4, 4);
  EXPECT_EQ(more_experts.weight_bytes - b.weight_bytes, 2 * 3 * c.hidden_size * c.moe_intermediate_size * 4);
  EXPECT_EQ(more_experts.flops, b.flops);
}

TEST(StepCostTest, KvReadGrowsWithContextAndAttentionFlopsWithIt) {
  const ModelConfig c = SmallConfig();
  Batch short_context, long_context;
  short_context.Add(1, 10);
  long_context.Add(1, 110);
  const StepCost a = EstimateStepCost(c, short_context.steps, 2, 4, 2);
  const StepCost b = EstimateStepCost(c, long_context.steps, 2, 4, 2);
  const int64_t bytes_per_token = c.num_layers * c.kv_cache_width() * 2;
  EXPECT_EQ(b.kv_read_bytes - a.kv_read_bytes, 100 * bytes_per_token);
  EXPECT_EQ(b.kv_write_bytes, a.kv_write_bytes);
  EXPECT_EQ(b.weight_bytes, a.weight_bytes);
  EXPECT_DOUBLE_EQ(b.flops - a.flops, 100.0 * 80);
}

// With every expert read, one token's step reads the whole model but the embedding table (one row of
// it instead); with exactly top-k experts it reads what CountParameters calls active, plus that row.
TEST(StepCostTest, AgreesWithCountParameters) {
  for (bool q_lora : {false, true}) {
    for (bool tied : {false, true}) {
      ModelConfig c = SmallConfig();
      c.q_lora_rank = q_lora ? 5 : 0;
      c.tie_word_embeddings = tied;
      c.num_layers = 4;
      c.first_k_dense_replace = 1;
      c.moe_layer_freq = 2;  // MoE: layer 2 only
      const ParameterCounts counts = CountParameters(c);
      int64_t moe_layers = 0;
      for (int64_t l = 0; l < c.num_layers; ++l) moe_layers += c.IsMoeLayer(l) ? 1 : 0;
      ASSERT_GT(moe_layers, 0);
      Batch b;
      b.Add(1, 0);
      const int64_t embedding = c.vocab_size * c.hidden_size;
      const StepCost all = EstimateStepCost(c, b.steps, moe_layers * c.n_routed_experts, 1, 1);
      EXPECT_EQ(all.weight_bytes, counts.total - (tied ? 0 : embedding) + c.hidden_size) << q_lora << tied;
      const StepCost active = EstimateStepCost(c, b.steps, moe_layers * c.num_experts_per_tok, 1, 1);
      EXPECT_EQ(active.weight_bytes, counts.active_per_token + c.hidden_size) << q_lora << tied;
      // FLOPs: 2 per active value except the norms (final, two per layer, q_a and kv_a layernorms), plus
      // attention over the one entry at position 0.
      const int64_t norms = c.hidden_size + c.num_layers * (2 * c.hidden_size + c.q_lora_rank + c.kv_lora_rank);
      const int64_t attention = c.num_layers * c.num_heads * 2 * (2 * c.kv_lora_rank + c.qk_rope_head_dim);
      EXPECT_DOUBLE_EQ(active.flops, 2.0 * (counts.active_per_token - norms) + attention) << q_lora << tied;
    }
  }
}

TEST(StepCostTest, AttentionBiasesAreWeightsToo) {
  ModelConfig c = SmallConfig();
  c.q_lora_rank = 5;
  Batch b;
  b.Add(1, 0);
  const StepCost without = EstimateStepCost(c, b.steps, 2, 1, 1);
  c.attention_bias = true;
  const StepCost with = EstimateStepCost(c, b.steps, 2, 1, 1);
  // q_a_proj (5), kv_a_proj_with_mqa (4 + 2) and o_proj (8) biases, in both layers.
  EXPECT_EQ(with.weight_bytes - without.weight_bytes, 2 * (5 + 6 + 8));
}

}  // namespace
}  // namespace cohort
