#include "worker/group/group.h"

#include <grpcpp/grpcpp.h>

#include <map>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "cohort/worker/v1/group.grpc.pb.h"
#include "common/status.h"
#include "spdlog/spdlog.h"

namespace cohort {

using cohort::worker::v1::FromFollower;
using cohort::worker::v1::ToFollower;
using cohort::worker::v1::WorkerGroup;
using Stream = grpc::ServerReaderWriter<ToFollower, FromFollower>;

// Each follower's stream is served by its own handler thread (the synchronous API): it reads the
// rank's answers until the stream ends. Run writes commands to the stream from the caller's
// thread; the handler does not return (which ends the stream) while a write is under way.
class GroupLeader::Service final : public WorkerGroup::Service {
 public:
  Service(int world_size, std::string model, std::string nccl_id, EngineSettings settings)
      : world_size_(world_size),
        model_(std::move(model)),
        nccl_id_(std::move(nccl_id)),
        settings_(std::move(settings)),
        ranks_(world_size) {}

  grpc::Status Join(grpc::ServerContext*, Stream* stream) override {
    FromFollower first;
    if (!stream->Read(&first) || !first.has_join()) {
      return {grpc::StatusCode::INVALID_ARGUMENT, "a follower's first message joins the group"};
    }
    const int rank = static_cast<int>(first.join().rank());
    Rank* r = nullptr;
    {
      absl::MutexLock lock(&mu_);
      if (rank < 1 || rank >= world_size_) {
        return {grpc::StatusCode::FAILED_PRECONDITION,
                absl::StrCat("rank ", rank, " is not a follower of this group of ", world_size_)};
      }
      if (first.join().model() != model_) {
        return {grpc::StatusCode::FAILED_PRECONDITION,
                absl::StrCat("rank ", rank, " serves ", first.join().model(), "; rank 0 serves ", model_)};
      }
      if (ranks_[rank].stream != nullptr) {
        return {grpc::StatusCode::FAILED_PRECONDITION, absl::StrCat("rank ", rank, " has joined already")};
      }
      r = &ranks_[rank];
      *r = Rank{};
      r->stream = stream;
      r->writing = 1;  // the welcome, below
    }
    ToFollower welcome;
    welcome.mutable_welcome()->set_world_size(world_size_);
    welcome.mutable_welcome()->set_nccl_unique_id(nccl_id_);
    *welcome.mutable_welcome()->mutable_settings() = settings_;
    const bool welcomed = stream->Write(welcome);
    {
      absl::MutexLock lock(&mu_);
      r->writing = 0;
      r->joined = welcomed;
    }
    spdlog::info("group: rank {} joined", rank);
    FromFollower message;
    while (welcomed && stream->Read(&message)) {
      if (!message.has_done()) continue;
      absl::MutexLock lock(&mu_);
      r->done[message.done().id()] = message.done();
    }
    absl::MutexLock lock(&mu_);
    r->ended = true;
    mu_.Await(absl::Condition(+[](Rank* r) { return r->writing == 0; }, r));
    r->stream = nullptr;
    spdlog::warn("group: rank {}'s stream ended", rank);
    return grpc::Status::OK;
  }

  absl::Status AwaitRanks(absl::Duration timeout) {
    absl::MutexLock lock(&mu_);
    auto all_joined = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      for (int rank = 1; rank < world_size_; ++rank) {
        if (!ranks_[rank].joined) return false;
      }
      return true;
    };
    if (mu_.AwaitWithTimeout(absl::Condition(&all_joined), timeout)) return absl::OkStatus();
    std::vector<int> missing;
    for (int rank = 1; rank < world_size_; ++rank) {
      if (!ranks_[rank].joined) missing.push_back(rank);
    }
    return absl::DeadlineExceededError(absl::StrCat("rank ", absl::StrJoin(missing, ", "), " did not join within ",
                                                    absl::FormatDuration(timeout)));
  }

