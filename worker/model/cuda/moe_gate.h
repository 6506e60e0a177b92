// A model's routing (worker/model/config.h) as the parameters of the GPU gate (kernels/moe.h).
#pragma once

#include <cstdint>

#include "kernels/moe.h"
#include "worker/model/config.h"

namespace cohort::cuda {

inline MoeGateParams MoeGateParamsFor(const ModelConfig& c) {
  MoeGateParams p;
  p.num_experts = static_cast<int32_t>(c.n_routed_experts);
  p.top_k = static_cast<int32_t>(c.num_experts_per_tok);
  p.n_group = static_cast<int32_t>(c.n_group);
  p.topk_group = static_cast<int32_t>(c.topk_group);
  p.scoring = c.scoring_func == ScoringFunc::kSigmoid ? MoeScoring::kSigmoid : MoeScoring::kSoftmax;
  p.method = c.topk_method == TopkMethod::kGreedy               ? MoeTopkMethod::kGreedy
             : c.topk_method == TopkMethod::kGroupLimitedGreedy ? MoeTopkMethod::kGroupLimitedGreedy
                                                                : MoeTopkMethod::kNoAuxTc;
  p.norm_topk_prob = c.norm_topk_prob;
  p.routed_scaling_factor = static_cast<float>(c.routed_scaling_factor);
  return p;
}

}  // namespace cohort::cuda
