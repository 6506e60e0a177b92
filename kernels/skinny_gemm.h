// Small-M dense products for decode steps ("skinny GEMM"): a few activation rows times a large bf16
// weight matrix in torch Linear layout [n_out, k], where the weights are nearly all the traffic and
// the kernel should stream them at close to copy bandwidth.
//
//   y[b][m, n] = sum_k x[b][m, k] * w[b][n, k]      b < batch, m < rows, n < n_out; fp32 accumulation
//
// Element (b, m, k) of x is x[b * x_batch_stride + m * x_row_stride + k], (b, n, k) of w is
// w[b * w_batch_stride + n * w_row_stride + k] and (b, m, n) of y is
// y[b * y_batch_stride + m * y_row_stride + n]; strides are in elements. Only those elements of y
// are written: rows >= rows and columns >= n_out of y keep what they held. y must not overlap x or w.
// With a tail (tail_from < n_out), columns n >= tail_from go to y_tail instead, always in fp32:
// (b, m, n) at y_tail[b * y_tail_batch_stride + m * y_tail_row_stride + n - tail_from]. One product
// then serves two consumers, such as an output projection whose last rows are the router's folded
// into it (DeviceLayer::router_folded, worker/model/cuda/device_weights.h).
//
// Tensor cores with the operands swapped (y^T = w . x^T: 16 weight rows are the mma's M, 8 activation
// rows its N), weights loaded from global memory straight into registers, K split over the warps of a
// block and, for small n_out, over the blocks of a thread-block cluster (k_splits). Launched with
// programmatic dependent launch (kernels/pdl.cuh): each block prefetches the start of its weight slice
// into L2 before waiting for the previous kernel, and reads x only after. Capturable in a CUDA graph.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <climits>
#include <cstdint>

namespace cohort::kernels {

inline constexpr int kSkinnyMaxRows = 32;
inline constexpr int kSkinnyMaxKSplits = 8;
inline constexpr int kSkinnyMaxTailRows = 16;  // rows of a product with a tail (y_tail)

struct SkinnyGemmParams {
  const __nv_bfloat16* x = nullptr;  // [batch][rows, k]
  int64_t x_row_stride = 0;
  int64_t x_batch_stride = 0;
  const __nv_bfloat16* w = nullptr;  // [batch][n_out, k]
  int64_t w_row_stride = 0;
  int64_t w_batch_stride = 0;
  void* y = nullptr;  // [batch][rows, n_out]: float when y_fp32, else __nv_bfloat16
  int64_t y_row_stride = 0;
  int64_t y_batch_stride = 0;
  bool y_fp32 = false;
  float* y_tail = nullptr;  // [batch][rows, n_out - tail_from], when tail_from < n_out
  int64_t y_tail_row_stride = 0;
  int64_t y_tail_batch_stride = 0;
  int tail_from = INT32_MAX;  // the first column written to y_tail; > 0
  int rows = 0;   // 1..kSkinnyMaxRows
  int n_out = 0;  // >= 1
  int k = 0;      // 8..2^30, a multiple of 8
  int batch = 1;  // 1..65535
  // Blocks (one thread-block cluster) that share one tile of output columns, each taking a part of
  // K. 0 chooses from the shape and the device's SM count; 1..kSkinnyMaxKSplits forces it (tests,
  // tuning). The result does not depend on it beyond fp32 summation order.
  int k_splits = 0;
};

// Whether `p` is inside the contract: rows, n_out, k and batch in range; no null pointer; x, w and
// y 16-byte aligned; strides non-negative multiples of 16 bytes; y_row_stride >= n_out when rows > 1
// (>= tail_from with a tail, which needs rows <= kSkinnyMaxTailRows and its own row stride >= n_out -
// tail_from); k_splits in range. Host only.
bool SkinnyGemmSupports(const SkinnyGemmParams& p);

// cudaErrorInvalidValue outside the contract (SkinnyGemmSupports), otherwise the launch's error.
cudaError_t LaunchSkinnyGemm(const SkinnyGemmParams& p, cudaStream_t stream);

}  // namespace cohort::kernels
