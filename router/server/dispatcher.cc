#include "router/server/dispatcher.h"

#include <grpcpp/grpcpp.h>
#include <prometheus/counter.h>

#include <mutex>
#include <set>
#include <thread>

#include "absl/strings/str_cat.h"
#include "router/server/metrics.h"
#include "spdlog/spdlog.h"

namespace cohort {
namespace {

using cohort::v1::GenerateRequest;
using cohort::v1::GenerateResponse;
using Clock = std::chrono::steady_clock;

bool Retriable(grpc::StatusCode code) {
  // The worker is gone, refused to take work, or is draining: another worker may serve it.
  return code == grpc::StatusCode::UNAVAILABLE || code == grpc::StatusCode::RESOURCE_EXHAUSTED ||
         code == grpc::StatusCode::UNKNOWN || code == grpc::StatusCode::INTERNAL;
}

class ProxyCall;

// One attempt on one worker: a callback-API read stream that owns its context and deletes itself
// once gRPC is done with it.
class Attempt final : public grpc::ClientReadReactor<GenerateResponse> {
 public:
  Attempt(std::shared_ptr<ProxyCall> call, std::chrono::system_clock::time_point deadline) : call_(std::move(call)) {
    if (deadline != std::chrono::system_clock::time_point::max()) context_.set_deadline(deadline);
  }
  void Begin(cohort::worker::v1::Worker::Stub& stub, const GenerateRequest& request) {
    stub.async()->Generate(&context_, &request, this);
    StartRead(&response_);
    StartCall();
  }
  grpc::ClientContext& context() { return context_; }

  void OnReadDone(bool ok) override;
  void OnDone(const grpc::Status& status) override;

 private:
  std::shared_ptr<ProxyCall> call_;
  grpc::ClientContext context_;
  GenerateResponse response_;
};

// One client request: attempts on workers until one completes, or the request fails for good.
class ProxyCall final : public GenerationHandle, public std::enable_shared_from_this<ProxyCall> {
 public:
  ProxyCall(Dispatcher& dispatcher, const GenerateRequest& request, std::shared_ptr<GenerationObserver> observer,
            std::chrono::system_clock::time_point deadline)
      : dispatcher_(dispatcher),
        request_(request),
        observer_(std::move(observer)),
        deadline_(deadline),
        arrival_(Clock::now()),
        queue_deadline_(arrival_ + dispatcher.options().queue_timeout),
        rng_(std::random_device{}()) {
    if (request_.has_token_ids()) prompt_.assign(request_.token_ids().ids().begin(), request_.token_ids().ids().end());
  }

  void Start() {
    self_ = shared_from_this();
    TryNextWorker();
  }

  void Cancel() override {
    std::lock_guard<std::mutex> lock(mu_);
    cancelled_ = true;
    if (context_ != nullptr) context_->TryCancel();
  }

  void OnResponse(const GenerateResponse& response) {
    if (response.has_chunk()) {
      tokens_streamed_ += response.chunk().token_ids_size();
      if (!first_token_seen_ && response.chunk().token_ids_size() > 0) {
        first_token_seen_ = true;
        if (auto* m = dispatcher_.metrics()) m->ObserveFirstToken(Clock::now() - arrival_);
      }
    } else if (response.has_final()) {
      final_seen_ = true;
    }
    observer_->OnResponse(response);
  }

  void OnAttemptDone(const grpc::Status& status) {
    const std::string worker = worker_;
    {
      std::lock_guard<std::mutex> lock(mu_);
      context_ = nullptr;
    }
    dispatcher_.pool().OnCallEnded(worker);
    RouterMetrics* metrics = dispatcher_.metrics();
    if (status.ok()) {
      dispatcher_.pool().OnCallSucceeded(worker);
      Complete(status, "ok");
      return;
    }
    bool cancelled;
    {
      std::lock_guard<std::mutex> lock(mu_);
      cancelled = cancelled_;
    }
    if (cancelled || status.error_code() == grpc::StatusCode::CANCELLED ||
        status.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED) {
      Complete(status, "cancelled");
      return;
    }
    if (!Retriable(status.error_code())) {  // the request itself is wrong: every worker would say so
      Complete(status, "error");
      return;
    }
    if (status.error_code() != grpc::StatusCode::RESOURCE_EXHAUSTED) {
      if (dispatcher_.pool().OnCallFailed(worker) && metrics) metrics->ejections.Increment();
    }
    if (tokens_streamed_ > 0 || final_seen_) {
      Complete(grpc::Status(grpc::StatusCode::UNAVAILABLE,
                            absl::StrCat("worker ", worker, " failed after streaming ", tokens_streamed_,
                                         " tokens (usage so far: prompt ", prompt_.size(), " tokens, completion ",
                                         tokens_streamed_, " tokens): ", status.error_message())),
               "failed_midstream");
      return;
    }
    tried_.insert(worker);
    if (status.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED) {
      full_.insert(worker);
    } else if (++retries_ > dispatcher_.options().max_retries) {
      Complete(grpc::Status(grpc::StatusCode::UNAVAILABLE,
                            absl::StrCat("no worker could serve the request after ", retries_, " attempts; last error from ",
                                         worker, ": ", status.error_message())),
               "retries_exhausted");
      return;
    }
    spdlog::info("retrying a request that failed on {} before streaming: {}", worker, status.error_message());
    if (metrics) metrics->retries.Increment();
    TryNextWorker();
  }

