// bf16 vectors as kernels of this directory load them: 8 values in 16 bytes (device code only).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace cohort::kernels {

// out[0..7] = the 8 bf16 values packed in v, in order.
__device__ __forceinline__ void Bf16x8ToFloat(const uint4& v, float* out) {
  const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(pairs[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

}  // namespace cohort::kernels
