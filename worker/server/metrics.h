// The worker's Prometheus metrics (names cohort_worker_*), served on --metrics-port.
// Updated from the engine thread; prometheus-cpp's metric objects are thread-safe.
//
// Batching economics (labelled with the model's name, `model`), observed once per engine step from
// EstimateStepCost (worker/model/step_cost.h says what it counts and what it leaves out):
//   cohort_worker_step_weight_read_bytes, _kv_read_bytes, _kv_write_bytes, cohort_worker_step_flops
//       histograms of what each step moved and computed; _sum / step_time_seconds_sum is a rate.
//   cohort_worker_memory_bandwidth_utilization_ratio, cohort_worker_flops_utilization_ratio
//       histograms of each step's achieved rate (its bytes or FLOPs over its wall time) as a fraction
//       of the peak gauges below. The time-weighted fraction over a window is
//       rate(bytes _sum) / rate(step_time_seconds_sum) / peak; the dashboard plots that.
//   cohort_worker_peak_memory_bandwidth_bytes_per_second, cohort_worker_peak_flops_per_second
//       the peaks used (flags, H200 defaults, or measured at start-up on the CPU backend).
//   cohort_worker_step_cost_dollars_total  step wall time x device cost per hour / 3600, summed:
//       dollars of busy device time. Per million output tokens:
//       1e6 * rate(step_cost_dollars_total) / rate(generated_tokens_total).
//   cohort_worker_device_cost_dollars_per_hour  what the worker's devices cost per hour, busy or
//       idle: 1e6 * cost_per_hour / 3600 / rate(generated_tokens_total) is the billed price per
//       million tokens, idle time included.
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
  // Serves /metrics on `bind_address` ("0.0.0.0:9091"; port 0 picks a free one). `model_name` is the
  // `model` label of the economics metrics.
  static absl::StatusOr<std::unique_ptr<WorkerMetrics>> Create(const std::string& bind_address,
                                                               const std::string& model_name);
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

  // Batching economics.
  prometheus::Histogram& step_weight_read_bytes;
  prometheus::Histogram& step_kv_read_bytes;
  prometheus::Histogram& step_kv_write_bytes;
  prometheus::Histogram& step_flops;
  prometheus::Histogram& memory_bandwidth_utilization;
  prometheus::Histogram& flops_utilization;
  prometheus::Gauge& peak_memory_bandwidth;
  prometheus::Gauge& peak_flops;
  prometheus::Gauge& device_cost_per_hour;
  prometheus::Counter& step_cost_dollars;

 private:
  WorkerMetrics(std::shared_ptr<prometheus::Registry> registry, const std::string& model_name);
  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<prometheus::Exposer> exposer_;
  int port_ = 0;
};

}  // namespace cohort
