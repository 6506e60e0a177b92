#include "worker/model/cuda/expert_parallel.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdlib>
#include <deque>
#include <functional>
#include <optional>
#include <thread>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/status.h"
#include "kernels/cuda_check.h"
#include "spdlog/spdlog.h"
#include "worker/model/cuda/cuda_engine.h"
#include "worker/model/cuda/nccl_api.h"
#include "worker/model/pool_split.h"
#include "worker/model/remote_ranks.h"

namespace cohort::cuda {
namespace {

// How long a step may take on one GPU before the others stop waiting for it.
constexpr absl::Duration kStepTimeout = absl::Seconds(60);
// Start-up on every GPU: the weights, then the NCCL group and the decode graphs.
constexpr absl::Duration kStartTimeout = absl::Minutes(20);

// A thread that drives one GPU: it makes the GPU its current device (device >= 0; a rank in
// another process has none here), then runs the jobs posted to it one after another.
class GpuThread {
 public:
  explicit GpuThread(int device) : device_(device), thread_([this] { Loop(); }) {}
  ~GpuThread() {
    {
      absl::MutexLock lock(&mu_);
      stop_ = true;
    }
    thread_.join();
  }

  void Post(std::function<void()> job) {
    absl::MutexLock lock(&mu_);
    jobs_.push_back(std::move(job));
  }

 private:
  bool Ready() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stop_ || !jobs_.empty(); }

  void Loop() {
    const cudaError_t set = device_ >= 0 ? cudaSetDevice(device_) : cudaSuccess;
    if (set != cudaSuccess) spdlog::error("cuda: cannot make GPU {} current: {}", device_, cudaGetErrorString(set));
    for (;;) {
      std::function<void()> job;
      {
        absl::MutexLock lock(&mu_);
        mu_.Await(absl::Condition(this, &GpuThread::Ready));
        if (jobs_.empty()) return;  // stopped, nothing left to run
        job = std::move(jobs_.front());
        jobs_.pop_front();
      }
      job();
    }
  }

  const int device_;
  absl::Mutex mu_;
  std::deque<std::function<void()>> jobs_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;  // last: it starts once the members it uses exist
};

// One job per GPU, and their statuses as they finish.
class Round {
 public:
  explicit Round(int gpus) : status_(gpus) {}

  void Finish(int gpu, absl::Status status) {
    absl::MutexLock lock(&mu_);
    if (!status.ok() && failed_ < 0) failed_ = gpu;
    status_[gpu] = std::move(status);
    ++finished_;
  }
  // Until every GPU has finished or one has failed, at most until `deadline`.
  void AwaitAllOrFailure(absl::Time deadline) {
    absl::MutexLock lock(&mu_);
    mu_.AwaitWithDeadline(absl::Condition(this, &Round::AllOrFailure), deadline);
  }
  // Until every GPU has finished, at most until `deadline`; true if they have.
  bool AwaitAll(absl::Time deadline) {
    absl::MutexLock lock(&mu_);
    return mu_.AwaitWithDeadline(absl::Condition(this, &Round::All), deadline);
  }
  // OK when every GPU finished without error; else the first GPU's error, or which GPUs did not
  // finish within `timeout`.
  absl::Status Outcome(absl::Duration timeout) {
    absl::MutexLock lock(&mu_);
    if (failed_ >= 0) {
      const absl::Status& s = *status_[failed_];
      return absl::Status(s.code(), absl::StrCat("GPU ", failed_, ": ", s.message()));
    }
    if (All()) return absl::OkStatus();
    std::vector<int> late;
    for (size_t g = 0; g < status_.size(); ++g) {
      if (!status_[g].has_value()) late.push_back(static_cast<int>(g));
    }
    return absl::DeadlineExceededError(absl::StrCat("GPU ", absl::StrJoin(late, ", "), " did not finish within ",
                                                    absl::FormatDuration(timeout)));
  }

 private:
  bool All() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return finished_ == static_cast<int>(status_.size()); }
  bool AllOrFailure() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return All() || failed_ >= 0; }

  absl::Mutex mu_;
  std::vector<std::optional<absl::Status>> status_ ABSL_GUARDED_BY(mu_);
  int finished_ ABSL_GUARDED_BY(mu_) = 0;
  int failed_ ABSL_GUARDED_BY(mu_) = -1;
};

class ExpertParallelEngine final : public Engine {
 public:
  explicit ExpertParallelEngine(ModelConfig config) : config_(std::move(config)) {}
  ~ExpertParallelEngine() override;

  absl::Status Initialize(const EngineOptions& options);

  const ModelConfig& config() const override { return config_; }
  const KvCacheGeometry& kv_geometry() const override { return geometry_; }
  int64_t weight_value_bytes() const override { return gpus_[0]->weight_value_bytes(); }
  StepStats last_step_stats() const override {
    StepStats sum;  // each GPU counts the reads of its own experts
    for (size_t g = 0; g < gpus_.size(); ++g) {
      sum.routed_expert_reads += remote(g) ? remote_reads_[g] : gpus_[g]->last_step_stats().routed_expert_reads;
    }
    return sum;
  }