 private:
  // Picks a worker and starts the stream there, or waits for one (off gRPC's threads).
  void TryNextWorker() {
    WorkerPool& pool = dispatcher_.pool();
    std::vector<WorkerChoice> candidates = pool.Candidates(request_.model(), prompt_, tried_);
    if (candidates.empty()) {
      const std::set<std::string> models = pool.Models();
      if (!request_.model().empty() && !models.empty() && models.count(request_.model()) == 0) {
        Complete(grpc::Status(grpc::StatusCode::NOT_FOUND,
                              absl::StrCat("model '", request_.model(), "' is not served by any worker")),
                 "not_found");
        return;
      }
      if (Clock::now() >= queue_deadline_) {
        const bool all_full = !full_.empty();
        Complete(all_full ? grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                                         absl::StrCat("every worker is full; waited ",
                                                      dispatcher_.options().queue_timeout.count(), " ms"))
                          : grpc::Status(grpc::StatusCode::UNAVAILABLE,
                                         absl::StrCat("no worker is available (waited ",
                                                      dispatcher_.options().queue_timeout.count(), " ms)")),
                 all_full ? "queue_timeout" : "unavailable");
        return;
      }
      // Full workers may have room once their load changes; failed ones stay excluded.
      std::thread([self = shared_from_this()] {
        self->dispatcher_.pool().WaitForChange(
            std::min(self->queue_deadline_, Clock::now() + std::chrono::milliseconds(50)));
        for (const std::string& w : self->full_) self->tried_.erase(w);
        self->full_.clear();
        self->TryNextWorker();
      }).detach();
      return;
    }
    std::vector<Candidate> loads;
    for (const WorkerChoice& c : candidates) loads.push_back(c.load);
    const size_t chosen = dispatcher_.policy().Choose(loads, rng_);
    const WorkerChoice& w = candidates[chosen];
    if (spdlog::should_log(spdlog::level::debug)) {
      std::string view;
      for (const WorkerChoice& c : candidates) {
        absl::StrAppend(&view, " ", c.address, "(cost ", LoadCost(c.load), ", cached ", c.load.cached_prefix_blocks, ")");
      }
      spdlog::debug("routing to {} among{}", w.address, view);
    }
    if (auto* m = dispatcher_.metrics()) {
      m->ObserveDecision(w.load.cached_prefix_blocks > 0 ? "prefix_affinity" : "load");
      m->ObserveRouted(Clock::now() - arrival_);
    }
    worker_ = w.address;
    pool.OnDispatched(w.address);

    auto* attempt = new Attempt(shared_from_this(), deadline_);  // deletes itself after OnDone
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (cancelled_) {
        delete attempt;
        Complete(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled"), "cancelled");
        return;
      }
      context_ = &attempt->context();
    }
    attempt->Begin(*w.stub, request_);
  }

  void Complete(const grpc::Status& status, const char* outcome) {
    if (auto* m = dispatcher_.metrics()) {
      m->ObserveRequest(request_.model(), outcome, status.error_code(), Clock::now() - arrival_);
    }
    observer_->OnDone(status);
    self_.reset();  // may destroy *this: nothing after this line
  }

  Dispatcher& dispatcher_;
  const GenerateRequest request_;
  std::shared_ptr<GenerationObserver> observer_;
  const std::chrono::system_clock::time_point deadline_;
  const Clock::time_point arrival_;
  const Clock::time_point queue_deadline_;
  std::mt19937_64 rng_;
  std::vector<int32_t> prompt_;
  std::shared_ptr<ProxyCall> self_;  // alive until Complete

  std::mutex mu_;  // guards cancelled_ and context_ (Cancel comes from the client's threads)
  bool cancelled_ = false;
  grpc::ClientContext* context_ = nullptr;

  // Touched by one attempt at a time (its reactor's callbacks, or the waiting thread).
  std::string worker_;
  std::set<std::string> tried_;
  std::set<std::string> full_;
  int retries_ = 0;
  int64_t tokens_streamed_ = 0;
  bool first_token_seen_ = false;
  bool final_seen_ = false;
};

void Attempt::OnReadDone(bool ok) {
  if (!ok) return;  // the stream ended; OnDone follows with its status
  call_->OnResponse(response_);
  StartRead(&response_);
}

void Attempt::OnDone(const grpc::Status& status) {
  std::shared_ptr<ProxyCall> call = std::move(call_);
  call->OnAttemptDone(status);
  delete this;
}

}  // namespace

Dispatcher::Dispatcher(WorkerPool& pool, RoutingPolicy& policy, const DispatcherOptions& options,
                       RouterMetrics* metrics)
    : pool_(pool), policy_(policy), options_(options), metrics_(metrics) {}

std::shared_ptr<GenerationHandle> Dispatcher::Generate(const GenerateRequest& request,
                                                       std::shared_ptr<GenerationObserver> observer,
                                                       std::chrono::system_clock::time_point deadline) {
  auto call = std::make_shared<ProxyCall>(*this, request, std::move(observer), deadline);
  call->Start();
  return call;
}

}  // namespace cohort
