// Rotary position embedding for MLA's rope dimensions, with DeepSeek's YaRN context extension.
//
// Numerics follow transformers' `_compute_yarn_parameters` and DeepSeek's reference: inverse
// frequencies blend interpolated and extrapolated ones along a linear ramp between the correction
// dimensions of beta_fast and beta_slow; cos and sin are multiplied by the attention factor
// (mscale / mscale_all_dim), and the softmax scale by mscale_all_dim's mscale squared.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "worker/model/config.h"

namespace cohort {

// YaRN's attention-scale correction: 0.1 * mscale * ln(scale) + 1 for scale > 1, else 1.
double YarnMscale(double scale, double mscale);

class Rope {
 public:
  explicit Rope(const ModelConfig& config);

  // One inverse frequency per rotated pair (qk_rope_head_dim / 2 of them).
  const std::vector<float>& inv_freq() const { return inv_freq_; }
  // Multiplies cos and sin (1 without YaRN).
  float attention_factor() const { return attention_factor_; }
  // Scale of q.k before the softmax: qk_head_dim^-0.5, times the YaRN mscale squared.
  float softmax_scale() const { return softmax_scale_; }

  // Rotates one head's rope part (qk_rope_head_dim values) in place for `position`. Interleaved
  // layouts rotate pairs (2i, 2i+1); the other rotates (i, i + dim/2). Either way q and k are
  // rotated alike, which is all the dot product needs.
  void Apply(std::span<float> x, int64_t position) const;

 private:
  std::vector<float> inv_freq_;
  float attention_factor_ = 1.0f;
  float softmax_scale_ = 1.0f;
  bool interleave_ = true;
};

}  // namespace cohort
