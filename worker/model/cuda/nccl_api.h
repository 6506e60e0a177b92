// NCCL, loaded when a worker first spreads a model over several GPUs rather than linked, so that the
// one-GPU and CPU paths (and CI, which has no GPU) never need the library; loaded the way cuBLAS is
// (cublas_api.h).
//
//   COHORT_ASSIGN_OR_RETURN(const NcclApi* nccl, NcclApi::Load());
//   ncclUniqueId id;
//   COHORT_RETURN_IF_ERROR(NcclStatus(*nccl, nccl->get_unique_id(&id), "ncclGetUniqueId"));
#pragma once

#include <nccl.h>

#include "absl/status/statusor.h"

namespace cohort::cuda {

struct NcclApi {
  decltype(&ncclGetUniqueId) get_unique_id = nullptr;
  decltype(&ncclCommInitRank) comm_init_rank = nullptr;
  decltype(&ncclCommDestroy) comm_destroy = nullptr;
  decltype(&ncclCommAbort) comm_abort = nullptr;
  decltype(&ncclAllGather) all_gather = nullptr;
  decltype(&ncclReduceScatter) reduce_scatter = nullptr;
  decltype(&ncclGetErrorString) error_string = nullptr;
  decltype(&ncclGetVersion) get_version = nullptr;
  // Stops a communicator's work in flight without freeing it (NCCL 2.28 on); null in older NCCLs,
  // where only comm_abort, which frees it, can.
  ncclResult_t (*comm_revoke)(ncclComm_t, int) = nullptr;

  // The process's one copy, loaded on first use; FailedPrecondition naming the library when it
  // cannot be found or lacks a function.
  static absl::StatusOr<const NcclApi*> Load();
};

// OK, or Internal naming `what` and NCCL's message.
absl::Status NcclStatus(const NcclApi& nccl, ncclResult_t result, const char* what);

}  // namespace cohort::cuda
