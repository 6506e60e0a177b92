#include "worker/model/step_cost.h"

namespace cohort {

StepCost EstimateStepCost(const ModelConfig& c, std::span<const SequenceStep> batch, int64_t routed_expert_reads,
                          int64_t weight_value_bytes, int64_t kv_value_bytes) {
  int64_t tokens = 0;
  int64_t logit_rows = 0;
  int64_t kv_entries_read = 0;  // per layer, all sequences
  int64_t attended = 0;         // sum over tokens of the entries each attends to (position + 1)
  for (const SequenceStep& seq : batch) {
    const int64_t n = static_cast<int64_t>(seq.tokens.size()), start = seq.start_position;
    tokens += n;
    logit_rows += seq.compute_logits ? 1 : 0;
    kv_entries_read += start + n;
    attended += n * start + n * (n + 1) / 2;
  }
  StepCost cost;
  if (tokens == 0) return cost;

  const int64_t h = c.hidden_size, heads = c.num_heads, rank = c.kv_lora_rank;
  const int64_t bias = c.attention_bias ? 1 : 0;
  // Matrices every token multiplies through, and the vectors (norms, biases) read beside them.
  const int64_t q_matrices = c.q_lora_rank > 0 ? h * c.q_lora_rank + c.q_lora_rank * heads * c.qk_head_dim()
                                               : h * heads * c.qk_head_dim();
  const int64_t attention_matrices = q_matrices + h * c.kv_cache_width() +
                                     rank * heads * (c.qk_nope_head_dim + c.v_head_dim) + heads * c.v_head_dim * h;
  const int64_t attention_vectors = (c.q_lora_rank > 0 ? c.q_lora_rank * (1 + bias) : 0) + rank +
                                    bias * (c.kv_cache_width() + h) + 2 * h;  // + both layer norms
  const int64_t expert = 3 * h * c.moe_intermediate_size;

  int64_t weight_values = tokens * h;  // embedding rows
  int64_t matrix_values_per_token = 0;
  for (int64_t layer = 0; layer < c.num_layers; ++layer) {
    weight_values += attention_matrices + attention_vectors;
    matrix_values_per_token += attention_matrices;
    if (c.IsMoeLayer(layer)) {
      const int64_t router_and_shared = c.n_routed_experts * h + c.n_shared_experts * expert;
      weight_values += router_and_shared;
      matrix_values_per_token += router_and_shared + c.num_experts_per_tok * expert;
    } else {
      weight_values += 3 * h * c.intermediate_size;
      matrix_values_per_token += 3 * h * c.intermediate_size;
    }
  }
  weight_values += routed_expert_reads * expert;
  if (logit_rows > 0) weight_values += h + c.vocab_size * h;  // final norm and LM head

  const int64_t kv_bytes_per_token = c.num_layers * c.kv_cache_width() * kv_value_bytes;
  cost.weight_bytes = weight_values * weight_value_bytes;
  cost.kv_read_bytes = kv_entries_read * kv_bytes_per_token;
  cost.kv_write_bytes = tokens * kv_bytes_per_token;
  // Per layer and head, each attended entry: a score over the latent and the rope key, then a
  // weighted sum of the latent.
  const double attention_flops_per_entry =
      2.0 * static_cast<double>(c.num_layers * heads * (2 * rank + c.qk_rope_head_dim));
  cost.flops = 2.0 * static_cast<double>(matrix_values_per_token) * static_cast<double>(tokens) +
               2.0 * static_cast<double>(c.vocab_size * h) * static_cast<double>(logit_rows) +
               attention_flops_per_entry * static_cast<double>(attended);
  return cost;
}

}  // namespace cohort