  absl::StatusOr<CommandDone> Run(int rank, const Command& command, absl::Duration timeout) {
    if (rank < 1 || rank >= world_size_) return absl::InvalidArgumentError(absl::StrCat("no rank ", rank));
    Rank& r = ranks_[rank];
    Stream* stream = nullptr;
    {
      absl::MutexLock lock(&mu_);
      if (!r.joined || r.ended) return absl::UnavailableError(absl::StrCat("rank ", rank, " is not in the group"));
      ++r.writing;
      stream = r.stream;
    }
    ToFollower message;
    *message.mutable_command() = command;
    const bool written = stream->Write(message);
    absl::MutexLock lock(&mu_);
    --r.writing;
    if (!written) return absl::UnavailableError(absl::StrCat("rank ", rank, "'s stream ended"));
    const uint64_t id = command.id();
    auto answered = [&r, id]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return r.ended || r.done.count(id) != 0; };
    if (!mu_.AwaitWithTimeout(absl::Condition(&answered), timeout)) {
      return absl::DeadlineExceededError(
          absl::StrCat("rank ", rank, " did not finish command ", id, " within ", absl::FormatDuration(timeout)));
    }
    auto done = r.done.find(id);
    if (done == r.done.end()) {
      return absl::UnavailableError(absl::StrCat("rank ", rank, "'s stream ended during command ", id));
    }
    CommandDone result = std::move(done->second);
    r.done.erase(done);
    return result;
  }

 private:
  struct Rank {
    Stream* stream = nullptr;  // while its handler runs
    bool joined = false;
    bool ended = false;
    int writing = 0;  // writes under way on the stream
    std::map<uint64_t, CommandDone> done;
  };

  const int world_size_;
  const std::string model_;
  const std::string nccl_id_;
  const EngineSettings settings_;
  absl::Mutex mu_;
  std::vector<Rank> ranks_ ABSL_GUARDED_BY(mu_);  // [0] unused: rank 0 is this process
};

struct GroupLeader::Server {
  std::unique_ptr<grpc::Server> server;
  int port = 0;
};

absl::StatusOr<std::unique_ptr<GroupLeader>> GroupLeader::Start(const std::string& host, int port, int world_size,
                                                                const std::string& model, const std::string& nccl_id,
                                                                const EngineSettings& settings) {
  std::unique_ptr<GroupLeader> leader(new GroupLeader());
  leader->service_ = std::make_unique<Service>(world_size, model, nccl_id, settings);
  leader->server_ = std::make_unique<Server>();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(absl::StrCat(host, ":", port), grpc::InsecureServerCredentials(), &leader->server_->port);
  builder.RegisterService(leader->service_.get());
  leader->server_->server = builder.BuildAndStart();
  if (leader->server_->server == nullptr || leader->server_->port == 0) {
    return absl::UnavailableError(absl::StrCat("cannot serve the worker group on ", host, ":", port));
  }
  return leader;
}

GroupLeader::~GroupLeader() {
  if (server_ != nullptr && server_->server != nullptr) {
    server_->server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
  }
}

int GroupLeader::port() const { return server_->port; }

absl::Status GroupLeader::AwaitRanks(absl::Duration timeout) { return service_->AwaitRanks(timeout); }

absl::StatusOr<CommandDone> GroupLeader::Run(int rank, const Command& command, absl::Duration timeout) {
  return service_->Run(rank, command, timeout);
}

EngineSettings SettingsOf(const EngineOptions& options) {
  EngineSettings settings;
  settings.set_kv_block_size(options.kv_block_size);
  settings.set_max_batch_tokens(options.max_batch_tokens);
  settings.set_max_sequences(options.max_sequences);
  settings.set_num_layers(options.num_layers);
  settings.set_gpu_memory_fraction(options.gpu_memory_fraction);
  settings.set_kv_cache_bytes(options.kv_cache_bytes);
  settings.set_expanded_prefill_max_context(options.expanded_prefill_max_context);
  return settings;
}

void ApplySettings(const EngineSettings& settings, EngineOptions& options) {
  options.kv_block_size = settings.kv_block_size();
  options.max_batch_tokens = settings.max_batch_tokens();
  options.max_sequences = settings.max_sequences();
  options.num_layers = settings.num_layers();
  options.gpu_memory_fraction = settings.gpu_memory_fraction();
  options.kv_cache_bytes = settings.kv_cache_bytes();
  options.expanded_prefill_max_context = settings.expanded_prefill_max_context();
}

