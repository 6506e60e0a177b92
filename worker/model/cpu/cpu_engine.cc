#include "worker/model/cpu/cpu_engine.h"

#include <omp.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "common/status.h"
#include "worker/model/cpu/ops.h"
#include "worker/model/cpu/weights.h"
#include "worker/model/rope.h"
#include "worker/model/routing.h"

namespace cohort::cpu {
namespace {

// q_a_layernorm and kv_a_layernorm use the RMSNorm default, not rms_norm_eps (as DeepSeek's code does).
constexpr float kLatentNormEps = 1e-6f;

class CpuEngine final : public Engine {
 public:
  CpuEngine(ModelConfig config, ModelWeights weights, KvCacheGeometry geometry)
      : config_(std::move(config)),
        weights_(std::move(weights)),
        geometry_(geometry),
        rope_(config_),
        router_(config_),
        // Not zeroed: every slot is written before it is read, and untouched pages cost nothing.
        kv_cache_(std::make_unique_for_overwrite<float[]>(static_cast<size_t>(config_.num_layers) *
                                                          geometry.num_blocks * geometry.block_size_tokens *
                                                          config_.kv_cache_width())) {}

  const ModelConfig& config() const override { return config_; }
  const KvCacheGeometry& kv_geometry() const override { return geometry_; }

  absl::Status Forward(std::span<const SequenceStep> batch, std::span<float> logits) override;
  StepStats last_step_stats() const override { return last_step_stats_; }

 private:
  // Where position `pos` of a sequence lives in layer `layer` of the cache.
  float* CacheSlot(int64_t layer, std::span<const int32_t> block_table, int64_t pos) {
    const int64_t block = block_table[pos / geometry_.block_size_tokens];
    const int64_t offset = pos % geometry_.block_size_tokens;
    return kv_cache_.get() +
           ((layer * geometry_.num_blocks + block) * geometry_.block_size_tokens + offset) * config_.kv_cache_width();
  }

  void Attention(int64_t layer, const float* x, float* out);
  void Mlp(const MlpWeights& mlp, const float* x, int64_t rows, float* out);
  void Moe(const MoeWeights& moe, const float* x, float* out);

  ModelConfig config_;
  ModelWeights weights_;
  KvCacheGeometry geometry_;
  Rope rope_;
  TopkRouter router_;
  std::unique_ptr<float[]> kv_cache_;  // [layer][block][slot][kv_lora_rank + qk_rope_head_dim]

