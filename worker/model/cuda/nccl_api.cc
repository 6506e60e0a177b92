#include "worker/model/cuda/nccl_api.h"

#include <cstdlib>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "worker/model/cuda/shared_library.h"

namespace cohort::cuda {
namespace {

constexpr const char* kLibrary = "libnccl.so.2";

absl::StatusOr<NcclApi> Open() {
  // NVLink multicast (NVLS) off unless the environment asks for it: on shared GPU hosts a program
  // that uses it can take the host's GPUs out of service, and this engine's collectives are too
  // small to gain from it. NCCL reads the variable when its first communicator is made.
  setenv("NCCL_NVLS_ENABLE", "0", /*overwrite=*/0);
  COHORT_ASSIGN_OR_RETURN(SharedLibrary library,
                          SharedLibrary::Open(kLibrary, "cannot load NCCL, which --gpus above 1 needs"));
  NcclApi api;
  library.Bind(api.get_unique_id, "ncclGetUniqueId");
  library.Bind(api.comm_init_rank, "ncclCommInitRank");
  library.Bind(api.comm_destroy, "ncclCommDestroy");
  library.Bind(api.comm_abort, "ncclCommAbort");
  library.Bind(api.all_gather, "ncclAllGather");
  library.Bind(api.reduce_scatter, "ncclReduceScatter");
  library.Bind(api.error_string, "ncclGetErrorString");
  library.Bind(api.get_version, "ncclGetVersion");
  library.BindOptional(api.comm_revoke, "ncclCommRevoke");
  COHORT_RETURN_IF_ERROR(library.missing());
  return api;
}

}  // namespace

absl::StatusOr<const NcclApi*> NcclApi::Load() { return LoadOnce(&Open); }

absl::Status NcclStatus(const NcclApi& nccl, ncclResult_t result, const char* what) {
  if (result == ncclSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": ", nccl.error_string(result), " (NCCL result ",
                                          static_cast<int>(result), ")"));
}

}  // namespace cohort::cuda
