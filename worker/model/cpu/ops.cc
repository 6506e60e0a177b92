#include "worker/model/cpu/ops.h"

#include <algorithm>
#include <cmath>

namespace cohort::cpu {

float Dot(const float* a, const float* b, int64_t n) {
  // Eight independent partial sums let the compiler vectorise without reassociating.
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int k = 0; k < 8; ++k) acc[k] += a[i + k] * b[i + k];
  }
  float tail = 0.0f;
  for (; i < n; ++i) tail += a[i] * b[i];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

void Linear(const float* x, int64_t rows, int64_t in, const float* w, int64_t out, const float* bias, float* y) {
#pragma omp parallel for schedule(static) if (rows * in * out > (1 << 16))
  for (int64_t o = 0; o < out; ++o) {
    const float* w_row = w + o * in;
    const float b = bias != nullptr ? bias[o] : 0.0f;
    for (int64_t r = 0; r < rows; ++r) y[r * out + o] = Dot(x + r * in, w_row, in) + b;
  }
}

void RmsNorm(const float* x, const float* weight, int64_t rows, int64_t dim, float eps, float* y) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    float* yr = y + r * dim;
    const float mean_square = Dot(xr, xr, dim) / static_cast<float>(dim);
    const float inv = 1.0f / std::sqrt(mean_square + eps);
    for (int64_t i = 0; i < dim; ++i) yr[i] = weight[i] * (xr[i] * inv);
  }
}

void SiluMul(float* gate, const float* up, int64_t n) {
  for (int64_t i = 0; i < n; ++i) gate[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

void Softmax(float* x, int64_t n) {
  const float max = *std::max_element(x, x + n);
  float sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) sum += x[i] = std::exp(x[i] - max);
  const float inv = 1.0f / sum;
  for (int64_t i = 0; i < n; ++i) x[i] *= inv;
}

}  // namespace cohort::cpu
