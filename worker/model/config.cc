#include "worker/model/config.h"

#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "nlohmann/json.hpp"

namespace cohort {
namespace {

using nlohmann::json;

// Typed access to config.json with errors that name the file and key.
class Reader {
 public:
  Reader(const json& root, const std::string& source) : root_(root), source_(source) {}

  absl::Status Error(const std::string& message) const {
    return absl::InvalidArgumentError(absl::StrCat(source_, ": ", message));
  }

  bool Has(const char* key) const { return root_.contains(key) && !root_[key].is_null(); }

  absl::StatusOr<int64_t> Int(const char* key, std::optional<int64_t> fallback = std::nullopt) const {
    if (!Has(key)) {
      if (fallback) return *fallback;
      return Error(absl::StrCat("missing key '", key, "'"));
    }
    const json& v = root_[key];
    if (!v.is_number_integer()) return Error(absl::StrCat("'", key, "' must be an integer"));
    return v.get<int64_t>();
  }

  absl::StatusOr<double> Number(const char* key, std::optional<double> fallback = std::nullopt) const {
    if (!Has(key)) {
      if (fallback) return *fallback;
      return Error(absl::StrCat("missing key '", key, "'"));
    }
    const json& v = root_[key];
    if (!v.is_number()) return Error(absl::StrCat("'", key, "' must be a number"));
    return v.get<double>();
  }

  absl::StatusOr<bool> Bool(const char* key, bool fallback) const {
    if (!Has(key)) return fallback;
    if (!root_[key].is_boolean()) return Error(absl::StrCat("'", key, "' must be true or false"));
    return root_[key].get<bool>();
  }

  absl::StatusOr<std::string> String(const char* key, std::string fallback) const {
    if (!Has(key)) return fallback;
    if (!root_[key].is_string()) return Error(absl::StrCat("'", key, "' must be a string"));
    return root_[key].get<std::string>();
  }

