#include "worker/model/routing.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "common/status.h"

namespace cohort {
namespace {

// Indices of the k largest values, largest first; ties go to the lower index.
void TopKIndices(std::span<const float> values, int64_t k, std::vector<int32_t>& out) {
  out.resize(values.size());
  std::iota(out.begin(), out.end(), 0);
  std::partial_sort(out.begin(), out.begin() + k, out.end(), [&](int32_t a, int32_t b) {
    return values[a] > values[b] || (values[a] == values[b] && a < b);
  });
  out.resize(k);
}

}  // namespace

TopkRouter::TopkRouter(const ModelConfig& c)
    : num_experts_(c.n_routed_experts),
      top_k_(c.num_experts_per_tok),
      n_group_(c.n_group),
      topk_group_(c.topk_group),
      scoring_(c.scoring_func),
      method_(c.topk_method),
      normalize_(c.norm_topk_prob),
      scaling_(static_cast<float>(c.routed_scaling_factor)) {}

void TopkRouter::Select(std::span<const float> router_logits, std::span<const float> correction_bias,
                        std::span<int32_t> experts, std::span<float> weights) const {
  COHORT_CHECK(static_cast<int64_t>(router_logits.size()) == num_experts_, "router logits ",
               router_logits.size(), " != experts ", num_experts_);
  COHORT_CHECK(static_cast<int64_t>(experts.size()) == top_k_ && weights.size() == experts.size());
  COHORT_CHECK(correction_bias.empty() || static_cast<int64_t>(correction_bias.size()) == num_experts_);

  std::vector<float> scores(num_experts_);
  if (scoring_ == ScoringFunc::kSigmoid) {
    for (int64_t e = 0; e < num_experts_; ++e) scores[e] = 1.0f / (1.0f + std::exp(-router_logits[e]));
  } else {
    const float max = *std::max_element(router_logits.begin(), router_logits.end());
    float sum = 0.0f;
    for (int64_t e = 0; e < num_experts_; ++e) sum += scores[e] = std::exp(router_logits[e] - max);
    for (float& s : scores) s /= sum;
  }

  std::vector<float> choice(scores);
  if (!correction_bias.empty()) {
    for (int64_t e = 0; e < num_experts_; ++e) choice[e] += correction_bias[e];
  }

  if (method_ != TopkMethod::kGreedy && topk_group_ < n_group_) {
    const int64_t per_group = num_experts_ / n_group_;
    std::vector<float> group_scores(n_group_);
    for (int64_t g = 0; g < n_group_; ++g) {
      std::span<const float> group(choice.data() + g * per_group, per_group);
      if (method_ == TopkMethod::kNoAuxTc) {  // sum of the two best
        std::vector<float> sorted(group.begin(), group.end());
        std::partial_sort(sorted.begin(), sorted.begin() + 2, sorted.end(), std::greater<>());
        group_scores[g] = sorted[0] + sorted[1];
      } else {
        group_scores[g] = *std::max_element(group.begin(), group.end());
      }
    }
    std::vector<int32_t> kept_groups;
    TopKIndices(group_scores, topk_group_, kept_groups);
    std::vector<bool> keep(n_group_, false);
    for (int32_t g : kept_groups) keep[g] = true;
    for (int64_t e = 0; e < num_experts_; ++e) {
      if (!keep[e / per_group]) choice[e] = -std::numeric_limits<float>::infinity();
    }
  }

  std::vector<int32_t> chosen;
  TopKIndices(choice, top_k_, chosen);
  float sum = 0.0f;
  for (int64_t i = 0; i < top_k_; ++i) {
    experts[i] = chosen[i];
    weights[i] = scores[chosen[i]];
    sum += weights[i];
  }
  if (normalize_) {
    for (float& w : weights) w /= sum + 1e-20f;
  }
  for (float& w : weights) w *= scaling_;
}

}  // namespace cohort
