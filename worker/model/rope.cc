#include "worker/model/rope.h"

#include <algorithm>
#include <cmath>

#include "common/status.h"

namespace cohort {

double YarnMscale(double scale, double mscale) {
  if (scale <= 1.0) return 1.0;
  return 0.1 * mscale * std::log(scale) + 1.0;
}

Rope::Rope(const ModelConfig& config) : interleave_(config.rope_interleave) {
  const int64_t dim = config.qk_rope_head_dim;
  const RopeConfig& rope = config.rope;
  inv_freq_.resize(dim / 2);
  softmax_scale_ = static_cast<float>(1.0 / std::sqrt(static_cast<double>(config.qk_head_dim())));

  if (!rope.yarn) {
    for (int64_t i = 0; i < dim / 2; ++i) {
      inv_freq_[i] = static_cast<float>(1.0 / std::pow(rope.theta, static_cast<double>(2 * i) / dim));
    }
    return;
  }

  // Dimension whose wavelength makes `rotations` turns over the original context.
  auto correction_dim = [&](double rotations) {
    return dim * std::log(rope.original_max_position_embeddings / (rotations * 2 * M_PI)) /
           (2 * std::log(rope.theta));
  };
  double low = correction_dim(rope.beta_fast);
  double high = correction_dim(rope.beta_slow);
  if (rope.truncate) {
    low = std::floor(low);
    high = std::ceil(high);
  }
  low = std::max(low, 0.0);
  high = std::min(high, static_cast<double>(dim - 1));
  if (low == high) high += 0.001;  // avoid a zero-width ramp

  for (int64_t i = 0; i < dim / 2; ++i) {
    const double pos_freq = std::pow(rope.theta, static_cast<double>(2 * i) / dim);
    const double extrapolated = 1.0 / pos_freq;
    const double interpolated = 1.0 / (rope.factor * pos_freq);
    const double ramp = std::clamp((i - low) / (high - low), 0.0, 1.0);
    const double extrapolation_weight = 1.0 - ramp;
    inv_freq_[i] = static_cast<float>(interpolated * (1.0 - extrapolation_weight) +
                                      extrapolated * extrapolation_weight);
  }

  if (rope.attention_factor) {
    attention_factor_ = static_cast<float>(*rope.attention_factor);
  } else if (rope.mscale != 0.0 && rope.mscale_all_dim != 0.0) {
    attention_factor_ = static_cast<float>(YarnMscale(rope.factor, rope.mscale) /
                                           YarnMscale(rope.factor, rope.mscale_all_dim));
  } else {
    attention_factor_ = static_cast<float>(YarnMscale(rope.factor, 1.0));
  }
  if (rope.mscale_all_dim != 0.0) {
    const double m = YarnMscale(rope.factor, rope.mscale_all_dim);
    softmax_scale_ = static_cast<float>(softmax_scale_ * m * m);
  }
}

void Rope::Apply(std::span<float> x, int64_t position) const {
  const size_t half = inv_freq_.size();
  COHORT_CHECK(x.size() == 2 * half, "rope width ", x.size(), " != ", 2 * half);
  for (size_t i = 0; i < half; ++i) {
    // The angle is formed in float32, as the reference does.
    const float angle = inv_freq_[i] * static_cast<float>(position);
    const float c = std::cos(angle) * attention_factor_;
    const float s = std::sin(angle) * attention_factor_;
    float& a = interleave_ ? x[2 * i] : x[i];
    float& b = interleave_ ? x[2 * i + 1] : x[i + half];
    const float a0 = a, b0 = b;
    a = a0 * c - b0 * s;
    b = b0 * c + a0 * s;
  }
}

}  // namespace cohort
