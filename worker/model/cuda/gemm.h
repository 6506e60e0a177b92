// Row-major matrix products on cuBLAS (bf16 operands, fp32 accumulation), in the shapes a model
// layer uses: C[m, n] = A[m, k] . B^T with B stored [n, k] like torch.nn.Linear weights, or
// C = A . B with B stored [k, n]; optionally strided-batched (one product per attention head).
#pragma once

#include <cublas_v2.h>

#include <cstdint>

#include "absl/status/status.h"
#include "worker/model/cuda/cublas_api.h"

namespace cohort::cuda {

struct GemmOperand {
  const void* data = nullptr;
  int64_t ld = 0;            // row stride in elements
  int64_t batch_stride = 0;  // elements between batch entries
  cudaDataType_t type = CUDA_R_16BF;
};

struct GemmOutput {
  void* data = nullptr;
  int64_t ld = 0;
  int64_t batch_stride = 0;
  cudaDataType_t type = CUDA_R_16BF;
};

// C = alpha * A . op(B) + beta * C, for `batch` entries. `b_is_nk`: B is [n, k] (a Linear weight),
// else [k, n].
inline absl::Status Gemm(const CublasApi& cublas, cublasHandle_t handle, int64_t m, int64_t n, int64_t k, const GemmOperand& a,
                         const GemmOperand& b, bool b_is_nk, const GemmOutput& c, int batch = 1, float alpha = 1.0f,
                         float beta = 0.0f) {
  if (m == 0 || n == 0) return absl::OkStatus();
  // Column-major view: C^T[n, m] = op(B)^T[n, k] . A^T[k, m].
  return CublasStatus(
      cublas.gemm_strided_batched_ex(handle, b_is_nk ? CUBLAS_OP_T : CUBLAS_OP_N, CUBLAS_OP_N, static_cast<int>(n),
                                 static_cast<int>(m), static_cast<int>(k), &alpha, b.data, b.type,
                                 static_cast<int>(b.ld), b.batch_stride, a.data, a.type, static_cast<int>(a.ld),
                                 a.batch_stride, &beta, c.data, c.type, static_cast<int>(c.ld), c.batch_stride, batch,
                                 CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
      "cublasGemmStridedBatchedEx");
}

}  // namespace cohort::cuda
