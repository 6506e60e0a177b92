#include "worker/model/cuda/nccl_api.h"

#include <dlfcn.h>

#include <mutex>

#include "absl/strings/str_cat.h"

namespace cohort::cuda {
namespace {

constexpr const char* kLibrary = "libnccl.so.2";

absl::StatusOr<NcclApi> Open() {
  void* library = dlopen(kLibrary, RTLD_NOW | RTLD_LOCAL);
  if (library == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot load NCCL (", kLibrary, "), which --gpus above 1 needs: ", dlerror()));
  }
  NcclApi api;
  absl::Status missing;
  auto bind = [&](auto& function, const char* name) {
    function = reinterpret_cast<std::remove_reference_t<decltype(function)>>(dlsym(library, name));
    if (function == nullptr && missing.ok()) {
      missing = absl::FailedPreconditionError(absl::StrCat(kLibrary, " has no function ", name));
    }
  };
  bind(api.get_unique_id, "ncclGetUniqueId");
  bind(api.comm_init_rank, "ncclCommInitRank");
  bind(api.comm_destroy, "ncclCommDestroy");
  bind(api.comm_abort, "ncclCommAbort");
  bind(api.all_reduce, "ncclAllReduce");
  bind(api.error_string, "ncclGetErrorString");
  bind(api.get_version, "ncclGetVersion");
  if (!missing.ok()) return missing;
  api.comm_revoke = reinterpret_cast<decltype(api.comm_revoke)>(dlsym(library, "ncclCommRevoke"));
  return api;  // the library stays loaded for the life of the process
}

}  // namespace

absl::StatusOr<const NcclApi*> NcclApi::Load() {
  static std::once_flag once;
  static const NcclApi* api = nullptr;
  static absl::Status error;
  std::call_once(once, [] {
    absl::StatusOr<NcclApi> opened = Open();
    if (opened.ok()) {
      api = new NcclApi(*opened);
    } else {
      error = opened.status();
    }
  });
  if (api == nullptr) return error;
  return api;
}

absl::Status NcclStatus(const NcclApi& nccl, ncclResult_t result, const char* what) {
  if (result == ncclSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": ", nccl.error_string(result), " (NCCL result ",
                                          static_cast<int>(result), ")"));
}

}  // namespace cohort::cuda
