// One load level of `cohort bench serve`: a closed loop (a fixed number of users, each sending its
// next request as soon as the previous one finished) or an open loop (requests arriving as a
// Poisson process at a fixed rate, whatever is still in flight).
//
// Requests are sent in three phases. The first `warmup_requests` warm the server up and are not
// measured; the next `num_requests` are measured; after them the load goes on (cool-down requests)
// until the last measured request finished, so every measured request saw the full load, and then
// what is left is cancelled. Throughput is counted over the measured window: from the moment the
// first measured request was sent to the moment the last one finished, every token and every
// completion that arrived in it, whichever phase its request belongs to.
//
// One thread (the caller's) sends requests and takes in finished ones; streams run on the
// transport's threads, which only hand finished records back through a queue.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "tools/cohort/bench_serve_client.h"
#include "tools/cohort/bench_serve_workload.h"

namespace cohort::bench {

struct LoadPlan {
  enum class Mode { kClosed, kOpen };
  Mode mode = Mode::kClosed;
  int64_t concurrency = 1;  // closed loop: requests in flight
  double rate = 0;          // open loop: requests per second
  int64_t warmup_requests = 0;
  int64_t num_requests = 1;
  uint64_t seed = 0;        // the open loop's arrival times
  std::string Name() const;  // "concurrency 8", "rate 2.5/s"
};

struct LoadResult {
  LoadPlan plan;
  std::vector<std::unique_ptr<RequestRecord>> records;  // every request, in the order sent
  Clock::time_point started{};
  Clock::time_point window_start{};  // the first measured request was sent
  Clock::time_point window_end{};    // the last measured request finished
};

// Runs `plan`. Errors end the run early: a request the server refuses as malformed (its status,
// e.g. INVALID_ARGUMENT), or 20 failures in a row with no success in between (UNAVAILABLE). With
// `progress`, a progress bar is redrawn on stderr (the caller checks that stderr is a terminal).
absl::StatusOr<LoadResult> RunLoad(Transport& transport, Workload& workload, const LoadPlan& plan, bool progress);

}  // namespace cohort::bench
