#include "router/server/inference_service.h"

#include <mutex>

#include "common/grpc_stream.h"

namespace cohort {
namespace {

using cohort::v1::GenerateResponse;

class RelayReactor final : public QueuedWriteReactor<GenerateResponse>, public GenerationObserver {
 public:
  void Begin(std::shared_ptr<RelayReactor> self, Dispatcher& dispatcher, const cohort::v1::GenerateRequest& request,
             std::chrono::system_clock::time_point deadline) {
    Retain(self);
    auto handle = dispatcher.Generate(request, std::move(self), deadline);
    bool cancel_now;
    {
      std::lock_guard<std::mutex> lock(mu_);
      handle_ = std::move(handle);
      cancel_now = cancelled_;
    }
    if (cancel_now) handle_->Cancel();
  }

  void OnResponse(const GenerateResponse& response) override { Push(response, nullptr); }
  void OnDone(const grpc::Status& status) override { Push(std::nullopt, &status); }

  void OnCancel() override {
    std::shared_ptr<GenerationHandle> handle;
    {
      std::lock_guard<std::mutex> lock(mu_);
      cancelled_ = true;
      handle = handle_;
    }
    if (handle) handle->Cancel();  // the worker stops within a step; OnDone(CANCELLED) follows
    FinishNow(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled by the client"));
  }

 private:
  std::mutex mu_;
  std::shared_ptr<GenerationHandle> handle_;
  bool cancelled_ = false;
};

}  // namespace

grpc::ServerWriteReactor<GenerateResponse>* InferenceService::Generate(grpc::CallbackServerContext* context,
                                                                       const cohort::v1::GenerateRequest* request) {
  auto reactor = std::make_shared<RelayReactor>();
  reactor->Begin(reactor, dispatcher_, *request, context->deadline());
  return reactor.get();
}

grpc::ServerUnaryReactor* InferenceService::ListModels(grpc::CallbackServerContext* context,
                                                       const cohort::v1::ListModelsRequest*,
                                                       cohort::v1::ListModelsResponse* response) {
  for (const std::string& model : dispatcher_.pool().Models()) response->add_models()->set_name(model);
  auto* reactor = context->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* InferenceService::GetModelInfo(grpc::CallbackServerContext* context,
                                                         const cohort::v1::GetModelInfoRequest* request,
                                                         cohort::v1::ModelInfo* response) {
  auto* reactor = context->DefaultReactor();
  std::vector<WorkerChoice> workers = dispatcher_.pool().Candidates(request->model(), {}, {});
  if (workers.empty()) {
    const auto models = dispatcher_.pool().Models();
    reactor->Finish(!request->model().empty() && !models.empty() && models.count(request->model()) == 0
                        ? grpc::Status(grpc::StatusCode::NOT_FOUND,
                                       "model '" + request->model() + "' is not served by any worker")
                        : grpc::Status(grpc::StatusCode::UNAVAILABLE, "no worker is available"));
    return reactor;
  }
  // Asked of one worker that serves the model; the answer is relayed as it is.
  auto call = std::make_shared<grpc::ClientContext>();
  call->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  workers.front().stub->async()->GetModelInfo(call.get(), request, response,
                                             [reactor, call](grpc::Status status) { reactor->Finish(status); });
  return reactor;
}

}  // namespace cohort
