#include "worker/server/metrics.h"

#include <prometheus/counter.h>
#include <prometheus/exposer.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <map>

#include "absl/strings/str_cat.h"
#include "common/metrics_server.h"
#include "common/status.h"

namespace cohort {
namespace {

using prometheus::Histogram;

using Labels = std::map<std::string, std::string>;

prometheus::Gauge& Gauge(prometheus::Registry& r, const std::string& name, const std::string& help,
                         const Labels& labels = {}) {
  return prometheus::BuildGauge().Name(name).Help(help).Register(r).Add(labels);
}

prometheus::Counter& Counter(prometheus::Registry& r, const std::string& name, const std::string& help,
                             const Labels& labels = {}) {
  return prometheus::BuildCounter().Name(name).Help(help).Register(r).Add(labels);
}

Histogram& Hist(prometheus::Registry& r, const std::string& name, const std::string& help,
                Histogram::BucketBoundaries buckets, const Labels& labels = {}) {
  return prometheus::BuildHistogram().Name(name).Help(help).Register(r).Add(labels, std::move(buckets));
}

const Histogram::BucketBoundaries kLatencySeconds = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                                     1,     2.5,  5,     10,   30,  60,  120};
const Histogram::BucketBoundaries kStepSeconds = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                                  0.05,   0.1,   0.25,   0.5,   1,    2.5};
const Histogram::BucketBoundaries kBatchTokens = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192};

// Powers of 4 from 1 KiB to 4 TiB: a toy model's decode step up to a full DeepSeek-V3 sweep of experts.
Histogram::BucketBoundaries StepBytes() {
  Histogram::BucketBoundaries buckets;
  for (double b = 1024; b <= 4.5e12; b *= 4) buckets.push_back(b);
  return buckets;
}
// Powers of 10 from 1e4 to 1e16.
Histogram::BucketBoundaries StepFlops() {
  Histogram::BucketBoundaries buckets;
  for (double f = 1e4; f <= 1.5e16; f *= 10) buckets.push_back(f);
  return buckets;
}
const Histogram::BucketBoundaries kUtilization = {0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3,
                                                  0.4,   0.5,   0.6,   0.7,  0.8,  0.9,  1.0, 1.25, 1.5};

}  // namespace

