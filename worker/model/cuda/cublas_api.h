// cuBLAS, loaded when the CUDA engine starts rather than linked. Linked, libcublasLt's 94 KB of
// static thread-local storage would be carved out of every thread's stack in every process that
// links the engine, GPU or not; civetweb (the metrics server) starts its threads with 100 KB
// stacks, which then fail to start. Loaded with dlopen, its thread-local storage is allocated only
// by the threads that use it.
//
//   COHORT_ASSIGN_OR_RETURN(const CublasApi* cublas, CublasApi::Load());
//   COHORT_RETURN_IF_ERROR(CublasStatus(cublas->create(&handle), "cublasCreate"));
#pragma once

#include <cublas_v2.h>

#include "absl/status/statusor.h"

namespace cohort::cuda {

struct CublasApi {
  decltype(&cublasCreate_v2) create = nullptr;
  decltype(&cublasDestroy_v2) destroy = nullptr;
  decltype(&cublasSetStream_v2) set_stream = nullptr;
  decltype(&cublasSetWorkspace_v2) set_workspace = nullptr;
  // The 32-bit-size overload (C++ sees two).
  cublasStatus_t (*gemm_strided_batched_ex)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int,
                                            const void*, const void*, cudaDataType, int, long long int, const void*,
                                            cudaDataType, int, long long int, const void*, void*, cudaDataType, int,
                                            long long int, int, cublasComputeType_t, cublasGemmAlgo_t) = nullptr;
  decltype(&cublasGetStatusName) status_name = nullptr;

  // The process's one copy, loaded on first use; FailedPrecondition naming the library when it
  // cannot be found or lacks a function.
  static absl::StatusOr<const CublasApi*> Load();
};

// OK, or Internal naming `what` and the cuBLAS status.
absl::Status CublasStatus(cublasStatus_t status, const char* what);

}  // namespace cohort::cuda
