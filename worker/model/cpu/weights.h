// The model's weights for the CPU backend, upcast to float32 and laid out as published
// ([out, in] row-major, as torch.nn.Linear stores them).
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/model/checkpoint.h"
#include "worker/model/config.h"

namespace cohort::cpu {

struct LinearWeights {
  int64_t out = 0;
  int64_t in = 0;
  std::vector<float> weight;  // [out, in]
  std::vector<float> bias;    // [out] or empty

  void Apply(const float* x, int64_t rows, float* y) const;
};

// down(silu(gate(x)) * up(x)): dense layers, shared experts and each routed expert.
struct MlpWeights {
  LinearWeights gate, up, down;
};

struct AttentionWeights {
  std::optional<LinearWeights> q_proj;  // without q LoRA
  std::optional<LinearWeights> q_a_proj, q_b_proj;
  std::vector<float> q_a_layernorm;
  LinearWeights kv_a_proj_with_mqa;     // hidden -> kv_lora_rank + qk_rope_head_dim
  std::vector<float> kv_a_layernorm;
  LinearWeights kv_b_proj;              // kv_lora_rank -> heads * (qk_nope + v_head)
  LinearWeights o_proj;
};

struct MoeWeights {
  LinearWeights gate;                        // router: hidden -> n_routed_experts
  std::vector<float> e_score_correction_bias;  // empty unless the checkpoint has it
  std::vector<MlpWeights> experts;
  std::optional<MlpWeights> shared_experts;
};

struct LayerWeights {
  std::vector<float> input_layernorm;
  std::vector<float> post_attention_layernorm;
  AttentionWeights attention;
  std::optional<MlpWeights> mlp;  // dense layers
  std::optional<MoeWeights> moe;  // MoE layers
};

struct ModelWeights {
  std::vector<float> embed_tokens;  // [vocab, hidden]
  std::vector<LayerWeights> layers;
  std::vector<float> norm;
  std::vector<float> lm_head;       // [vocab, hidden]; the embedding when tied
};

absl::StatusOr<ModelWeights> LoadModelWeights(const ModelConfig& config, const Checkpoint& checkpoint);

}  // namespace cohort::cpu
