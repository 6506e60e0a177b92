// What one engine step had to move and compute, from the model's shapes alone: the numbers behind
// the batching-economics metrics (worker/server/metrics.h) and the GPU benchmarks.
//
//   const StepCost cost = EstimateStepCost(engine.config(), batch, engine.last_step_stats().routed_expert_reads,
//                                          engine.weight_value_bytes(), kv_value_bytes);
//   const double bandwidth_fraction = cost.memory_bytes() / step_seconds / peaks.memory_bandwidth_bytes_per_s;
//
// It is the traffic of an ideal kernel: every weight the step uses read once, every cache entry a
// sequence attends to read once per sequence, nothing re-read and no activations counted. A real
// kernel moves at least this much, so the fractions it yields are lower bounds on how busy the
// device was.
//
// Weights (values x weight_value_bytes), per layer: the attention projections (q_a_proj, its norm and
// q_b_proj with q LoRA, else q_proj; kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj; their
// biases when attention_bias) and both layer norms; the dense MLP for dense layers; for MoE layers the
// router gate, the shared experts and `routed_expert_reads` routed experts (3 x hidden x
// moe_intermediate_size values each). Plus one embedding row per token, and the final norm and the
// whole LM head when any sequence computes logits. Not counted: V3's e_score_correction_bias
// (n_routed_experts float32 values per layer).
//
// KV: a sequence with n new tokens from start_position s reads s + n entries per layer (the cache
// up to the end of its new tokens: its last token attends to all of them, and this step's own
// entries are read back from the cache) and writes n. An entry is kv_cache_width() values x
// kv_value_bytes, per layer.
//
// FLOPs (multiply and add = 2): every token goes through every dense weight it uses (attention
// projections, dense MLP or router + shared experts, and num_experts_per_tok routed experts), the LM
// head runs once per sequence with compute_logits, and attention is counted in the absorbed MLA form
// the CPU engine and DeepSeek's decode use: per head, a token at position p scores p + 1 cache entries
// against its latent and rope query (kv_lora_rank + qk_rope_head_dim) and sums p + 1 latents
// (kv_lora_rank), with kv_b_proj applied once per token (to the query and to the attention output),
// not once per cache entry. The expanded form a prefill kernel may use instead (kv_b_proj applied to
// every cached latent, then ordinary attention over qk_head_dim and v_head_dim) does more work; it is
// not what this counts. Causal masking is exact (no masked half counted). Norms, biases, activations,
// softmax, rope and residual adds are not counted.
#pragma once

#include <cstdint>
#include <span>

#include "worker/model/config.h"
#include "worker/model/engine.h"

namespace cohort {

struct StepCost {
  int64_t weight_bytes = 0;    // weights read
  int64_t kv_read_bytes = 0;   // cache entries attended to
  int64_t kv_write_bytes = 0;  // cache entries written (this step's tokens)
  double flops = 0;            // floating-point operations (a count, not a rate)

  int64_t memory_bytes() const { return weight_bytes + kv_read_bytes + kv_write_bytes; }
};

// `routed_expert_reads`: (MoE layer, routed expert) pairs that got at least one token this step
// (Engine::last_step_stats()); `weight_value_bytes`: bytes per stored weight value
// (Engine::weight_value_bytes()); `kv_value_bytes`: bytes per cached value. An empty batch costs nothing.
StepCost EstimateStepCost(const ModelConfig& config, std::span<const SequenceStep> batch, int64_t routed_expert_reads,
                          int64_t weight_value_bytes, int64_t kv_value_bytes);

// The peak rates a step's achieved rates are fractions of, for all the devices one worker drives.
struct DevicePeaks {
  double memory_bandwidth_bytes_per_s = 0;
  double flops_per_s = 0;
};

// One NVIDIA H200 SXM, from its datasheet: 4.8 TB/s of HBM3e, 989 TFLOP/s dense bf16 (1979 with
// structured sparsity, which nothing here uses).
inline constexpr DevicePeaks kH200Peaks{.memory_bandwidth_bytes_per_s = 4.8e12, .flops_per_s = 989e12};

}  // namespace cohort
