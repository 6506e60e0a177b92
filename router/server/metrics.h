// The router's Prometheus metrics (names cohort_router_*), served on --metrics-port. Labels are
// bounded: model names, outcomes, status codes, decisions and worker addresses.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "router/pool/worker_pool.h"

namespace prometheus {
class Counter;
class Exposer;
template <typename T>
class Family;
class Gauge;
class Histogram;
class Registry;
}  // namespace prometheus

namespace cohort {

class RouterMetrics {
 public:
  static absl::StatusOr<std::unique_ptr<RouterMetrics>> Create(const std::string& bind_address);
  ~RouterMetrics();
  int port() const { return port_; }

  void ObserveRequest(const std::string& model, const char* outcome, grpc::StatusCode code,
                      std::chrono::steady_clock::duration latency);
  void ObserveFirstToken(std::chrono::steady_clock::duration since_arrival);
  // How a worker was picked: "prefix_affinity" (it held part of the prompt) or "load".
  void ObserveDecision(const char* decision);
  // Time from arrival to the call to the chosen worker: what the router adds before a worker sees it.
  void ObserveRouted(std::chrono::steady_clock::duration since_arrival);
  // Per-worker load as the router sees it.
  void UpdateWorkers(const std::vector<WorkerStatus>& workers);

  prometheus::Counter& retries;
  prometheus::Counter& ejections;

 private:
  explicit RouterMetrics(std::shared_ptr<prometheus::Registry> registry);
  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Family<prometheus::Counter>& requests_;
  prometheus::Family<prometheus::Counter>& decisions_;
  prometheus::Family<prometheus::Gauge>& worker_running_;
  prometheus::Family<prometheus::Gauge>& worker_waiting_;
  prometheus::Family<prometheus::Gauge>& worker_kv_free_;
  prometheus::Family<prometheus::Gauge>& worker_up_;
  prometheus::Histogram& ttft_;
  prometheus::Histogram& e2e_;
  prometheus::Histogram& routing_;
  std::unique_ptr<prometheus::Exposer> exposer_;
  int port_ = 0;
};

}  // namespace cohort
