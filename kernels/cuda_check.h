// CUDA and cuBLAS error plumbing for host code: every runtime call's result becomes an absl::Status
// naming the call, so a failed launch or allocation says what failed instead of crashing later.
//
//   COHORT_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream));
//   COHORT_CUDA_RETURN_IF_ERROR(LaunchRmsNorm(...));  // launchers return cudaError_t
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace cohort {

inline absl::Status CudaStatus(cudaError_t error, const char* what) {
  if (error == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": ", cudaGetErrorName(error), " (", cudaGetErrorString(error), ")"));
}

inline absl::Status CublasStatus(cublasStatus_t status, const char* what) {
  if (status == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": ", cublasGetStatusName(status), " (",
                                          cublasGetStatusString(status), ")"));
}

}  // namespace cohort

#define COHORT_CUDA_RETURN_IF_ERROR(expr)                                         \
  do {                                                                            \
    if (absl::Status _cuda_st = ::cohort::CudaStatus((expr), #expr); !_cuda_st.ok()) \
      return _cuda_st;                                                            \
  } while (0)

#define COHORT_CUBLAS_RETURN_IF_ERROR(expr)                                           \
  do {                                                                                \
    if (absl::Status _cublas_st = ::cohort::CublasStatus((expr), #expr); !_cublas_st.ok()) \
      return _cublas_st;                                                              \
  } while (0)
