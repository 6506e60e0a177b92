#include "worker/model/cpu/weights.h"

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "worker/model/cpu/ops.h"

namespace cohort::cpu {
namespace {

class Loader {
 public:
  Loader(const ModelConfig& config, const Checkpoint& checkpoint) : c_(config), ckpt_(checkpoint) {}

  absl::StatusOr<std::vector<float>> Vector(const std::string& name, int64_t size) const {
    return ckpt_.ReadFloat32(name, {size});
  }

  absl::StatusOr<LinearWeights> Linear(const std::string& prefix, int64_t out, int64_t in, bool bias) const {
    LinearWeights w{out, in, {}, {}};
    COHORT_ASSIGN_OR_RETURN(w.weight, ckpt_.ReadFloat32(prefix + ".weight", {out, in}));
    if (bias) {
      COHORT_ASSIGN_OR_RETURN(w.bias, ckpt_.ReadFloat32(prefix + ".bias", {out}));
    }
    return w;
  }

  absl::StatusOr<MlpWeights> Mlp(const std::string& prefix, int64_t intermediate) const {
    MlpWeights m;
    COHORT_ASSIGN_OR_RETURN(m.gate, Linear(prefix + ".gate_proj", intermediate, c_.hidden_size, false));
    COHORT_ASSIGN_OR_RETURN(m.up, Linear(prefix + ".up_proj", intermediate, c_.hidden_size, false));
    COHORT_ASSIGN_OR_RETURN(m.down, Linear(prefix + ".down_proj", c_.hidden_size, intermediate, false));
    return m;
  }

  absl::StatusOr<AttentionWeights> Attention(const std::string& prefix) const {
    AttentionWeights a;
    const int64_t heads = c_.num_heads;
    const bool bias = c_.attention_bias;
    if (c_.q_lora_rank > 0) {
      COHORT_ASSIGN_OR_RETURN(a.q_a_proj, Linear(prefix + ".q_a_proj", c_.q_lora_rank, c_.hidden_size, bias));
      COHORT_ASSIGN_OR_RETURN(a.q_a_layernorm, Vector(prefix + ".q_a_layernorm.weight", c_.q_lora_rank));
      COHORT_ASSIGN_OR_RETURN(a.q_b_proj, Linear(prefix + ".q_b_proj", heads * c_.qk_head_dim(), c_.q_lora_rank, false));
    } else {
      COHORT_ASSIGN_OR_RETURN(a.q_proj, Linear(prefix + ".q_proj", heads * c_.qk_head_dim(), c_.hidden_size, false));
    }
    COHORT_ASSIGN_OR_RETURN(a.kv_a_proj_with_mqa,
                            Linear(prefix + ".kv_a_proj_with_mqa", c_.kv_cache_width(), c_.hidden_size, bias));
    COHORT_ASSIGN_OR_RETURN(a.kv_a_layernorm, Vector(prefix + ".kv_a_layernorm.weight", c_.kv_lora_rank));
    COHORT_ASSIGN_OR_RETURN(a.kv_b_proj, Linear(prefix + ".kv_b_proj", heads * (c_.qk_nope_head_dim + c_.v_head_dim),
                                                c_.kv_lora_rank, false));
    COHORT_ASSIGN_OR_RETURN(a.o_proj, Linear(prefix + ".o_proj", c_.hidden_size, heads * c_.v_head_dim, bias));
    return a;
  }

  absl::StatusOr<MoeWeights> Moe(const std::string& prefix) const {
    MoeWeights m;
    COHORT_ASSIGN_OR_RETURN(m.gate, Linear(prefix + ".gate", c_.n_routed_experts, c_.hidden_size, false));
    const std::string bias_name = prefix + ".gate.e_score_correction_bias";
    if (ckpt_.Has(bias_name)) {
      COHORT_ASSIGN_OR_RETURN(m.e_score_correction_bias, Vector(bias_name, c_.n_routed_experts));
    } else if (c_.topk_method == TopkMethod::kNoAuxTc) {
      return absl::NotFoundError(absl::StrCat(ckpt_.dir(), ": missing tensor '", bias_name,
                                              "' (noaux_tc routing needs the correction bias)"));
    }
    m.experts.reserve(c_.n_routed_experts);
    for (int64_t e = 0; e < c_.n_routed_experts; ++e) {
      COHORT_ASSIGN_OR_RETURN(auto expert, Mlp(absl::StrCat(prefix, ".experts.", e), c_.moe_intermediate_size));
      m.experts.push_back(std::move(expert));
    }
    if (c_.n_shared_experts > 0) {
      COHORT_ASSIGN_OR_RETURN(m.shared_experts,
                              Mlp(prefix + ".shared_experts", c_.moe_intermediate_size * c_.n_shared_experts));
    }
    return m;
  }

 private:
  const ModelConfig& c_;
  const Checkpoint& ckpt_;
};

}  // namespace

void LinearWeights::Apply(const float* x, int64_t rows, float* y) const {
  Linear(x, rows, in, weight.data(), out, bias.empty() ? nullptr : bias.data(), y);
}

absl::StatusOr<ModelWeights> LoadModelWeights(const ModelConfig& c, const Checkpoint& ckpt) {
  Loader load(c, ckpt);
  ModelWeights w;
  COHORT_ASSIGN_OR_RETURN(w.embed_tokens, ckpt.ReadFloat32("model.embed_tokens.weight", {c.vocab_size, c.hidden_size}));
  COHORT_ASSIGN_OR_RETURN(w.norm, load.Vector("model.norm.weight", c.hidden_size));
  if (ckpt.Has("lm_head.weight") || !c.tie_word_embeddings) {
    COHORT_ASSIGN_OR_RETURN(w.lm_head, ckpt.ReadFloat32("lm_head.weight", {c.vocab_size, c.hidden_size}));
  } else {
    w.lm_head = w.embed_tokens;
  }
  w.layers.resize(c.num_layers);
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const std::string prefix = absl::StrCat("model.layers.", i);
    LayerWeights& layer = w.layers[i];
    COHORT_ASSIGN_OR_RETURN(layer.input_layernorm, load.Vector(prefix + ".input_layernorm.weight", c.hidden_size));
    COHORT_ASSIGN_OR_RETURN(layer.post_attention_layernorm,
                            load.Vector(prefix + ".post_attention_layernorm.weight", c.hidden_size));
    COHORT_ASSIGN_OR_RETURN(layer.attention, load.Attention(prefix + ".self_attn"));
    if (c.IsMoeLayer(i)) {
      COHORT_ASSIGN_OR_RETURN(layer.moe, load.Moe(prefix + ".mlp"));
    } else {
      COHORT_ASSIGN_OR_RETURN(layer.mlp, load.Mlp(prefix + ".mlp", c.intermediate_size));
    }
  }
  return w;
}

}  // namespace cohort::cpu
