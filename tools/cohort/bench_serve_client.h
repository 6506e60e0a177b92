// How `cohort bench serve` talks to a server: one Transport per run of the tool, over the public
// gRPC API (cohort.v1.Inference, the router's), the worker's own service (cohort.worker.v1.Worker:
// the same Generate), or the router's OpenAI-style HTTP front (/v1/completions, streamed as
// server-sent events).
//
// Start() returns at once; the request's RequestRecord is filled as its stream arrives, from the
// transport's threads, and `done` is called once when it ends. The gRPC transport runs every stream
// on gRPC's callback API (no thread per stream), so one process drives thousands of streams; the
// HTTP transport holds one thread per open request.
//
//   COHORT_ASSIGN_OR_RETURN(auto transport, Transport::Create({.api = Api::kGrpc, .target = "127.0.0.1:50051"}));
//   COHORT_ASSIGN_OR_RETURN(ServerModel model, transport->Connect(deadline));
//   transport->Start(request, &record, [](RequestRecord* r) { ... });
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "tools/cohort/bench_serve_workload.h"

namespace cohort::bench {

using Clock = std::chrono::steady_clock;

enum class Api { kGrpc, kWorker, kHttp };
absl::StatusOr<Api> ParseApi(absl::string_view name);
const char* ApiName(Api api);

struct TransportOptions {
  Api api = Api::kGrpc;
  std::string target;         // host:port
  std::string model;          // empty: the only model served
  int channels = 4;           // gRPC connections the streams are spread over
  double temperature = 0;
  bool ignore_eos = true;
  double request_timeout_s = 600;
};

// What the server says about the model; zeros where the API does not say (HTTP).
struct ServerModel {
  std::string name;
  int64_t vocab_size = 0;
  int64_t max_context_tokens = 0;
  std::string architecture;
  uint64_t total_parameters = 0;
  uint64_t active_parameters_per_token = 0;
};

// Arrival times of a stream's tokens in batches: `tokens` arrived together at `at`.
struct TokenArrival {
  Clock::time_point at;
  int32_t tokens;
};

// One request as it went. Written only by its stream until `done` is called.
struct RequestRecord {
  enum class Phase { kWarmup, kMeasured, kCooldown };
  Phase phase = Phase::kMeasured;
  int64_t prompt_tokens = 0;  // as sent (token ids), else from the usage
  int64_t max_tokens = 0;
  Clock::time_point sent{};
  Clock::time_point done{};
  std::vector<TokenArrival> arrivals;
  int64_t output_tokens = 0;         // counted from the stream
  int64_t usage_completion_tokens = -1;  // from the final message's usage; -1 when none came
  int64_t cached_prompt_tokens = 0;
  absl::Status status;

  bool ok() const { return status.ok(); }
  Clock::time_point first_token() const { return arrivals.empty() ? done : arrivals.front().at; }
};

class Transport {
 public:
  using DoneFn = std::function<void(RequestRecord*)>;

  static absl::StatusOr<std::unique_ptr<Transport>> Create(const TransportOptions& options);
  virtual ~Transport() = default;

  // Waits until the server answers with the model's description, or `deadline`: UNAVAILABLE then
  // (one line naming the target), NOT_FOUND for an unknown model.
  virtual absl::StatusOr<ServerModel> Connect(Clock::time_point deadline) = 0;
  // Sends `request`; `record` must stay valid until `done(record)` was called.
  virtual void Start(const BenchRequest& request, RequestRecord* record, DoneFn done) = 0;
  // Cancels every request in flight; each still ends with `done` (status CANCELLED).
  virtual void CancelAll() = 0;
};

std::unique_ptr<Transport> CreateGrpcTransport(const TransportOptions& options);
std::unique_ptr<Transport> CreateHttpTransport(const TransportOptions& options);

}  // namespace cohort::bench