  absl::Status Forward(std::span<const SequenceStep> batch, std::span<float> logits) override;
  absl::Status ForwardAndSample(std::span<const SequenceStep> batch, std::span<Sampler* const> samplers,
                                std::span<SampledToken> tokens) override;

 private:
  // Whether GPU g is a rank in another process, driven through remote_.
  bool remote(size_t g) const { return remote_ != nullptr && g > 0; }
  // Runs GPU g's part of a step that Split made: its logits or samples (GPU 0), through remote_
  // for a rank in another process.
  absl::Status StepOn(int g, const ShardStep& step, std::span<float> logits, std::span<Sampler* const> samplers,
                      std::span<SampledToken> tokens);
  // Splits a valid batch by pool (one per GPU) and returns what every GPU must agree on.
  ShardStep Split(std::span<const SequenceStep> batch) {
    split_.Split(batch, geometry_);
    return {split_.rows(), split_.decode_only(), split_.tokens(), split_.logits_rows()};
  }

  // Runs work(gpu) for every GPU on its thread and waits for all of them. When one fails or does
  // not finish within `timeout`, the others may be waiting for it in a collective: the NCCL group
  // is revoked so that they return, and the engine takes no further step.
  absl::Status OnEveryGpu(absl::FunctionRef<absl::Status(int gpu)> work, absl::Duration timeout);

  ModelConfig config_;
  KvCacheGeometry geometry_;  // every GPU's pool of blocks, one after another
  PoolSplit split_{1};  // kept across steps, like its buffers
  std::vector<std::unique_ptr<GpuThread>> threads_;
  std::vector<std::unique_ptr<ShardEngine>> gpus_;  // gpus_[g] is used on threads_[g] only; null if remote
  RemoteRanks* remote_ = nullptr;  // the ranks in other processes, if any
  std::vector<int64_t> remote_reads_;  // their expert reads in the last step
  bool started_ = false;  // Initialize has succeeded
  absl::Status broken_;  // why the engine takes no more steps
};

ExpertParallelEngine::~ExpertParallelEngine() {
  // Each GPU's engine is destroyed on its own thread, where its device is current.
  for (size_t g = 0; g < threads_.size(); ++g) threads_[g]->Post([this, g] { gpus_[g].reset(); });
  threads_.clear();  // each thread finishes its jobs, then stops
}

absl::Status ExpertParallelEngine::StepOn(int g, const ShardStep& step, std::span<float> logits,
                                          std::span<Sampler* const> samplers, std::span<SampledToken> tokens) {
  if (remote(g)) {
    COHORT_ASSIGN_OR_RETURN(remote_reads_[g],
                            remote_->Step(g, split_.part(g), step.rows, step.decode_graph, step.tokens, kStepTimeout));
    return absl::OkStatus();
  }
  if (!logits.empty()) return gpus_[g]->ForwardShard(split_.part(g), step, logits);
  return gpus_[g]->ForwardAndSampleShard(split_.part(g), step, samplers, tokens);
}

absl::Status ExpertParallelEngine::Forward(std::span<const SequenceStep> batch, std::span<float> logits) {
  COHORT_RETURN_IF_ERROR(ValidateBatch(config_, geometry_, batch, logits.size()));
  const ShardStep step = Split(batch);
  // GPU 0 returns the logits; the others get none.
  return OnEveryGpu([&](int g) { return StepOn(g, step, g == 0 ? logits : std::span<float>(), {}, {}); },
                    kStepTimeout);
}

absl::Status ExpertParallelEngine::ForwardAndSample(std::span<const SequenceStep> batch,
                                                    std::span<Sampler* const> samplers,
                                                    std::span<SampledToken> tokens) {
  COHORT_RETURN_IF_ERROR(ValidateBatch(config_, geometry_, batch, samplers.size() * config_.vocab_size));
  const ShardStep step = Split(batch);
  // GPU 0 samples every sequence; the others none.
  return OnEveryGpu(
      [&](int g) {
        return g == 0 ? StepOn(0, step, {}, samplers, tokens) : StepOn(g, step, {}, {}, {});
      },
      kStepTimeout);
}

