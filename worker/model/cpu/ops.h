// Float32 building blocks of the CPU reference backend. Every output element is computed by one
// thread in a fixed order, so results do not depend on the batch around a row or the thread count.
#pragma once

#include <cstdint>

namespace cohort::cpu {

float Dot(const float* a, const float* b, int64_t n);

// y[i, o] = dot(x[i, :], w[o, :]) (+ bias[o]) for x [rows, in], w [out, in] (PyTorch's Linear).
void Linear(const float* x, int64_t rows, int64_t in, const float* w, int64_t out, const float* bias, float* y);

// y = x / sqrt(mean(x^2) + eps) * weight, row by row; y may alias x.
void RmsNorm(const float* x, const float* weight, int64_t rows, int64_t dim, float eps, float* y);

// gate[i] = silu(gate[i]) * up[i]
void SiluMul(float* gate, const float* up, int64_t n);

// In-place softmax of n values.
void Softmax(float* x, int64_t n);

}  // namespace cohort::cpu
