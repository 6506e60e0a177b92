// The model's shape and behaviour, read from a Hugging Face config.json of the DeepSeek-V2/V3
// family. Published keys (`rope_theta`, `rope_scaling`) and transformers' newer `rope_parameters`
// are both accepted.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "absl/status/statusor.h"

namespace cohort {

enum class Architecture { kDeepseekV2, kDeepseekV3 };

enum class ScoringFunc { kSoftmax, kSigmoid };

enum class TopkMethod {
  kGreedy,              // V2: top-k over all experts
  kGroupLimitedGreedy,  // V2: keep the topk_group groups with the highest max score, then top-k
  kNoAuxTc,             // V3: keep the groups with the highest sum of top-2 biased scores, then top-k
};

struct RopeConfig {
  double theta = 10000.0;
  bool yarn = false;
  // YaRN; meaningful only when `yarn`.
  double factor = 1.0;
  int64_t original_max_position_embeddings = 0;
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  double mscale = 0.0;          // 0: not given
  double mscale_all_dim = 0.0;  // 0: not given
  std::optional<double> attention_factor;
  bool truncate = true;
};

struct ModelConfig {
  Architecture architecture = Architecture::kDeepseekV3;
  std::string architecture_name;
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;      // dense MLP layers
  int64_t moe_intermediate_size = 0;  // per routed expert; shared experts are n_shared times this
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t q_lora_rank = 0;            // 0: no q LoRA (q_proj)
  int64_t kv_lora_rank = 0;
  int64_t qk_nope_head_dim = 0;
  int64_t qk_rope_head_dim = 0;
  int64_t v_head_dim = 0;
  int64_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  bool attention_bias = false;
  bool tie_word_embeddings = false;
  bool rope_interleave = true;
  RopeConfig rope;

  // Mixture of experts.
  int64_t n_routed_experts = 0;       // 0: every layer is dense
  int64_t n_shared_experts = 0;
  int64_t num_experts_per_tok = 0;
  int64_t first_k_dense_replace = 0;
  int64_t moe_layer_freq = 1;
  int64_t n_group = 1;
  int64_t topk_group = 1;
  ScoringFunc scoring_func = ScoringFunc::kSoftmax;
  TopkMethod topk_method = TopkMethod::kGreedy;
  bool norm_topk_prob = false;
  double routed_scaling_factor = 1.0;

  std::optional<int64_t> bos_token_id;
  std::optional<int64_t> eos_token_id;

  int64_t qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }
  // Values cached per token and layer: the compressed latent plus the shared rope key.
  int64_t kv_cache_width() const { return kv_lora_rank + qk_rope_head_dim; }
  bool IsMoeLayer(int64_t layer) const {
    return n_routed_experts > 0 && layer >= first_k_dense_replace && layer % moe_layer_freq == 0;
  }
};

struct ParameterCounts {
  int64_t total = 0;
  int64_t active_per_token = 0;  // what one token's forward pass reads: routed experts counted top-k times
};
ParameterCounts CountParameters(const ModelConfig& config);

// Parses config.json text. `source` names the file in error messages.
absl::StatusOr<ModelConfig> ParseModelConfig(const std::string& json_text, const std::string& source);
// Reads `<dir>/config.json`.
absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& model_dir);

}  // namespace cohort
