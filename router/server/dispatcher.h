// Sends one public Generate request to a worker and relays its stream, choosing the worker with
// the routing policy and retrying elsewhere when a worker fails before any token was streamed.
//
// Shared by the gRPC front and the HTTP front: both hand in a GenerationObserver and get a handle
// that cancels the call. Everything here is asynchronous (gRPC's callback client API); observers
// are called from gRPC threads and must not block.
#pragma once

#include <chrono>
#include <memory>
#include <random>

#include "cohort/v1/inference.pb.h"
#include "router/policy/policy.h"
#include "router/pool/worker_pool.h"

namespace cohort {

class RouterMetrics;

class GenerationObserver {
 public:
  virtual ~GenerationObserver() = default;
  // A chunk or the final message, in order.
  virtual void OnResponse(const cohort::v1::GenerateResponse& response) = 0;
  // The last call: OK after the final message, or the error.
  virtual void OnDone(const grpc::Status& status) = 0;
};

class GenerationHandle {
 public:
  virtual ~GenerationHandle() = default;
  // Cancels the call on the worker at once; the observer then gets OnDone(CANCELLED).
  virtual void Cancel() = 0;
};

struct DispatcherOptions {
  int max_retries = 2;                              // further workers tried after a failure
  std::chrono::milliseconds queue_timeout{10000};   // how long to wait for a worker with room
};

class Dispatcher {
 public:
  Dispatcher(WorkerPool& pool, RoutingPolicy& policy, const DispatcherOptions& options, RouterMetrics* metrics);

  // `deadline`: the client's, passed on to the worker.
  std::shared_ptr<GenerationHandle> Generate(const cohort::v1::GenerateRequest& request,
                                             std::shared_ptr<GenerationObserver> observer,
                                             std::chrono::system_clock::time_point deadline);

  WorkerPool& pool() { return pool_; }
  RoutingPolicy& policy() { return policy_; }
  const DispatcherOptions& options() const { return options_; }
  RouterMetrics* metrics() { return metrics_; }

 private:
  WorkerPool& pool_;
  RoutingPolicy& policy_;
  DispatcherOptions options_;
  RouterMetrics* metrics_;
};

}  // namespace cohort
