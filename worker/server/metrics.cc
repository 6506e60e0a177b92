#include "worker/server/metrics.h"

#include <prometheus/counter.h>
#include <prometheus/exposer.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include "absl/strings/str_cat.h"
#include "common/metrics_server.h"
#include "common/status.h"

namespace cohort {
namespace {

using prometheus::Histogram;

prometheus::Gauge& Gauge(prometheus::Registry& r, const std::string& name, const std::string& help) {
  return prometheus::BuildGauge().Name(name).Help(help).Register(r).Add({});
}

prometheus::Counter& Counter(prometheus::Registry& r, const std::string& name, const std::string& help) {
  return prometheus::BuildCounter().Name(name).Help(help).Register(r).Add({});
}

Histogram& Hist(prometheus::Registry& r, const std::string& name, const std::string& help,
                Histogram::BucketBoundaries buckets) {
  return prometheus::BuildHistogram().Name(name).Help(help).Register(r).Add({}, std::move(buckets));
}

const Histogram::BucketBoundaries kLatencySeconds = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                                     1,     2.5,  5,     10,   30,  60,  120};
const Histogram::BucketBoundaries kStepSeconds = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                                  0.05,   0.1,   0.25,   0.5,   1,    2.5};
const Histogram::BucketBoundaries kBatchTokens = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192};

}  // namespace

WorkerMetrics::WorkerMetrics(std::shared_ptr<prometheus::Registry> registry)
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
      registry_(std::move(registry)) {}

WorkerMetrics::~WorkerMetrics() = default;

absl::StatusOr<std::unique_ptr<WorkerMetrics>> WorkerMetrics::Create(const std::string& bind_address) {
  auto metrics = std::unique_ptr<WorkerMetrics>(new WorkerMetrics(std::make_shared<prometheus::Registry>()));
  COHORT_ASSIGN_OR_RETURN(MetricsServer server, ServeMetrics(bind_address, metrics->registry_, "--metrics-port"));
  metrics->exposer_ = std::move(server.exposer);
  metrics->port_ = server.port;
  return metrics;
}

}  // namespace cohort