absl::StatusOr<CommandDone> LeaderRanks::Run(int rank, Command command, absl::Duration timeout) {
  command.set_id(next_id_[rank]++);
  COHORT_ASSIGN_OR_RETURN(CommandDone done, leader_.Run(rank, command, timeout));
  if (done.code() != 0) {
    return absl::Status(static_cast<absl::StatusCode>(done.code()), absl::StrCat("rank ", rank, ": ", done.message()));
  }
  return done;
}

absl::StatusOr<int64_t> LeaderRanks::Prepare(int rank, absl::Duration timeout) {
  Command command;
  command.mutable_prepare();
  COHORT_ASSIGN_OR_RETURN(const CommandDone done, Run(rank, std::move(command), timeout));
  return done.kv_blocks();
}

absl::Status LeaderRanks::Start(int rank, absl::Duration timeout) {
  Command command;
  command.mutable_start();
  return Run(rank, std::move(command), timeout).status();
}

absl::StatusOr<int64_t> LeaderRanks::Step(int rank, std::span<const SequenceStep> part, int rows, bool decode_graph,
                                          std::span<const int32_t> tokens_per_rank, absl::Duration timeout) {
  Command command;
  auto* step = command.mutable_step();
  step->set_rows(static_cast<uint32_t>(rows));
  step->set_decode_graph(decode_graph);
  step->mutable_tokens_per_rank()->Add(tokens_per_rank.begin(), tokens_per_rank.end());
  for (const SequenceStep& seq : part) {
    auto* s = step->add_sequences();
    s->mutable_tokens()->Add(seq.tokens.begin(), seq.tokens.end());
    s->set_start_position(seq.start_position);
    s->mutable_block_table()->Add(seq.block_table.begin(), seq.block_table.end());
    s->set_compute_logits(seq.compute_logits);
  }
  COHORT_ASSIGN_OR_RETURN(const CommandDone done, Run(rank, std::move(command), timeout));
  return done.routed_expert_reads();
}

absl::Status RunFollower(const std::string& leader, int rank, const std::string& model,
                         absl::FunctionRef<std::optional<CommandDone>(const Welcome&, const Command&)> run,
                         absl::Duration connect_timeout) {
  auto channel = grpc::CreateChannel(leader, grpc::InsecureChannelCredentials());
  if (!channel->WaitForConnected(absl::ToChronoTime(absl::Now() + connect_timeout))) {
    return absl::UnavailableError(absl::StrCat("rank 0 at ", leader, " did not answer within ",
                                               absl::FormatDuration(connect_timeout)));
  }
  auto stub = WorkerGroup::NewStub(channel);
  grpc::ClientContext context;
  auto stream = stub->Join(&context);
  FromFollower join;
  join.mutable_join()->set_rank(static_cast<uint32_t>(rank));
  join.mutable_join()->set_model(model);
  ToFollower message;
  if (!stream->Write(join) || !stream->Read(&message) || !message.has_welcome()) {
    const grpc::Status refused = stream->Finish();
    if (refused.error_code() == grpc::StatusCode::FAILED_PRECONDITION) {
      return absl::FailedPreconditionError(refused.error_message());
    }
    return absl::UnavailableError(absl::StrCat("rank 0 at ", leader, " did not welcome rank ", rank, ": ",
                                               refused.error_message()));
  }
  const Welcome welcome = message.welcome();
  while (stream->Read(&message)) {
    if (!message.has_command()) continue;
    std::optional<CommandDone> done = run(welcome, message.command());
    if (!done.has_value()) {  // leaving the group
      context.TryCancel();
      return absl::OkStatus();
    }
    done->set_id(message.command().id());
    FromFollower answer;
    *answer.mutable_done() = std::move(*done);
    if (!stream->Write(answer)) break;
  }
  const grpc::Status ended = stream->Finish();
  if (ended.ok()) return absl::OkStatus();
  return absl::UnavailableError(absl::StrCat("rank 0 at ", leader, " went away: ", ended.error_message()));
}

}  // namespace cohort
