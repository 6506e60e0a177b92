#include "worker/model/synthetic.h"

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace cohort {
namespace {

// The published config.json files, less the keys Cohort does not read.
constexpr const char* kDeepseekV2Lite = R"({
  "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
  "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408,
  "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16,
  "q_lora_rank": null, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
  "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1,
  "moe_layer_freq": 1, "n_group": 1, "topk_group": 1, "topk_method": "greedy", "scoring_func": "softmax",
  "norm_topk_prob": false, "routed_scaling_factor": 1.0, "rms_norm_eps": 1e-6,
  "max_position_embeddings": 163840, "rope_theta": 10000,
  "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                   "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
  "attention_bias": false, "tie_word_embeddings": false, "bos_token_id": 100000, "eos_token_id": 100001
})";

constexpr const char* kDeepseekV3 = R"({
  "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
  "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
  "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128,
  "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
  "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8, "first_k_dense_replace": 3,
  "moe_layer_freq": 1, "n_group": 8, "topk_group": 4, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
  "norm_topk_prob": true, "routed_scaling_factor": 2.5, "rms_norm_eps": 1e-6,
  "max_position_embeddings": 163840, "rope_theta": 10000,
  "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                   "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
  "attention_bias": false, "tie_word_embeddings": false, "bos_token_id": 0, "eos_token_id": 1
})";

}  // namespace

absl::StatusOr<ModelConfig> SyntheticModelConfig(std::string_view model, int64_t num_layers) {
  const std::string_view preset = model.substr(kSyntheticPrefix.size());
  const char* text = preset == "deepseek-v2-lite" ? kDeepseekV2Lite : preset == "deepseek-v3" ? kDeepseekV3 : nullptr;
  if (!IsSyntheticModel(model) || text == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("unknown synthetic model '", std::string(model),
                                                   "': use synthetic:deepseek-v2-lite or synthetic:deepseek-v3"));
  }
  nlohmann::json json = nlohmann::json::parse(text);
  if (num_layers < 0) return absl::InvalidArgumentError(absl::StrCat("--num-layers must be >= 0, got ", num_layers));
  if (num_layers > 0) json["num_hidden_layers"] = num_layers;
  return ParseModelConfig(json.dump(), std::string(model));
}

}  // namespace cohort