 private:
  const json& root_;
  const std::string& source_;
};

absl::Status ParseRope(const json& root, const Reader& top, const std::string& source, ModelConfig& c) {
  // transformers >= 5 writes `rope_parameters` (with rope_theta inside); published checkpoints have
  // `rope_theta` at the top and an optional `rope_scaling`.
  const json* params = nullptr;
  const char* params_key = nullptr;
  for (const char* key : {"rope_parameters", "rope_scaling"}) {
    if (root.contains(key) && root[key].is_object()) {
      params = &root[key];
      params_key = key;
      break;
    }
  }
  COHORT_ASSIGN_OR_RETURN(c.rope.theta, top.Number("rope_theta", 10000.0));
  if (params == nullptr) return absl::OkStatus();

  const std::string where = absl::StrCat(source, " (", params_key, ")");
  Reader r(*params, where);
  if (r.Has("rope_theta")) {
    COHORT_ASSIGN_OR_RETURN(c.rope.theta, r.Number("rope_theta"));
  }
  std::string type;
  COHORT_ASSIGN_OR_RETURN(type, r.String("rope_type", ""));
  if (type.empty()) {
    COHORT_ASSIGN_OR_RETURN(type, r.String("type", "default"));
  }
  if (type == "default") return absl::OkStatus();
  if (type != "yarn") {
    return r.Error(absl::StrCat("rope type '", type, "' is not supported (DeepSeek models use 'yarn' or 'default')"));
  }
  c.rope.yarn = true;
  COHORT_ASSIGN_OR_RETURN(int64_t orig_top, top.Int("original_max_position_embeddings", c.max_position_embeddings));
  COHORT_ASSIGN_OR_RETURN(c.rope.original_max_position_embeddings,
                          r.Int("original_max_position_embeddings", orig_top));
  if (c.rope.original_max_position_embeddings <= 0) {
    return r.Error("original_max_position_embeddings must be positive");
  }
  COHORT_ASSIGN_OR_RETURN(
      c.rope.factor,
      r.Number("factor", static_cast<double>(c.max_position_embeddings) / c.rope.original_max_position_embeddings));
  COHORT_ASSIGN_OR_RETURN(c.rope.beta_fast, r.Number("beta_fast", 32.0));
  COHORT_ASSIGN_OR_RETURN(c.rope.beta_slow, r.Number("beta_slow", 1.0));
  COHORT_ASSIGN_OR_RETURN(c.rope.mscale, r.Number("mscale", 0.0));
  COHORT_ASSIGN_OR_RETURN(c.rope.mscale_all_dim, r.Number("mscale_all_dim", 0.0));
  COHORT_ASSIGN_OR_RETURN(c.rope.truncate, r.Bool("truncate", true));
  if (r.Has("attention_factor")) {
    COHORT_ASSIGN_OR_RETURN(double af, r.Number("attention_factor"));
    c.rope.attention_factor = af;
  }
  if (c.rope.factor <= 0) return r.Error("factor must be positive");
  return absl::OkStatus();
}

absl::Status Validate(const ModelConfig& c, const Reader& r) {
  auto positive = [&](int64_t v, const char* key) -> absl::Status {
    if (v <= 0) return r.Error(absl::StrCat("'", key, "' must be positive, got ", v));
    return absl::OkStatus();
  };
  COHORT_RETURN_IF_ERROR(positive(c.vocab_size, "vocab_size"));
  COHORT_RETURN_IF_ERROR(positive(c.hidden_size, "hidden_size"));
  COHORT_RETURN_IF_ERROR(positive(c.num_layers, "num_hidden_layers"));
  COHORT_RETURN_IF_ERROR(positive(c.num_heads, "num_attention_heads"));
  COHORT_RETURN_IF_ERROR(positive(c.kv_lora_rank, "kv_lora_rank"));
  COHORT_RETURN_IF_ERROR(positive(c.qk_nope_head_dim, "qk_nope_head_dim"));
  COHORT_RETURN_IF_ERROR(positive(c.qk_rope_head_dim, "qk_rope_head_dim"));
  COHORT_RETURN_IF_ERROR(positive(c.v_head_dim, "v_head_dim"));
  COHORT_RETURN_IF_ERROR(positive(c.max_position_embeddings, "max_position_embeddings"));
  if (c.qk_rope_head_dim % 2 != 0) return r.Error("'qk_rope_head_dim' must be even");
  if (c.q_lora_rank < 0) return r.Error("'q_lora_rank' must be positive or null");
  if (c.first_k_dense_replace > 0 || c.n_routed_experts == 0) {
    COHORT_RETURN_IF_ERROR(positive(c.intermediate_size, "intermediate_size"));
  }
  if (c.n_routed_experts > 0) {
    COHORT_RETURN_IF_ERROR(positive(c.moe_intermediate_size, "moe_intermediate_size"));
    COHORT_RETURN_IF_ERROR(positive(c.num_experts_per_tok, "num_experts_per_tok"));
    COHORT_RETURN_IF_ERROR(positive(c.moe_layer_freq, "moe_layer_freq"));
    COHORT_RETURN_IF_ERROR(positive(c.n_group, "n_group"));
    COHORT_RETURN_IF_ERROR(positive(c.topk_group, "topk_group"));
    if (c.n_routed_experts % c.n_group != 0) {
      return r.Error(absl::StrCat("n_routed_experts (", c.n_routed_experts, ") is not a multiple of n_group (",
                                  c.n_group, ")"));
    }
    if (c.topk_group > c.n_group) {
      return r.Error(absl::StrCat("topk_group (", c.topk_group, ") exceeds n_group (", c.n_group, ")"));
    }
    const int64_t selectable = c.topk_method == TopkMethod::kGreedy
                                   ? c.n_routed_experts
                                   : c.topk_group * (c.n_routed_experts / c.n_group);
    if (c.num_experts_per_tok > selectable) {
      return r.Error(absl::StrCat("num_experts_per_tok (", c.num_experts_per_tok, ") exceeds the ", selectable,
                                  " experts the routing can choose from"));
    }
    if (c.topk_method == TopkMethod::kNoAuxTc && c.n_routed_experts / c.n_group < 2) {
      return r.Error("noaux_tc routing needs at least 2 experts per group");
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ModelConfig> ParseModelConfig(const std::string& json_text, const std::string& source) {
  json root = json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded() || !root.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": not a JSON object"));
  }
  Reader r(root, source);
  ModelConfig c;

  if (!root.contains("architectures") || !root["architectures"].is_array() || root["architectures"].empty() ||
      !root["architectures"][0].is_string()) {
    return r.Error("missing 'architectures' (expected [\"DeepseekV3ForCausalLM\"] or [\"DeepseekV2ForCausalLM\"])");
  }
  c.architecture_name = root["architectures"][0].get<std::string>();
  if (c.architecture_name == "DeepseekV3ForCausalLM") {
    c.architecture = Architecture::kDeepseekV3;
  } else if (c.architecture_name == "DeepseekV2ForCausalLM") {
    c.architecture = Architecture::kDeepseekV2;
  } else {
    return r.Error(absl::StrCat("architecture '", c.architecture_name,
                                "' is not supported (supported: DeepseekV3ForCausalLM, DeepseekV2ForCausalLM)"));
  }
  if (root.contains("quantization_config")) {
    return r.Error("quantized checkpoints (quantization_config) are not supported yet; use bf16 weights");
  }
  const bool v3 = c.architecture == Architecture::kDeepseekV3;

  COHORT_ASSIGN_OR_RETURN(c.vocab_size, r.Int("vocab_size"));
  COHORT_ASSIGN_OR_RETURN(c.hidden_size, r.Int("hidden_size"));
  COHORT_ASSIGN_OR_RETURN(c.intermediate_size, r.Int("intermediate_size", 0));
  COHORT_ASSIGN_OR_RETURN(c.num_layers, r.Int("num_hidden_layers"));
  COHORT_ASSIGN_OR_RETURN(c.num_heads, r.Int("num_attention_heads"));
  COHORT_ASSIGN_OR_RETURN(c.q_lora_rank, r.Int("q_lora_rank", 0));
  COHORT_ASSIGN_OR_RETURN(c.kv_lora_rank, r.Int("kv_lora_rank"));
  COHORT_ASSIGN_OR_RETURN(c.qk_nope_head_dim, r.Int("qk_nope_head_dim"));
  COHORT_ASSIGN_OR_RETURN(c.qk_rope_head_dim, r.Int("qk_rope_head_dim"));
  COHORT_ASSIGN_OR_RETURN(c.v_head_dim, r.Int("v_head_dim"));
  COHORT_ASSIGN_OR_RETURN(c.max_position_embeddings, r.Int("max_position_embeddings"));
  COHORT_ASSIGN_OR_RETURN(c.rms_norm_eps, r.Number("rms_norm_eps", 1e-6));
  COHORT_ASSIGN_OR_RETURN(c.attention_bias, r.Bool("attention_bias", false));
  COHORT_ASSIGN_OR_RETURN(c.tie_word_embeddings, r.Bool("tie_word_embeddings", false));
  // V2 always rotates interleaved pairs; V3 checkpoints may say otherwise.
  COHORT_ASSIGN_OR_RETURN(c.rope_interleave, r.Bool("rope_interleave", true));
  if (!v3) c.rope_interleave = true;

  std::string act;
  COHORT_ASSIGN_OR_RETURN(act, r.String("hidden_act", "silu"));
  if (act != "silu") return r.Error(absl::StrCat("hidden_act '", act, "' is not supported (only silu)"));
  COHORT_ASSIGN_OR_RETURN(int64_t kv_heads, r.Int("num_key_value_heads", c.num_heads));
  if (kv_heads != c.num_heads) {
    return r.Error(absl::StrCat("num_key_value_heads (", kv_heads, ") must equal num_attention_heads (", c.num_heads,
                                ") for MLA"));
  }

  COHORT_ASSIGN_OR_RETURN(c.n_routed_experts, r.Int("n_routed_experts", 0));
  COHORT_ASSIGN_OR_RETURN(c.n_shared_experts, r.Int("n_shared_experts", 0));
  COHORT_ASSIGN_OR_RETURN(c.moe_intermediate_size, r.Int("moe_intermediate_size", 0));
  COHORT_ASSIGN_OR_RETURN(c.num_experts_per_tok, r.Int("num_experts_per_tok", 0));
  COHORT_ASSIGN_OR_RETURN(c.first_k_dense_replace, r.Int("first_k_dense_replace", 0));
  COHORT_ASSIGN_OR_RETURN(c.moe_layer_freq, r.Int("moe_layer_freq", 1));
  COHORT_ASSIGN_OR_RETURN(c.n_group, r.Int("n_group", 1));
  COHORT_ASSIGN_OR_RETURN(c.topk_group, r.Int("topk_group", c.n_group));
  COHORT_ASSIGN_OR_RETURN(c.norm_topk_prob, r.Bool("norm_topk_prob", false));
  COHORT_ASSIGN_OR_RETURN(c.routed_scaling_factor, r.Number("routed_scaling_factor", 1.0));

  std::string scoring, method;
  COHORT_ASSIGN_OR_RETURN(scoring, r.String("scoring_func", v3 ? "sigmoid" : "softmax"));
  COHORT_ASSIGN_OR_RETURN(method, r.String("topk_method", v3 ? "noaux_tc" : "greedy"));
  if (scoring == "softmax") {
    c.scoring_func = ScoringFunc::kSoftmax;
  } else if (scoring == "sigmoid") {
    c.scoring_func = ScoringFunc::kSigmoid;
  } else {
    return r.Error(absl::StrCat("scoring_func '", scoring, "' is not supported (softmax or sigmoid)"));
  }
  if (method == "greedy") {
    c.topk_method = TopkMethod::kGreedy;
  } else if (method == "group_limited_greedy") {
    c.topk_method = TopkMethod::kGroupLimitedGreedy;
  } else if (method == "noaux_tc") {
    c.topk_method = TopkMethod::kNoAuxTc;
  } else {
    return r.Error(absl::StrCat("topk_method '", method,
                                "' is not supported (greedy, group_limited_greedy, noaux_tc)"));
  }
  if (c.topk_method == TopkMethod::kNoAuxTc && c.scoring_func != ScoringFunc::kSigmoid) {
    return r.Error("topk_method 'noaux_tc' needs scoring_func 'sigmoid'");
  }

  auto token_id = [&](const char* key) -> absl::StatusOr<std::optional<int64_t>> {
    if (!r.Has(key)) return std::optional<int64_t>();
    const json& v = root[key];
    if (v.is_number_integer()) return std::optional<int64_t>(v.get<int64_t>());
    if (v.is_array() && !v.empty() && v[0].is_number_integer()) return std::optional<int64_t>(v[0].get<int64_t>());
    return r.Error(absl::StrCat("'", key, "' must be an integer"));
  };
  COHORT_ASSIGN_OR_RETURN(c.bos_token_id, token_id("bos_token_id"));
  COHORT_ASSIGN_OR_RETURN(c.eos_token_id, token_id("eos_token_id"));

  COHORT_RETURN_IF_ERROR(ParseRope(root, r, source, c));
  COHORT_RETURN_IF_ERROR(Validate(c, r));
  return c;
}

ParameterCounts CountParameters(const ModelConfig& c) {
  const int64_t h = c.hidden_size, heads = c.num_heads;
  int64_t attention = c.q_lora_rank > 0 ? h * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * heads * c.qk_head_dim()
                                        : h * heads * c.qk_head_dim();
  attention += h * c.kv_cache_width() + c.kv_lora_rank + c.kv_lora_rank * heads * (c.qk_nope_head_dim + c.v_head_dim) +
               heads * c.v_head_dim * h + 2 * h;
  const int64_t expert = 3 * h * c.moe_intermediate_size;
  ParameterCounts counts;
  // A token reads one row of the embedding but all of the LM head (DeepSeek's "activated" counts
  // likewise leave the embedding out).
  counts.total = c.vocab_size * h * (c.tie_word_embeddings ? 1 : 2) + h;
  counts.active_per_token = c.vocab_size * h + h;
  for (int64_t layer = 0; layer < c.num_layers; ++layer) {
    counts.total += attention;
    counts.active_per_token += attention;
    if (c.IsMoeLayer(layer)) {
      const int64_t shared = c.n_shared_experts * expert + c.n_routed_experts * h;  // with the router
      counts.total += shared + c.n_routed_experts * expert;
      counts.active_per_token += shared + c.num_experts_per_tok * expert;
    } else {
      counts.total += 3 * h * c.intermediate_size;
      counts.active_per_token += 3 * h * c.intermediate_size;
    }
  }
  return counts;
}

absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& model_dir) {
  const std::string path = model_dir + "/config.json";
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open (is --model a checkpoint folder?)"));
  std::stringstream text;
  text << in.rdbuf();
  return ParseModelConfig(text.str(), path);
}

}  // namespace cohort