WorkerMetrics::WorkerMetrics(std::shared_ptr<prometheus::Registry> registry, const std::string& model_name)
    : requests_running(Gauge(*registry, "cohort_worker_requests_running", "Requests in the running batch.")),
      requests_waiting(Gauge(*registry, "cohort_worker_requests_waiting", "Requests queued for admission.")),
      kv_blocks_used(Gauge(*registry, "cohort_worker_kv_blocks_used", "KV-cache blocks held by requests.")),
      kv_blocks_total(Gauge(*registry, "cohort_worker_kv_blocks_total", "KV-cache blocks in all.")),
      prefix_cache_queries(Counter(*registry, "cohort_worker_prefix_cache_queries_total",
                                   "Admissions that looked up the prefix cache.")),
      prefix_cache_hits(Counter(*registry, "cohort_worker_prefix_cache_hit_blocks_total",
                                "KV blocks served from the prefix cache.")),
      preemptions(Counter(*registry, "cohort_worker_preemptions_total", "Requests preempted to free KV blocks.")),
      prompt_tokens(Counter(*registry, "cohort_worker_prompt_tokens_total", "Prompt tokens of admitted requests.")),
      generated_tokens(Counter(*registry, "cohort_worker_generated_tokens_total", "Tokens generated.")),
      requests_finished(Counter(*registry, "cohort_worker_requests_finished_total",
                                "Requests that finished (stop, length or cancelled).")),
      requests_rejected(Counter(*registry, "cohort_worker_requests_rejected_total",
                                "Requests refused at submission (invalid, queue full, draining).")),
      time_to_first_token(Hist(*registry, "cohort_worker_time_to_first_token_seconds",
                               "From arrival to the first generated token.", kLatencySeconds)),
      time_per_output_token(Hist(*registry, "cohort_worker_time_per_output_token_seconds",
                                 "Mean time between tokens after the first, per request.", kStepSeconds)),
      e2e_latency(Hist(*registry, "cohort_worker_e2e_latency_seconds", "From arrival to the last token.",
                       kLatencySeconds)),
      queue_time(Hist(*registry, "cohort_worker_queue_time_seconds", "From arrival to first admission.",
                      kLatencySeconds)),
      step_time(Hist(*registry, "cohort_worker_step_time_seconds", "Duration of one engine step.", kStepSeconds)),
      batch_tokens(Hist(*registry, "cohort_worker_batch_tokens", "Tokens computed per engine step.", kBatchTokens)),
      step_weight_read_bytes(Hist(*registry, "cohort_worker_step_weight_read_bytes",
                                  "Weight bytes one engine step read: every weight it used once, routed experts "
                                  "only for those that got a token.",
                                  StepBytes(), {{"model", model_name}})),
      step_kv_read_bytes(Hist(*registry, "cohort_worker_step_kv_read_bytes",
                              "KV-cache bytes one engine step read: each sequence's cache up to its last new token.",
                              StepBytes(), {{"model", model_name}})),
      step_kv_write_bytes(Hist(*registry, "cohort_worker_step_kv_write_bytes",
                               "KV-cache bytes one engine step wrote: its new tokens' entries.", StepBytes(),
                               {{"model", model_name}})),
      step_flops(Hist(*registry, "cohort_worker_step_flops",
                      "Floating-point operations one engine step computed (a count; MLA attention in the "
                      "absorbed form).",
                      StepFlops(), {{"model", model_name}})),
      memory_bandwidth_utilization(
          Hist(*registry, "cohort_worker_memory_bandwidth_utilization_ratio",
               "Bytes one step read and wrote over its wall time, as a fraction of "
               "cohort_worker_peak_memory_bandwidth_bytes_per_second.",
               kUtilization, {{"model", model_name}})),
      flops_utilization(Hist(*registry, "cohort_worker_flops_utilization_ratio",
                             "FLOPs of one step over its wall time, as a fraction of "
                             "cohort_worker_peak_flops_per_second.",
                             kUtilization, {{"model", model_name}})),
      peak_memory_bandwidth(Gauge(*registry, "cohort_worker_peak_memory_bandwidth_bytes_per_second",
                                  "Peak memory bandwidth of the worker's devices (--peak-memory-bandwidth, or "
                                  "measured at start-up on the CPU backend).",
                                  {{"model", model_name}})),
      peak_flops(Gauge(*registry, "cohort_worker_peak_flops_per_second",
                       "Peak FLOP rate of the worker's devices (--peak-tflops, or measured at start-up on the "
                       "CPU backend).",
                       {{"model", model_name}})),
      device_cost_per_hour(Gauge(*registry, "cohort_worker_device_cost_dollars_per_hour",
                                 "What the worker's devices cost per hour, busy or idle (--gpu-hour-cost per "
                                 "device).",
                                 {{"model", model_name}})),
      step_cost_dollars(Counter(*registry, "cohort_worker_step_cost_dollars_total",
                                "Device cost of the time spent in engine steps: step wall time x "
                                "cohort_worker_device_cost_dollars_per_hour / 3600.",
                                {{"model", model_name}})),
      registry_(std::move(registry)) {}

WorkerMetrics::~WorkerMetrics() = default;

absl::StatusOr<std::unique_ptr<WorkerMetrics>> WorkerMetrics::Create(const std::string& bind_address,
                                                                     const std::string& model_name) {
  auto metrics =
      std::unique_ptr<WorkerMetrics>(new WorkerMetrics(std::make_shared<prometheus::Registry>(), model_name));
  COHORT_ASSIGN_OR_RETURN(MetricsServer server, ServeMetrics(bind_address, metrics->registry_, "--metrics-port"));
  metrics->exposer_ = std::move(server.exposer);
  metrics->port_ = server.port;
  return metrics;
}

}  // namespace cohort