absl::Status ExpertParallelEngine::OnEveryGpu(absl::FunctionRef<absl::Status(int gpu)> work, absl::Duration timeout) {
  if (!broken_.ok()) return broken_;
  const int world = static_cast<int>(threads_.size());
  Round round(world);
  for (int g = 0; g < world; ++g) {
    threads_[g]->Post([&work, &round, g] { round.Finish(g, work(g)); });
  }
  round.AwaitAllOrFailure(absl::Now() + timeout);
  const absl::Status outcome = round.Outcome(timeout);
  if (outcome.ok()) return outcome;

  spdlog::error("cuda: {}; stopping the other GPUs' collectives", std::string(outcome.message()));
  for (const auto& gpu : gpus_) {
    if (gpu != nullptr) gpu->Abort();
  }
  // The jobs use `work` and `round`, which live on this stack: they must end before this returns.
  if (!round.AwaitAll(absl::Now() + timeout)) {
    spdlog::critical("cuda: a GPU did not return from its work {} after the NCCL group was revoked; exiting so that "
                     "the worker restarts", absl::FormatDuration(timeout));
    std::_Exit(EXIT_FAILURE);
  }
  broken_ = absl::UnavailableError(
      absl::StrCat("this worker's GPUs can no longer step together (", outcome.message(), "); restart the worker"));
  // At start-up the first error says what to fix; once serving, any failure breaks the group, and
  // UNAVAILABLE tells the worker so (EngineLoop::unhealthy).
  return started_ ? broken_ : outcome;
}

absl::Status ExpertParallelEngine::Initialize(const EngineOptions& options) {
  // This process's GPUs, and the ranks in other processes, one GPU each.
  remote_ = options.remote_ranks;
  const int local = remote_ != nullptr ? 1 : options.num_gpus;
  const int world = remote_ != nullptr ? remote_->world_size() : local;
  if (local < 1) return absl::InvalidArgumentError(absl::StrCat("--gpus must be at least 1, got ", local));
  if (config_.n_routed_experts < world) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--gpus ", world, " splits the model's routed experts between GPUs, and this model has ",
        config_.n_routed_experts, ": use at most ", std::max<int64_t>(config_.n_routed_experts, 1), " GPUs"));
  }
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    (void)cudaGetLastError();
    return absl::FailedPreconditionError("--device cuda: no CUDA device is visible on this machine");
  }
  if (options.device_id < 0 || options.device_id + local > devices) {
    return absl::InvalidArgumentError(absl::StrCat("--gpus ", local, " from GPU ", options.device_id,
                                                   " needs GPUs ", options.device_id, "..",
                                                   options.device_id + local - 1, "; this machine has ", devices));
  }
  COHORT_ASSIGN_OR_RETURN(const NcclApi* nccl, NcclApi::Load());
  int version = 0;
  COHORT_RETURN_IF_ERROR(NcclStatus(*nccl, nccl->get_version(&version), "ncclGetVersion"));
  ncclUniqueId id;
  if (remote_ != nullptr) {
    if (remote_->nccl_id().size() != sizeof(id.internal)) {
      return absl::InvalidArgumentError(absl::StrCat("an NCCL id of ", remote_->nccl_id().size(), " bytes"));
    }
    std::copy_n(remote_->nccl_id().data(), sizeof(id.internal), id.internal);
  } else {
    COHORT_RETURN_IF_ERROR(NcclStatus(*nccl, nccl->get_unique_id(&id), "ncclGetUniqueId"));
  }
  spdlog::info("cuda: spreading the experts over {} GPUs, {} of them here from GPU {} (NCCL {})", world, local,
               options.device_id, version);

  gpus_.resize(world);
  remote_reads_.assign(world, 0);
  for (int g = 0; g < world; ++g) {
    threads_.push_back(std::make_unique<GpuThread>(remote(g) ? -1 : options.device_id + g));
  }
  // Every GPU loads its weights first; only when all have can they wait for each other.
  std::vector<int64_t> blocks(world, 0);
  COHORT_RETURN_IF_ERROR(OnEveryGpu(
      [&](int g) -> absl::Status {
        if (remote(g)) {
          COHORT_ASSIGN_OR_RETURN(blocks[g], remote_->Prepare(g, kStartTimeout));
          return absl::OkStatus();
        }
        COHORT_ASSIGN_OR_RETURN(gpus_[g], ShardEngine::Prepare(config_, options, g, world));
        blocks[g] = gpus_[g]->kv_geometry().num_blocks;
        return absl::OkStatus();
      },
      kStartTimeout));
  // One pool of blocks per GPU, each as large as the smallest GPU's cache.
  geometry_ = gpus_[0]->kv_geometry();
  geometry_.num_blocks = *std::min_element(blocks.begin(), blocks.end()) * world;
  geometry_.num_pools = world;
  split_ = PoolSplit(world);
  COHORT_RETURN_IF_ERROR(OnEveryGpu(
      [&](int g) { return remote(g) ? remote_->Start(g, kStartTimeout) : gpus_[g]->Start(nccl, &id); },
      kStartTimeout));
  started_ = true;
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<Engine>> CreateExpertParallelEngine(ModelConfig config, const EngineOptions& options) {
  auto engine = std::make_unique<ExpertParallelEngine>(std::move(config));
  COHORT_RETURN_IF_ERROR(engine->Initialize(options));
  return engine;
}

}  // namespace cohort::cuda
