#include "worker/server/worker_service.h"

#include <deque>
#include <mutex>

#include "spdlog/spdlog.h"

namespace cohort {
namespace {

using cohort::v1::GenerateResponse;
using cohort::worker::v1::LoadReport;

// Streams one request's output. The engine thread pushes messages; at most one write is in flight,
// the rest wait in `queue_`. Locking: `mu_` guards the queue and the flags only, and is never held
// while calling into gRPC (a reaction may run inline).
class GenerateReactor final : public grpc::ServerWriteReactor<GenerateResponse>, public GenerationSink {
 public:
  explicit GenerateReactor(EngineLoop& loop) : loop_(loop) {}

  // Takes ownership of itself until OnDone.
  void Begin(std::shared_ptr<GenerateReactor> self, GenerateSpec spec) {
    self_ = std::move(self);
    absl::StatusOr<uint64_t> id = loop_.Submit(std::move(spec), self_);
    if (!id.ok()) {
      FinishOnce(ToGrpcStatus(id.status()));
      return;
    }
    std::lock_guard<std::mutex> lock(mu_);
    id_ = *id;
  }

  // Ends the stream with `status` at once (the request was invalid).
  void Reject(std::shared_ptr<GenerateReactor> self, const grpc::Status& status) {
    self_ = std::move(self);
    FinishOnce(status);
  }

  void OnChunk(GenerateResponse chunk) override { Enqueue(std::move(chunk), nullptr); }

  void OnFinish(const absl::Status& status, GenerateResponse final) override {
    grpc::Status grpc_status = ToGrpcStatus(status);
    if (status.ok()) {
      Enqueue(std::move(final), &grpc_status);
    } else {
      Enqueue(std::nullopt, &grpc_status);
    }
  }

  void OnWriteDone(bool ok) override {
    const GenerateResponse* next = nullptr;
    bool finish = false;
    grpc::Status status;
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.pop_front();
      if (!ok) return;  // the stream broke; OnCancel follows
      if (!queue_.empty()) {
        next = &queue_.front();
      } else {
        writing_ = false;
        finish = final_status_.has_value() && !finished_;
        if (finish) {
          finished_ = true;
          status = *final_status_;
        }
      }
    }
    if (next != nullptr) StartWrite(next);
    if (finish) Finish(status);
  }

  void OnCancel() override {
    uint64_t id;
    {
      std::lock_guard<std::mutex> lock(mu_);
      id = id_;
    }
    if (id != 0) loop_.Cancel(id);
    FinishOnce(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled"));
  }

  void OnDone() override {
    std::lock_guard<std::mutex> lock(mu_);
    done_ = true;
    self_.reset();  // the engine loop may still hold a reference; its pushes are then ignored
  }

 private:
  // Queues a message (if any) and, with `status`, the end of the stream after it.
  void Enqueue(std::optional<GenerateResponse> message, const grpc::Status* status) {
    const GenerateResponse* start = nullptr;
    bool finish = false;
    grpc::Status finish_status;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (done_ || finished_) return;
      if (message) queue_.push_back(std::move(*message));  // deque: references to queued items stay valid
      if (status != nullptr) final_status_ = *status;
      if (writing_) return;
      if (!queue_.empty()) {
        writing_ = true;
        start = &queue_.front();
      } else if (final_status_) {
        finished_ = true;
        finish = true;
        finish_status = *final_status_;
      }
    }
    if (start != nullptr) StartWrite(start);
    if (finish) Finish(finish_status);
  }

  void FinishOnce(const grpc::Status& status) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (finished_) return;
      finished_ = true;
    }
    Finish(status);
  }

  EngineLoop& loop_;
  std::mutex mu_;
  std::shared_ptr<GenerateReactor> self_;
  uint64_t id_ = 0;  // 0 until the engine loop accepted the request
  std::deque<GenerateResponse> queue_;
  std::optional<grpc::Status> final_status_;
  bool writing_ = false;
  bool finished_ = false;
  bool done_ = false;
};

