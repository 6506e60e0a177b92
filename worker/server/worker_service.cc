#include "worker/server/worker_service.h"

#include <atomic>
#include <mutex>

#include "common/grpc_stream.h"

#include "spdlog/spdlog.h"

namespace cohort {
namespace {

using cohort::v1::GenerateResponse;
using cohort::worker::v1::LoadReport;

// Streams one request's output: the engine thread pushes messages into the queue.
class GenerateReactor final : public QueuedWriteReactor<GenerateResponse>, public GenerationSink {
 public:
  explicit GenerateReactor(EngineLoop& loop) : loop_(loop) {}

  void Begin(std::shared_ptr<GenerateReactor> self, GenerateSpec spec) {
    Retain(self);
    absl::StatusOr<uint64_t> id = loop_.Submit(std::move(spec), std::move(self));
    if (!id.ok()) {
      FinishNow(ToGrpcStatus(id.status()));
      return;
    }
    id_.store(*id);
    if (cancelled_.load()) loop_.Cancel(*id);  // OnCancel ran before the id was known
  }

  // Ends the stream with `status` at once (the request was invalid).
  void Reject(std::shared_ptr<GenerateReactor> self, const grpc::Status& status) {
    Retain(std::move(self));
    FinishNow(status);
  }

  void OnChunk(GenerateResponse chunk) override { Push(std::move(chunk), nullptr); }

  void OnFinish(const absl::Status& status, GenerateResponse final) override {
    const grpc::Status grpc_status = ToGrpcStatus(status);
    Push(status.ok() ? std::optional<GenerateResponse>(std::move(final)) : std::nullopt, &grpc_status);
  }

  void OnCancel() override {
    cancelled_.store(true);
    if (const uint64_t id = id_.load(); id != 0) loop_.Cancel(id);
    FinishNow(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled"));
  }

 private:
  EngineLoop& loop_;
  std::atomic<uint64_t> id_{0};  // 0 until the engine loop accepted the request
  std::atomic<bool> cancelled_{false};
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
