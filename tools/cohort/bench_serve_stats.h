// What `cohort bench serve` reports for one load level: latency distributions of the measured
// requests and throughput over the measured window (see bench_serve_load.h), as JSON and as a row
// of the table printed at the end.
//
// Per request: TTFT (sent to first token), TPOT (first to last token over the tokens after the
// first), inter-token latency (every gap between successive token arrivals, pooled over requests)
// and end-to-end latency (sent to the end of the stream). Goodput counts the measured requests that
// met every latency bound given (TTFT and TPOT), as a share of the request throughput.
#pragma once

#include <string>
#include <vector>

#include "nlohmann/json.hpp"
#include "tools/cohort/bench_serve_load.h"

namespace cohort::bench {

struct Distribution {
  int64_t count = 0;
  double mean = 0, min = 0, p50 = 0, p90 = 0, p99 = 0, max = 0;
};
// Percentiles interpolate linearly between the closest ranks (numpy's default).
Distribution Summarize(std::vector<double> values);

struct Slo {
  double ttft_ms = 0;  // 0: no bound
  double tpot_ms = 0;
};

struct RunSummary {
  LoadPlan plan;
  int64_t measured = 0;   // requests measured (num_requests)
  int64_t completed = 0;  // of those, finished without error
  int64_t failed = 0;
  std::vector<std::string> errors;  // distinct messages, the first few
  double window_s = 0;
  double request_throughput = 0;  // completions per second in the window
  double output_throughput = 0;   // output tokens per second in the window
  int64_t input_tokens = 0;       // of the measured requests
  int64_t output_tokens = 0;
  int64_t cached_prompt_tokens = 0;
  Distribution ttft_ms, tpot_ms, itl_ms, e2e_ms;
  int64_t slo_met = 0;
  double goodput = 0;  // requests per second that met the bounds
  nlohmann::ordered_json requests = nlohmann::ordered_json::array();  // one object per measured request
};

RunSummary Summarize(const LoadResult& result, const Slo& slo);
nlohmann::ordered_json ToJson(const RunSummary& summary);
// The table printed at the end: one row per run.
std::string FormatTable(const std::vector<RunSummary>& runs, const Slo& slo);

}  // namespace cohort::bench
