// The public cohort.v1.Inference service, on gRPC's callback API: Generate is relayed to a worker
// through the Dispatcher; ListModels and GetModelInfo come from the workers' reports.
#pragma once

#include "cohort/v1/inference.grpc.pb.h"
#include "router/server/dispatcher.h"

namespace cohort {

class InferenceService final : public cohort::v1::Inference::CallbackService {
 public:
  explicit InferenceService(Dispatcher& dispatcher) : dispatcher_(dispatcher) {}

  grpc::ServerWriteReactor<cohort::v1::GenerateResponse>* Generate(
      grpc::CallbackServerContext* context, const cohort::v1::GenerateRequest* request) override;
  grpc::ServerUnaryReactor* ListModels(grpc::CallbackServerContext* context,
                                       const cohort::v1::ListModelsRequest* request,
                                       cohort::v1::ListModelsResponse* response) override;
  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* context,
                                         const cohort::v1::GetModelInfoRequest* request,
                                         cohort::v1::ModelInfo* response) override;

 private:
  Dispatcher& dispatcher_;
};

}  // namespace cohort
