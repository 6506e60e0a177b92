// CUDA error plumbing for host code: every runtime call's result becomes an absl::Status naming the
// call, so a failed launch or allocation says what failed instead of crashing later.
//
//   COHORT_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream));
//   COHORT_CUDA_RETURN_IF_ERROR(LaunchRmsNorm(...));  // launchers return cudaError_t
#pragma once

#include <cuda_runtime_api.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace cohort {

inline absl::Status CudaStatus(cudaError_t error, const char* what) {
  if (error == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": ", cudaGetErrorName(error), " (", cudaGetErrorString(error), ")"));
}

}  // namespace cohort

#define COHORT_CUDA_RETURN_IF_ERROR(expr)                                         \
  do {                                                                            \
    if (absl::Status _cuda_st = ::cohort::CudaStatus((expr), #expr); !_cuda_st.ok()) \
      return _cuda_st;                                                            \
  } while (0)
