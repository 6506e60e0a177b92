// The residual RMSNorm's arithmetic (kernels::LaunchAddRmsNorm), shared with the MoE route that
// normalises its own token (LaunchMoeRoute with a MoeRouteNorm), so that both give the same values
// bit for bit (device code only).
//
// A row of `dim` values is spread over RmsNormThreads(dim) threads: thread x holds values
// x + j * threads, j < kNormValuesPerThread, in registers, so every load of the row is in flight
// before the first reduction and nothing is read twice. It sums their squares in j order; the block
// then sums over its warps in kernels::BlockSum's order, and
//   out = bf16(value * rsqrt(sum / dim + eps) * weight).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace cohort::kernels {

constexpr int kNormValuesPerThread = 8;
constexpr int kNormMaxDim = 1024 * kNormValuesPerThread;

// The threads a row of `dim` values is spread over: a multiple of 32, at least 32.
__host__ __device__ constexpr int RmsNormThreads(int dim) {
  const int warps = (dim + kNormValuesPerThread * 32 - 1) / (kNormValuesPerThread * 32);
  return warps > 1 ? warps * 32 : 32;
}

// A delta value as it joins the residual: bf16 as stored, or an fp32 sum rounded to bf16 first.
__device__ __forceinline__ float DeltaValue(__nv_bfloat16 d) { return __bfloat162float(d); }
__device__ __forceinline__ float DeltaValue(float d) { return __bfloat162float(__float2bfloat16(d)); }

// One thread's share of a row: `x` its index among the row's `threads`; values past dim are 0.
struct NormSlice {
  int x, threads, dim;
  __device__ __forceinline__ int Index(int j) const { return x + j * threads; }
  __device__ __forceinline__ bool Has(int j) const { return Index(j) < dim; }
};

// A share of a row that every thread fills (dim = threads * kNormValuesPerThread, x < threads): no
// index needs a bound check, so no load is behind a branch.
struct FullNormSlice {
  int x, threads;
  __device__ __forceinline__ int Index(int j) const { return x + j * threads; }
  __device__ __forceinline__ bool Has(int) const { return true; }
};

template <class Slice>
__device__ __forceinline__ void LoadNormWeights(const __nv_bfloat16* __restrict__ weight, const Slice& s,
                                                float (&w)[kNormValuesPerThread]) {
#pragma unroll
  for (int j = 0; j < kNormValuesPerThread; ++j) w[j] = s.Has(j) ? __bfloat162float(weight[s.Index(j)]) : 0.0f;
}

template <class Slice>
__device__ __forceinline__ void LoadResidual(const float* __restrict__ row, const Slice& s,
                                             float (&h)[kNormValuesPerThread]) {
#pragma unroll
  for (int j = 0; j < kNormValuesPerThread; ++j) h[j] = s.Has(j) ? row[s.Index(j)] : 0.0f;
}

// v = h + delta (delta nullable: + 0), in place over h; returns the sum of v's squares in j order.
template <class Slice, typename Delta>
__device__ __forceinline__ float AddDelta(const Delta* __restrict__ delta_row, const Slice& s,
                                          float (&v)[kNormValuesPerThread]) {
  if (delta_row != nullptr) {
#pragma unroll
    for (int j = 0; j < kNormValuesPerThread; ++j) {
      if (s.Has(j)) v[j] += DeltaValue(delta_row[s.Index(j)]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < kNormValuesPerThread; ++j) v[j] += 0.0f;  // -0 as +0, as h + 0 always gave
  }
  float sum_sq = 0.0f;
#pragma unroll
  for (int j = 0; j < kNormValuesPerThread; ++j) sum_sq += v[j] * v[j];
  return sum_sq;
}

// The row's scale from the block's sum of squares.
__device__ __forceinline__ float InvRms(float sum_sq, int dim, float eps) { return rsqrtf(sum_sq / dim + eps); }

// residual_row = v (when it is not null), out_row = bf16(v * inv_rms * w).
template <class Slice>
__device__ __forceinline__ void StoreNormRow(const Slice& s, const float (&v)[kNormValuesPerThread],
                                             const float (&w)[kNormValuesPerThread], float inv_rms,
                                             float* __restrict__ residual_row, __nv_bfloat16* __restrict__ out_row) {
#pragma unroll
  for (int j = 0; j < kNormValuesPerThread; ++j) {
    if (!s.Has(j)) continue;
    if (residual_row != nullptr) residual_row[s.Index(j)] = v[j];
    out_row[s.Index(j)] = __float2bfloat16(v[j] * inv_rms * w[j]);
  }
}

}  // namespace cohort::kernels
