// The ranks of a worker's GPU group that live in other processes, possibly on other nodes, as the
// expert-parallel engine drives them (worker/model/cuda/expert_parallel.h). This process is rank 0,
// with one GPU; worker/group/group.h carries the commands to the others over gRPC.
#pragma once

#include <cstdint>
#include <span>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "worker/model/engine.h"

namespace cohort {

class RemoteRanks {
 public:
  virtual ~RemoteRanks() = default;

  // Ranks in the group, this process's included.
  virtual int world_size() const = 0;
  // The NCCL unique id every rank was given (ncclUniqueId's bytes).
  virtual const std::string& nccl_id() const = 0;

  // Rank `rank` loads its weights and plans its memory; the blocks of its KV cache.
  virtual absl::StatusOr<int64_t> Prepare(int rank, absl::Duration timeout) = 0;
  // Rank `rank` joins the NCCL group and captures its graphs (all ranks at once).
  virtual absl::Status Start(int rank, absl::Duration timeout) = 0;
  // Rank `rank`'s part of a step (its sequences, block ids within its pool, and what every rank
  // agreed on); the reads of its experts.
  virtual absl::StatusOr<int64_t> Step(int rank, std::span<const SequenceStep> part, int rows, bool decode_graph,
                                       std::span<const int32_t> tokens_per_rank, absl::Duration timeout) = 0;
};

}  // namespace cohort
