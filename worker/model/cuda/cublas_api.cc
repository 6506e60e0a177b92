#include "worker/model/cuda/cublas_api.h"

#include <dlfcn.h>

#include <mutex>

#include "absl/strings/str_cat.h"

namespace cohort::cuda {
namespace {

constexpr const char* kLibrary = "libcublas.so.13";

absl::StatusOr<CublasApi> Open() {
  void* library = dlopen(kLibrary, RTLD_NOW | RTLD_LOCAL);
  if (library == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat("cannot load cuBLAS (", kLibrary, "): ", dlerror()));
  }
  CublasApi api;
  absl::Status missing;
  auto bind = [&](auto& function, const char* name) {
    function = reinterpret_cast<std::remove_reference_t<decltype(function)>>(dlsym(library, name));
    if (function == nullptr && missing.ok()) {
      missing = absl::FailedPreconditionError(absl::StrCat(kLibrary, " has no function ", name));
    }
  };
  bind(api.create, "cublasCreate_v2");
  bind(api.destroy, "cublasDestroy_v2");
  bind(api.set_stream, "cublasSetStream_v2");
  bind(api.set_workspace, "cublasSetWorkspace_v2");
  bind(api.gemm_strided_batched_ex, "cublasGemmStridedBatchedEx");
  bind(api.status_name, "cublasGetStatusName");
  if (!missing.ok()) return missing;
  return api;  // the library stays loaded for the life of the process
}

const CublasApi* g_api = nullptr;

}  // namespace

absl::StatusOr<const CublasApi*> CublasApi::Load() {
  static std::once_flag once;
  static absl::Status error;
  std::call_once(once, [] {
    absl::StatusOr<CublasApi> api = Open();
    if (api.ok()) {
      g_api = new CublasApi(*api);
    } else {
      error = api.status();
    }
  });
  if (g_api == nullptr) return error;
  return g_api;
}

absl::Status CublasStatus(cublasStatus_t status, const char* what) {
  if (status == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  const char* name = g_api != nullptr ? g_api->status_name(status) : "?";
  return absl::InternalError(absl::StrCat(what, ": ", name, " (cuBLAS status ", static_cast<int>(status), ")"));
}

}  // namespace cohort::cuda
