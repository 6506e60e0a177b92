// Expert selection for DeepSeek MoE layers: the router's logits in, top-k experts and their
// combine weights out, for one token.
//
//   V2 greedy:              softmax, top-k of all experts.
//   V2 group_limited_greedy: softmax, keep the topk_group groups with the highest max score, top-k.
//   V3 noaux_tc:            sigmoid, add e_score_correction_bias for the choice only, keep the
//                           topk_group groups with the highest sum of their top-2 biased scores, top-k.
// Weights are the unbiased scores of the chosen experts, normalised to sum 1 when norm_topk_prob,
// times routed_scaling_factor. Experts come out in descending order of the score they were chosen by.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "worker/model/config.h"

namespace cohort {

class TopkRouter {
 public:
  explicit TopkRouter(const ModelConfig& config);

  // `correction_bias` is empty unless the model has e_score_correction_bias.
  void Select(std::span<const float> router_logits, std::span<const float> correction_bias,
              std::span<int32_t> experts, std::span<float> weights) const;

 private:
  int64_t num_experts_;
  int64_t top_k_;
  int64_t n_group_;
  int64_t topk_group_;
  ScoringFunc scoring_;
  TopkMethod method_;
  bool normalize_;
  float scaling_;
};

}  // namespace cohort