  // Per-step token layout, rebuilt by Forward.
  std::span<const SequenceStep> batch_;
  std::vector<int64_t> token_position_;
  std::vector<int32_t> token_sequence_;
  StepStats last_step_stats_;  // of the last Forward that passed validation
};

absl::Status CpuEngine::Forward(std::span<const SequenceStep> batch, std::span<float> logits) {
  COHORT_RETURN_IF_ERROR(ValidateBatch(config_, geometry_, batch, logits.size()));
  const int64_t hidden = config_.hidden_size;

  batch_ = batch;
  last_step_stats_ = {};
  token_position_.clear();
  token_sequence_.clear();
  std::vector<int32_t> tokens;
  for (size_t s = 0; s < batch.size(); ++s) {
    for (size_t i = 0; i < batch[s].tokens.size(); ++i) {
      tokens.push_back(batch[s].tokens[i]);
      token_position_.push_back(batch[s].start_position + static_cast<int64_t>(i));
      token_sequence_.push_back(static_cast<int32_t>(s));
    }
  }
  const int64_t num_tokens = static_cast<int64_t>(tokens.size());

  std::vector<float> h(num_tokens * hidden), x(num_tokens * hidden), delta(num_tokens * hidden);
  for (int64_t t = 0; t < num_tokens; ++t) {
    std::copy_n(weights_.embed_tokens.data() + tokens[t] * hidden, hidden, h.data() + t * hidden);
  }
  for (int64_t l = 0; l < config_.num_layers; ++l) {
    const LayerWeights& layer = weights_.layers[l];
    RmsNorm(h.data(), layer.input_layernorm.data(), num_tokens, hidden, config_.rms_norm_eps, x.data());
    Attention(l, x.data(), delta.data());
    for (int64_t i = 0; i < num_tokens * hidden; ++i) h[i] += delta[i];

    RmsNorm(h.data(), layer.post_attention_layernorm.data(), num_tokens, hidden, config_.rms_norm_eps, x.data());
    if (layer.moe) {
      Moe(*layer.moe, x.data(), delta.data());
    } else {
      Mlp(*layer.mlp, x.data(), num_tokens, delta.data());
    }
    for (int64_t i = 0; i < num_tokens * hidden; ++i) h[i] += delta[i];
  }

  // Final norm and LM head for the last token of each sequence that asked for logits.
  std::vector<float> last;
  int64_t t = 0;
  for (const SequenceStep& seq : batch) {
    t += static_cast<int64_t>(seq.tokens.size());
    if (seq.compute_logits) last.insert(last.end(), h.begin() + (t - 1) * hidden, h.begin() + t * hidden);
  }
  const int64_t rows = static_cast<int64_t>(last.size()) / hidden;
  RmsNorm(last.data(), weights_.norm.data(), rows, hidden, config_.rms_norm_eps, last.data());
  cpu::Linear(last.data(), rows, hidden, weights_.lm_head.data(), config_.vocab_size, nullptr, logits.data());
  return absl::OkStatus();
}

// MLA with the latent cache: kv_b_proj's key half is absorbed into the query and its value half
// applied after the attention-weighted sum of latents, so attention reads only the cache.
void CpuEngine::Attention(int64_t layer, const float* x, float* out) {
  const AttentionWeights& w = weights_.layers[layer].attention;
  const int64_t num_tokens = static_cast<int64_t>(token_position_.size());
  const int64_t heads = config_.num_heads, rank = config_.kv_lora_rank, rope_dim = config_.qk_rope_head_dim;
  const int64_t nope = config_.qk_nope_head_dim, v_dim = config_.v_head_dim, qk_dim = config_.qk_head_dim();
  const int64_t width = config_.kv_cache_width();

  std::vector<float> q(num_tokens * heads * qk_dim);
  if (w.q_proj) {
    w.q_proj->Apply(x, num_tokens, q.data());
  } else {
    std::vector<float> q_latent(num_tokens * config_.q_lora_rank);
    w.q_a_proj->Apply(x, num_tokens, q_latent.data());
    RmsNorm(q_latent.data(), w.q_a_layernorm.data(), num_tokens, config_.q_lora_rank, kLatentNormEps,
            q_latent.data());
    w.q_b_proj->Apply(q_latent.data(), num_tokens, q.data());
  }

  // This step's latents and rope keys go into the cache first, so that tokens of one sequence in
  // this step see each other (causally) through the cache like any earlier token.
  std::vector<float> kv(num_tokens * width);
  w.kv_a_proj_with_mqa.Apply(x, num_tokens, kv.data());
  for (int64_t t = 0; t < num_tokens; ++t) {
    float* entry = kv.data() + t * width;
    RmsNorm(entry, w.kv_a_layernorm.data(), 1, rank, kLatentNormEps, entry);
    rope_.Apply({entry + rank, static_cast<size_t>(rope_dim)}, token_position_[t]);
    std::copy_n(entry, width, CacheSlot(layer, batch_[token_sequence_[t]].block_table, token_position_[t]));
  }

  std::vector<float> attn(num_tokens * heads * v_dim);
  const float scale = rope_.softmax_scale();
  const float* kv_b = w.kv_b_proj.weight.data();  // [heads * (nope + v_dim), rank]
#pragma omp parallel for schedule(dynamic)
  for (int64_t th = 0; th < num_tokens * heads; ++th) {
    const int64_t t = th / heads, head = th % heads;
    const int64_t pos = token_position_[t];
    std::span<const int32_t> table = batch_[token_sequence_[t]].block_table;
    const float* q_head = q.data() + (t * heads + head) * qk_dim;
    const float* w_key = kv_b + head * (nope + v_dim) * rank;  // [nope, rank]
    const float* w_value = w_key + nope * rank;                // [v_dim, rank]

    std::vector<float> q_rope(q_head + nope, q_head + qk_dim);
    rope_.Apply(q_rope, pos);
    std::vector<float> q_latent(rank, 0.0f);  // q_nope absorbed through W_key: W_key^T q_nope
    for (int64_t d = 0; d < nope; ++d) {
      for (int64_t r = 0; r < rank; ++r) q_latent[r] += q_head[d] * w_key[d * rank + r];
    }

    std::vector<float> scores(pos + 1);
    for (int64_t j = 0; j <= pos; ++j) {
      const float* entry = CacheSlot(layer, table, j);
      scores[j] = (Dot(q_latent.data(), entry, rank) + Dot(q_rope.data(), entry + rank, rope_dim)) * scale;
    }
    Softmax(scores.data(), pos + 1);
    std::vector<float> latent_sum(rank, 0.0f);
    for (int64_t j = 0; j <= pos; ++j) {
      const float* entry = CacheSlot(layer, table, j);
      for (int64_t r = 0; r < rank; ++r) latent_sum[r] += scores[j] * entry[r];
    }
    float* o = attn.data() + (t * heads + head) * v_dim;
    for (int64_t v = 0; v < v_dim; ++v) o[v] = Dot(w_value + v * rank, latent_sum.data(), rank);
  }
  w.o_proj.Apply(attn.data(), num_tokens, out);
}

void CpuEngine::Mlp(const MlpWeights& mlp, const float* x, int64_t rows, float* out) {
  const int64_t inter = mlp.gate.out;
  std::vector<float> gate(rows * inter), up(rows * inter);
  mlp.gate.Apply(x, rows, gate.data());
  mlp.up.Apply(x, rows, up.data());
  SiluMul(gate.data(), up.data(), rows * inter);
  mlp.down.Apply(gate.data(), rows, out);
}

void CpuEngine::Moe(const MoeWeights& moe, const float* x, float* out) {
  const int64_t num_tokens = static_cast<int64_t>(token_position_.size());
  const int64_t hidden = config_.hidden_size, num_experts = config_.n_routed_experts;
  const int64_t top_k = config_.num_experts_per_tok;

  std::vector<float> router_logits(num_tokens * num_experts);
  moe.gate.Apply(x, num_tokens, router_logits.data());
  std::vector<int32_t> chosen(num_tokens * top_k);
  std::vector<float> chosen_weight(num_tokens * top_k);
  for (int64_t t = 0; t < num_tokens; ++t) {
    router_.Select({router_logits.data() + t * num_experts, static_cast<size_t>(num_experts)},
                   moe.e_score_correction_bias,
                   {chosen.data() + t * top_k, static_cast<size_t>(top_k)},
                   {chosen_weight.data() + t * top_k, static_cast<size_t>(top_k)});
  }

  // Group tokens by expert and run each expert once over its tokens. Experts are visited in index
  // order, so each token sums its experts in the same order whatever else is in the batch.
  std::vector<std::vector<std::pair<int64_t, float>>> routed_to(num_experts);
  for (int64_t t = 0; t < num_tokens; ++t) {
    for (int64_t k = 0; k < top_k; ++k) routed_to[chosen[t * top_k + k]].emplace_back(t, chosen_weight[t * top_k + k]);
  }
  std::fill(out, out + num_tokens * hidden, 0.0f);
  std::vector<float> xs, ys;
  for (int64_t e = 0; e < num_experts; ++e) {
    const auto& assigned = routed_to[e];
    if (assigned.empty()) continue;
    ++last_step_stats_.routed_expert_reads;
    const int64_t rows = static_cast<int64_t>(assigned.size());
    xs.resize(rows * hidden);
    ys.resize(rows * hidden);
    for (int64_t i = 0; i < rows; ++i) std::copy_n(x + assigned[i].first * hidden, hidden, xs.data() + i * hidden);
    Mlp(moe.experts[e], xs.data(), rows, ys.data());
    for (int64_t i = 0; i < rows; ++i) {
      float* dst = out + assigned[i].first * hidden;
      const float weight = assigned[i].second;
      for (int64_t d = 0; d < hidden; ++d) dst[d] += ys[i * hidden + d] * weight;
    }
  }
  if (moe.shared_experts) {
    std::vector<float> shared(num_tokens * hidden);
    Mlp(*moe.shared_experts, x, num_tokens, shared.data());
    for (int64_t i = 0; i < num_tokens * hidden; ++i) out[i] += shared[i];
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<Engine>> CreateCpuEngine(const EngineOptions& options, ModelConfig config,
                                                        const Checkpoint& checkpoint) {
  if (options.num_threads > 0) omp_set_num_threads(options.num_threads);
  COHORT_ASSIGN_OR_RETURN(const KvCacheGeometry geometry, PlanKvCache(options, config, sizeof(float)));
  COHORT_ASSIGN_OR_RETURN(ModelWeights weights, LoadModelWeights(config, checkpoint));
  return std::make_unique<CpuEngine>(std::move(config), std::move(weights), geometry);
}

}  // namespace cohort::cpu
