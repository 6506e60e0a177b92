// cohort-router: the stateless front of a Cohort deployment. Serves the public cohort.v1 API and
// relays each request to the worker that serves it best. See --help.
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include <csignal>
#include <cstdio>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/flags.h"
#include "common/program.h"
#include "common/server_start.h"
#include "common/status.h"
#include "nlohmann/json.hpp"
#include "router/http/http_front.h"
#include "router/policy/policy.h"
#include "router/pool/worker_pool.h"
#include "router/server/dispatcher.h"
#include "router/server/inference_service.h"
#include "router/server/metrics.h"
#include "spdlog/spdlog.h"

namespace cohort {
namespace {

struct RouterFlags {
  std::string host = "0.0.0.0";
  int port = 50051;
  int metrics_port = 9090;
  int http_port = 8080;
  std::string port_file;
  std::string workers;
  std::string workers_dns;
  int dns_interval_ms = 3000;
  std::string hosts_file;
  std::string policy = "prefix_affinity";
  int queue_timeout_ms = 10000;
  int max_retries = 2;
  double shutdown_timeout_s = 30;
  std::string log_level = "info";
};

volatile std::sig_atomic_t g_signal = 0;
void OnSignal(int signal) { g_signal = signal; }

absl::Status Serve(const RouterFlags& f) {
  if (f.workers.empty() && f.workers_dns.empty()) {
    return absl::InvalidArgumentError("no workers: give --workers host:port,... and/or --workers-dns name:port");
  }
  if (!f.workers_dns.empty() && f.workers_dns.find(':') == std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat("--workers-dns: '", f.workers_dns, "' is not name:port"));
  }
  COHORT_ASSIGN_OR_RETURN(std::unique_ptr<RoutingPolicy> policy, MakePolicy(f.policy));
  WorkerPoolOptions pool_options;
  for (absl::string_view w : absl::StrSplit(f.workers, ',', absl::SkipWhitespace())) {
    if (w.find(':') == absl::string_view::npos) {
      return absl::InvalidArgumentError(absl::StrCat("--workers: '", w, "' is not host:port"));
    }
    pool_options.addresses.emplace_back(w);
  }
  pool_options.dns_target = f.workers_dns;
  pool_options.dns_interval = std::chrono::milliseconds(f.dns_interval_ms);
  pool_options.hosts_file = f.hosts_file;

  std::unique_ptr<RouterMetrics> metrics;
  if (f.metrics_port >= 0) {
    COHORT_ASSIGN_OR_RETURN(metrics, RouterMetrics::Create(absl::StrCat(f.host, ":", f.metrics_port)));
  }
  WorkerPool pool(pool_options);
  pool.Start();
  Dispatcher dispatcher(pool, *policy,
                        {.max_retries = f.max_retries, .queue_timeout = std::chrono::milliseconds(f.queue_timeout_ms)},
                        metrics.get());
  InferenceService service(dispatcher);

  COHORT_ASSIGN_OR_RETURN(StartedServer started, StartGrpcServer(f.host, f.port, service));
  std::unique_ptr<grpc::Server>& server = started.server;
  const int port = started.port;
  spdlog::info("serving cohort.v1.Inference on {}:{} with policy {}{}", f.host, port, f.policy,
               metrics ? absl::StrCat(", metrics on :", metrics->port(), "/metrics") : std::string());
  std::unique_ptr<HttpFront> http;
  if (f.http_port >= 0) {
    COHORT_ASSIGN_OR_RETURN(http, HttpFront::Create(dispatcher, {.host = f.host, .port = f.http_port}));
    spdlog::info("serving the OpenAI-compatible HTTP API on {}:{}", f.host, http->port());
  }
  COHORT_RETURN_IF_ERROR(WritePortFile(f.port_file, {{"grpc_port", port},
                                                      {"metrics_port", metrics ? metrics->port() : -1},
                                                      {"http_port", http ? http->port() : -1}}));

  std::signal(SIGTERM, OnSignal);
  std::signal(SIGINT, OnSignal);
  // Readiness follows the workers: SERVING while at least one can take requests.
  bool serving = false;
  server->GetHealthCheckService()->SetServingStatus(false);
  while (g_signal == 0) {
    const std::vector<WorkerStatus> workers = pool.Statuses();
    bool any_ready = false;
    for (const WorkerStatus& w : workers) any_ready |= w.ready && !w.ejected;
    if (any_ready != serving) {
      serving = any_ready;
      server->GetHealthCheckService()->SetServingStatus(serving);
      spdlog::info(serving ? "ready: a worker can take requests" : "not ready: no worker can take requests");
    }
    if (metrics) metrics->UpdateWorkers(workers);
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  spdlog::info("signal {}: finishing open streams (up to {} s)", static_cast<int>(g_signal), f.shutdown_timeout_s);
  server->GetHealthCheckService()->SetServingStatus(false);
  const auto deadline =
      std::chrono::system_clock::now() + std::chrono::milliseconds(static_cast<int64_t>(f.shutdown_timeout_s * 1000));
  std::thread http_drain;  // both fronts drain at once, until the same deadline
  if (http) http_drain = std::thread([&http, deadline] { http->Shutdown(deadline); });
  server->Shutdown(deadline);
  if (http_drain.joinable()) http_drain.join();
  pool.Stop();
  return absl::OkStatus();
}

}  // namespace
}  // namespace cohort

int main(int argc, char** argv) {
  using cohort::FlagSet;
  cohort::RouterFlags f;
  FlagSet flags("cohort-router",
                "Serves the public cohort.v1.Inference API and relays each request to a cohort-worker, chosen by\n"
                "load, KV-cache occupancy and prefix affinity from the workers' load-report streams. Keeps no\n"
                "state that the streams do not rebuild: run as many replicas as you like.");
  flags.Add("host", &f.host, "address to listen on");
  flags.Add("port", &f.port, "gRPC port (0: any free port; see --port-file)");
  flags.Add("metrics-port", &f.metrics_port, "Prometheus /metrics port (0: any free port, -1: off)");
  flags.Add("http-port", &f.http_port,
            "OpenAI-compatible HTTP port: /v1/completions, /v1/models (0: any free port, -1: off)");
  flags.Add("port-file", &f.port_file,
            "write {\"grpc_port\":..,\"metrics_port\":..,\"http_port\":..} here once serving");
  flags.Add("workers", &f.workers, "workers as host:port,host:port");
  flags.Add("workers-dns", &f.workers_dns, "name:port resolved to every worker (a headless Service), re-resolved");
  flags.Add("dns-interval-ms", &f.dns_interval_ms, "how often --workers-dns is re-resolved");
  flags.Add("hosts-file", &f.hosts_file, "resolve --workers-dns through this hosts-format file (tests)");
  flags.Add("policy", &f.policy, "prefix_affinity, least_loaded or round_robin");
  flags.Add("queue-timeout-ms", &f.queue_timeout_ms, "wait this long for a worker with room, then RESOURCE_EXHAUSTED");
  flags.Add("max-retries", &f.max_retries, "other workers tried when one fails before streaming");
  flags.Add("shutdown-timeout", &f.shutdown_timeout_s, "seconds SIGTERM waits for open streams");
  flags.Add("log-level", &f.log_level, "trace, debug, info, warn, error or off");
  return cohort::RunProgram(flags, argc, argv, f.log_level, [&] { return cohort::Serve(f); });
}
