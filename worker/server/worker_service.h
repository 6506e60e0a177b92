// The worker's gRPC service (worker.proto), on the callback API: one reactor object per stream,
// nothing blocking inside a callback. Generate hands requests to the engine loop and streams what
// it produces; StreamLoad streams load reports; GetModelInfo describes the model.
#pragma once

#include <memory>
#include <string>

#include "cohort/worker/v1/worker.grpc.pb.h"
#include "worker/server/engine_loop.h"
#include "worker/server/load_publisher.h"

namespace cohort {

class WorkerService final : public cohort::worker::v1::Worker::CallbackService {
 public:
  WorkerService(EngineLoop& loop, LoadPublisher& publisher) : loop_(loop), publisher_(publisher) {}

  grpc::ServerWriteReactor<cohort::v1::GenerateResponse>* Generate(
      grpc::CallbackServerContext* context, const cohort::v1::GenerateRequest* request) override;
  grpc::ServerWriteReactor<cohort::worker::v1::LoadReport>* StreamLoad(
      grpc::CallbackServerContext* context, const cohort::worker::v1::StreamLoadRequest* request) override;
  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* context,
                                         const cohort::v1::GetModelInfoRequest* request,
                                         cohort::v1::ModelInfo* response) override;

 private:
  EngineLoop& loop_;
  LoadPublisher& publisher_;
};

// absl::Status -> grpc::Status, code and message unchanged.
grpc::Status ToGrpcStatus(const absl::Status& status);

}  // namespace cohort
