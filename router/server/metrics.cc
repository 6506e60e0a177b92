#include "router/server/metrics.h"

#include <grpcpp/grpcpp.h>
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

double Seconds(std::chrono::steady_clock::duration d) { return std::chrono::duration<double>(d).count(); }

const Histogram::BucketBoundaries kLatency = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120};
const Histogram::BucketBoundaries kRouting = {0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1};

const char* CodeName(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK: return "OK";
    case grpc::StatusCode::CANCELLED: return "CANCELLED";
    case grpc::StatusCode::INVALID_ARGUMENT: return "INVALID_ARGUMENT";
    case grpc::StatusCode::DEADLINE_EXCEEDED: return "DEADLINE_EXCEEDED";
    case grpc::StatusCode::NOT_FOUND: return "NOT_FOUND";
    case grpc::StatusCode::RESOURCE_EXHAUSTED: return "RESOURCE_EXHAUSTED";
    case grpc::StatusCode::UNIMPLEMENTED: return "UNIMPLEMENTED";
    case grpc::StatusCode::UNAVAILABLE: return "UNAVAILABLE";
    default: return "OTHER";
  }
}

}  // namespace

RouterMetrics::RouterMetrics(std::shared_ptr<prometheus::Registry> r)
    : retries(prometheus::BuildCounter()
                  .Name("cohort_router_retries_total")
                  .Help("Requests sent to another worker after one failed before streaming.")
                  .Register(*r)
                  .Add({})),
      ejections(prometheus::BuildCounter()
                    .Name("cohort_router_ejections_total")
                    .Help("Workers ejected for a while after consecutive failures.")
                    .Register(*r)
                    .Add({})),
      registry_(r),
      requests_(prometheus::BuildCounter()
                    .Name("cohort_router_requests_total")
                    .Help("Requests by model, outcome and gRPC status.")
                    .Register(*r)),
      decisions_(prometheus::BuildCounter()
                     .Name("cohort_router_route_decisions_total")
                     .Help("Routing decisions: prefix_affinity when the chosen worker held part of the prompt.")
                     .Register(*r)),
      worker_running_(prometheus::BuildGauge()
                          .Name("cohort_router_worker_requests_running")
                          .Help("Running requests per worker, from its load reports.")
                          .Register(*r)),
      worker_waiting_(prometheus::BuildGauge()
                          .Name("cohort_router_worker_requests_waiting")
                          .Help("Waiting requests per worker, from its load reports.")
                          .Register(*r)),
      worker_kv_free_(prometheus::BuildGauge()
                          .Name("cohort_router_worker_kv_blocks_free")
                          .Help("Free KV blocks per worker, from its load reports.")
                          .Register(*r)),
      worker_up_(prometheus::BuildGauge()
                     .Name("cohort_router_worker_up")
                     .Help("1 when the worker's load stream is up, it is ready and not ejected.")
                     .Register(*r)),
      ttft_(prometheus::BuildHistogram()
                .Name("cohort_router_time_to_first_token_seconds")
                .Help("From the request's arrival at the router to its first token.")
                .Register(*r)
                .Add({}, kLatency)),
      e2e_(prometheus::BuildHistogram()
               .Name("cohort_router_e2e_latency_seconds")
               .Help("From arrival to the end of the stream.")
               .Register(*r)
               .Add({}, kLatency)),
      routing_(prometheus::BuildHistogram()
                   .Name("cohort_router_added_latency_seconds")
                   .Help("From arrival to the call on the chosen worker (routing and queueing).")
                   .Register(*r)
                   .Add({}, kRouting)) {}

RouterMetrics::~RouterMetrics() = default;

absl::StatusOr<std::unique_ptr<RouterMetrics>> RouterMetrics::Create(const std::string& bind_address) {
  auto metrics = std::unique_ptr<RouterMetrics>(new RouterMetrics(std::make_shared<prometheus::Registry>()));
  COHORT_ASSIGN_OR_RETURN(MetricsServer server, ServeMetrics(bind_address, metrics->registry_, "--metrics-port"));
  metrics->exposer_ = std::move(server.exposer);
  metrics->port_ = server.port;
  return metrics;
}

void RouterMetrics::ObserveRequest(const std::string& model, const char* outcome, grpc::StatusCode code,
                                   std::chrono::steady_clock::duration latency) {
  requests_.Add({{"model", model.empty() ? "default" : model}, {"outcome", outcome}, {"code", CodeName(code)}})
      .Increment();
  if (code == grpc::StatusCode::OK) e2e_.Observe(Seconds(latency));
}

void RouterMetrics::ObserveFirstToken(std::chrono::steady_clock::duration since_arrival) {
  ttft_.Observe(Seconds(since_arrival));
}

void RouterMetrics::ObserveDecision(const char* decision) { decisions_.Add({{"decision", decision}}).Increment(); }

void RouterMetrics::ObserveRouted(std::chrono::steady_clock::duration since_arrival) {
  routing_.Observe(Seconds(since_arrival));
}

void RouterMetrics::UpdateWorkers(const std::vector<WorkerStatus>& workers) {
  for (const WorkerStatus& w : workers) {
    const std::map<std::string, std::string> labels = {{"worker", w.address}};
    worker_running_.Add(labels).Set(w.report.running_requests());
    worker_waiting_.Add(labels).Set(w.report.waiting_requests());
    worker_kv_free_.Add(labels).Set(w.report.free_kv_blocks());
    worker_up_.Add(labels).Set(w.connected && w.ready && !w.ejected ? 1 : 0);
  }
}

}  // namespace cohort
