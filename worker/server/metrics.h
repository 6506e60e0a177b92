// The worker's Prometheus metrics (names cohort_worker_*), served on --metrics-port.
// Updated from the engine thread; prometheus-cpp's metric objects are thread-safe.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace prometheus {
class Counter;
class Exposer;
class Gauge;
class Histogram;
class Registry;
}  // namespace prometheus

namespace cohort {

class WorkerMetrics {
 public:
  // Serves /metrics on `bind_address` ("0.0.0.0:9091"; port 0 picks a free one).
  static absl::StatusOr<std::unique_ptr<WorkerMetrics>> Create(const std::string& bind_address);
  ~WorkerMetrics();

  int port() const { return port_; }

  prometheus::Gauge& requests_running;
  prometheus::Gauge& requests_waiting;
  prometheus::Gauge& kv_blocks_used;
  prometheus::Gauge& kv_blocks_total;
  prometheus::Counter& prefix_cache_queries;
  prometheus::Counter& prefix_cache_hits;
  prometheus::Counter& preemptions;
  prometheus::Counter& prompt_tokens;
  prometheus::Counter& generated_tokens;
  prometheus::Counter& requests_finished;
  prometheus::Counter& requests_rejected;
  prometheus::Histogram& time_to_first_token;
  prometheus::Histogram& time_per_output_token;
  prometheus::Histogram& e2e_latency;
  prometheus::Histogram& queue_time;
  prometheus::Histogram& step_time;
  prometheus::Histogram& batch_tokens;

 private:
  explicit WorkerMetrics(std::shared_ptr<prometheus::Registry> registry);
  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<prometheus::Exposer> exposer_;
  int port_ = 0;
};

}  // namespace cohort