// Streams load reports: whenever no write is in flight and the publisher has a newer state, the
// next report (with the prefix-cache events this subscriber has not seen) is written.
class LoadReactor final : public grpc::ServerWriteReactor<LoadReport> {
 public:
  LoadReactor(LoadPublisher& publisher, uint64_t after_event_id)
      : publisher_(publisher), last_event_id_(after_event_id) {}

  void Begin(std::shared_ptr<LoadReactor> self) {
    self_ = self;
    std::weak_ptr<LoadReactor> weak = self;
    token_ = publisher_.Subscribe([weak] {
      if (auto reactor = weak.lock()) reactor->MaybeWrite();
    });
    MaybeWrite();
  }

  void OnWriteDone(bool ok) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      writing_ = false;
      if (!ok) return;
    }
    MaybeWrite();
  }

  void OnCancel() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (finished_) return;
      finished_ = true;
    }
    Finish(grpc::Status::OK);
  }

  void OnDone() override {
    publisher_.Unsubscribe(token_);
    std::lock_guard<std::mutex> lock(mu_);
    self_.reset();
  }

 private:
  void MaybeWrite() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (writing_ || finished_) return;
      if (sent_version_ != 0 && publisher_.version() == sent_version_) return;
      uint64_t version = 0;
      current_ = publisher_.Next(last_event_id_, &last_event_id_, &version);
      if (version == 0) return;  // nothing published yet
      sent_version_ = version;
      writing_ = true;
    }
    StartWrite(&current_);
  }

  LoadPublisher& publisher_;
  std::mutex mu_;
  std::shared_ptr<LoadReactor> self_;
  int token_ = -1;
  uint64_t last_event_id_;
  uint64_t sent_version_ = 0;
  LoadReport current_;  // the message being written
  bool writing_ = false;
  bool finished_ = false;
};

}  // namespace

grpc::Status ToGrpcStatus(const absl::Status& status) {
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

grpc::ServerWriteReactor<GenerateResponse>* WorkerService::Generate(grpc::CallbackServerContext* context,
                                                                    const cohort::v1::GenerateRequest* request) {
  auto reactor = std::make_shared<GenerateReactor>(loop_);
  absl::StatusOr<GenerateSpec> spec = ParseGenerateRequest(*request, loop_.limits());
  if (!spec.ok()) {
    spdlog::debug("rejected request '{}': {}", request->request_id(), std::string(spec.status().message()));
    reactor->Reject(reactor, ToGrpcStatus(spec.status()));
  } else {
    reactor->Begin(reactor, std::move(*spec));
  }
  return reactor.get();
}

grpc::ServerWriteReactor<LoadReport>* WorkerService::StreamLoad(
    grpc::CallbackServerContext* context, const cohort::worker::v1::StreamLoadRequest* request) {
  auto reactor = std::make_shared<LoadReactor>(publisher_, request->after_event_id());
  reactor->Begin(reactor);
  return reactor.get();
}

grpc::ServerUnaryReactor* WorkerService::GetModelInfo(grpc::CallbackServerContext* context,
                                                      const cohort::v1::GetModelInfoRequest* request,
                                                      cohort::v1::ModelInfo* response) {
  auto* reactor = context->DefaultReactor();
  const ModelLimits& limits = loop_.limits();
  if (!request->model().empty() && request->model() != limits.model_name) {
    reactor->Finish(grpc::Status(grpc::StatusCode::NOT_FOUND,
                                 "model '" + request->model() + "' is not served here (this worker serves '" +
                                     limits.model_name + "')"));
    return reactor;
  }
  const ModelConfig& c = loop_.model_config();
  response->set_name(limits.model_name);
  response->set_architecture(c.architecture_name);
  response->set_vocab_size(static_cast<uint32_t>(c.vocab_size));
  response->set_max_context_tokens(static_cast<uint32_t>(c.max_position_embeddings));
  response->set_num_layers(static_cast<uint32_t>(c.num_layers));
  response->set_num_routed_experts(static_cast<uint32_t>(c.n_routed_experts));
  response->set_experts_per_token(static_cast<uint32_t>(c.num_experts_per_tok));
  const ParameterCounts params = CountParameters(c);
  response->set_total_parameters(static_cast<uint64_t>(params.total));
  response->set_active_parameters_per_token(static_cast<uint64_t>(params.active_per_token));
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace cohort
