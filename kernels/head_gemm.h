// The per-head products of MLA decode past a few tokens: the absorbed queries (q_nope . W_uk) and
// the attention's values (o_latent . W_uv^T). Each is a batch over the heads of [rows, k] times a
// small weight matrix [n_out, k]^T (V2-Lite: 128 x 512 or 512 x 128, 2 MB over all heads), between
// two launches of the attention's chain, where a library product's launch and ramp cost more than
// its bytes and arithmetic.
//
//   y[b][m, n] = sum_k x[b][m, k] * w[b][n, k]      b < batch, m < rows, n < n_out; fp32 accumulation
//
// Elements are addressed as in SkinnyGemmParams (kernels/skinny_gemm.h): (b, m, k) of x at
// x[b * x_batch_stride + m * x_row_stride + k], and likewise for w and y; y is bf16 and only its
// [batch][rows, n_out] elements are written.
//
// A block takes one head's 64 output columns and 16, 32 or 64 rows: it copies its slice of the
// weights into shared memory before it waits for the previous kernel (programmatic dependent launch,
// kernels/pdl.cuh), then its rows, and multiplies on tensor cores (mma.sync). Capturable in a CUDA
// graph. Made for a few dozen rows: each tile reads its head's weights and rows again, so at 128-512
// rows cuBLAS is 1.5-3x faster on an H200 (tests/kernels/skinny_gemm_bench.cc).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace cohort::kernels {

inline constexpr int kHeadGemmMaxK = 512;
inline constexpr int kHeadGemmMaxRows = 65535 * 16;  // tiles of 16 rows along a grid's z

struct HeadGemmParams {
  const __nv_bfloat16* x = nullptr;  // [batch][rows, k], or null with x_fp32
  const float* x_fp32 = nullptr;     // instead of x: fp32 rows, each value rounded to bf16 as it is read
  int64_t x_row_stride = 0;          // of x or x_fp32, in its elements
  int64_t x_batch_stride = 0;
  const __nv_bfloat16* w = nullptr;  // [batch][n_out, k]
  int64_t w_row_stride = 0;
  int64_t w_batch_stride = 0;
  __nv_bfloat16* y = nullptr;  // [batch][rows, n_out]
  int64_t y_row_stride = 0;
  int64_t y_batch_stride = 0;
  int rows = 0;   // 1..kHeadGemmMaxRows
  int n_out = 0;  // >= 8, a multiple of 8
  int k = 0;      // 16..kHeadGemmMaxK, a multiple of 16
  int batch = 1;  // 1..65535
};

// Whether `p` is inside the contract: rows, n_out, k and batch in range; exactly one of x and x_fp32,
// w and y not null; all three 16-byte aligned, strides non-negative multiples of 16 bytes;
// y_row_stride >= n_out when rows > 1. Host only.
bool HeadGemmSupports(const HeadGemmParams& p);

// cudaErrorInvalidValue outside the contract (HeadGemmSupports), otherwise the launch's error.
cudaError_t LaunchHeadGemm(const HeadGemmParams& p, cudaStream_t stream);

}  // namespace cohort::kernels
