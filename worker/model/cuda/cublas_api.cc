#include "worker/model/cuda/cublas_api.h"

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "worker/model/cuda/shared_library.h"

namespace cohort::cuda {
namespace {

constexpr const char* kLibrary = "libcublas.so.13";

absl::StatusOr<CublasApi> Open() {
  COHORT_ASSIGN_OR_RETURN(SharedLibrary library, SharedLibrary::Open(kLibrary, "cannot load cuBLAS"));
  CublasApi api;
  library.Bind(api.create, "cublasCreate_v2");
  library.Bind(api.destroy, "cublasDestroy_v2");
  library.Bind(api.set_stream, "cublasSetStream_v2");
  library.Bind(api.set_workspace, "cublasSetWorkspace_v2");
  library.Bind(api.gemm_strided_batched_ex, "cublasGemmStridedBatchedEx");
  library.Bind(api.status_name, "cublasGetStatusName");
  COHORT_RETURN_IF_ERROR(library.missing());
  return api;
}

}  // namespace

absl::StatusOr<const CublasApi*> CublasApi::Load() { return LoadOnce(&Open); }

absl::Status CublasStatus(cublasStatus_t status, const char* what) {
  if (status == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  absl::StatusOr<const CublasApi*> api = CublasApi::Load();  // loaded: a cuBLAS call gave `status`
  const char* name = api.ok() ? (*api)->status_name(status) : "?";
  return absl::InternalError(absl::StrCat(what, ": ", name, " (cuBLAS status ", static_cast<int>(status), ")"));
}

}  // namespace cohort::cuda
