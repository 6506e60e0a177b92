// A worker whose GPUs span processes or nodes (proto/cohort/worker/v1/group.proto): rank 0's side
// (GroupLeader) and a follower rank's side (RunFollower). Rank 0 serves WorkerGroup on a port of
// its own; each follower joins it, is given the world size and the NCCL id, and then runs the
// commands rank 0 sends it (load the weights, join the NCCL group, each step its part of the batch)
// and says how each ended.
//
//   // rank 0
//   COHORT_ASSIGN_OR_RETURN(auto leader, GroupLeader::Start("0.0.0.0", 50070, world, model, nccl_id));
//   COHORT_RETURN_IF_ERROR(leader->AwaitRanks(absl::Minutes(10)));
//   COHORT_ASSIGN_OR_RETURN(CommandDone done, leader->Run(1, command, absl::Seconds(60)));
//
//   // rank 1's process
//   RunFollower("rank0.example:50070", 1, model, [&](const Welcome& w, const Command& c) { ... });
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "cohort/worker/v1/group.pb.h"
#include "worker/model/engine.h"
#include "worker/model/remote_ranks.h"

namespace cohort {

using cohort::worker::v1::Command;
using cohort::worker::v1::CommandDone;
using cohort::worker::v1::EngineSettings;
using cohort::worker::v1::Welcome;

class GroupLeader {
 public:
  // Serves WorkerGroup on host:port (0: a free port) for the world_size - 1 other ranks, which must
  // serve `model` and are welcomed with the NCCL id and `settings`. Unavailable when the port cannot
  // be bound.
  static absl::StatusOr<std::unique_ptr<GroupLeader>> Start(const std::string& host, int port, int world_size,
                                                            const std::string& model, const std::string& nccl_id,
                                                            const EngineSettings& settings = {});
  ~GroupLeader();

  int port() const;
  // Until every rank has joined, at most `timeout`: DeadlineExceeded naming the ranks still missing.
  absl::Status AwaitRanks(absl::Duration timeout);
  // Sends `command` to follower `rank` and waits for its end: Unavailable when the rank's stream
  // ended first (its process went away), DeadlineExceeded after `timeout`. Commands to one rank
  // must come one at a time; to different ranks, from any threads at once.
  absl::StatusOr<CommandDone> Run(int rank, const Command& command, absl::Duration timeout);

  class Service;  // the WorkerGroup service

 private:
  GroupLeader() = default;
  std::unique_ptr<Service> service_;
  struct Server;
  std::unique_ptr<Server> server_;
};

// A GroupLeader's followers as the expert-parallel engine drives them (EngineOptions::remote_ranks).
// An error a rank reports comes back with its code, its message prefixed with the rank.
class LeaderRanks final : public RemoteRanks {
 public:
  // `leader` outlives this; every rank has joined it (AwaitRanks).
  LeaderRanks(GroupLeader& leader, int world_size, std::string nccl_id)
      : leader_(leader), world_size_(world_size), nccl_id_(std::move(nccl_id)), next_id_(world_size, 1) {}

  int world_size() const override { return world_size_; }
  const std::string& nccl_id() const override { return nccl_id_; }
  absl::StatusOr<int64_t> Prepare(int rank, absl::Duration timeout) override;
  absl::Status Start(int rank, absl::Duration timeout) override;
  absl::StatusOr<int64_t> Step(int rank, std::span<const SequenceStep> part, int rows, bool decode_graph,
                               std::span<const int32_t> tokens_per_rank, absl::Duration timeout) override;

 private:
  // Runs `command` on `rank` under the rank's next id; the answer, or the error the rank reported.
  absl::StatusOr<CommandDone> Run(int rank, Command command, absl::Duration timeout);

  GroupLeader& leader_;
  const int world_size_;
  const std::string nccl_id_;
  std::vector<uint64_t> next_id_;  // per rank, used by that rank's one caller at a time
};

// Rank 0's settings for its followers, and a follower's options with them applied.
EngineSettings SettingsOf(const EngineOptions& options);
void ApplySettings(const EngineSettings& settings, EngineOptions& options);

// Joins rank 0 at `leader` as `rank` serving `model`, then runs every command it is sent with `run`
// (which answers with how the command ended, or nullopt to leave the group, as a process that dies
// would) until rank 0 ends the stream: OK then. FailedPrecondition when rank 0 refuses the rank
// (wrong model, a rank that is taken or outside the group), Unavailable when rank 0 cannot be
// reached within `connect_timeout` or goes away.
absl::Status RunFollower(const std::string& leader, int rank, const std::string& model,
                         absl::FunctionRef<std::optional<CommandDone>(const Welcome&, const Command&)> run,
                         absl::Duration connect_timeout = absl::Seconds(60));

}  // namespace cohort
