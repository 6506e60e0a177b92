#include "tools/cohort/bench_serve_stats.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace cohort::bench {
namespace {

using nlohmann::ordered_json;
using Phase = RequestRecord::Phase;

constexpr size_t kMaxErrors = 5;

double Ms(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

double Percentile(const std::vector<double>& sorted, double p) {
  const double rank = p * static_cast<double>(sorted.size() - 1);
  const size_t below = static_cast<size_t>(std::floor(rank));
  const size_t above = std::min(below + 1, sorted.size() - 1);
  return sorted[below] + (sorted[above] - sorted[below]) * (rank - static_cast<double>(below));
}

ordered_json ToJson(const Distribution& d) {
  return {{"count", d.count}, {"mean", d.mean}, {"min", d.min}, {"p50", d.p50},
          {"p90", d.p90},     {"p99", d.p99},   {"max", d.max}};
}

double Round3(double v) { return std::round(v * 1000) / 1000; }

}  // namespace

Distribution Summarize(std::vector<double> values) {
  Distribution d;
  if (values.empty()) return d;
  std::sort(values.begin(), values.end());
  d.count = static_cast<int64_t>(values.size());
  d.mean = std::accumulate(values.begin(), values.end(), 0.0) / static_cast<double>(values.size());
  d.min = values.front();
  d.max = values.back();
  d.p50 = Percentile(values, 0.50);
  d.p90 = Percentile(values, 0.90);
  d.p99 = Percentile(values, 0.99);
  return d;
}

RunSummary Summarize(const LoadResult& result, const Slo& slo) {
  RunSummary s;
  s.plan = result.plan;
  const Clock::time_point from = result.window_start;
  const Clock::time_point to = result.window_end;
  s.window_s = std::max(0.0, std::chrono::duration<double>(to - from).count());

  int64_t window_tokens = 0;
  int64_t window_completions = 0;
  std::vector<double> ttft, tpot, itl, e2e;
  for (const auto& record : result.records) {
    const RequestRecord& r = *record;
    for (const TokenArrival& a : r.arrivals) {
      if (a.at >= from && a.at <= to) window_tokens += a.tokens;
    }
    if (r.ok() && r.done >= from && r.done <= to) ++window_completions;
    if (r.phase != Phase::kMeasured) continue;

    ++s.measured;
    ordered_json request = {{"prompt_tokens", r.prompt_tokens}, {"max_tokens", r.max_tokens},
                            {"output_tokens", r.output_tokens}, {"cached_prompt_tokens", r.cached_prompt_tokens},
                            {"ok", r.ok()}};
    if (!r.ok()) {
      ++s.failed;
      const std::string error = r.status.ToString();
      if (s.errors.size() < kMaxErrors && std::find(s.errors.begin(), s.errors.end(), error) == s.errors.end()) {
        s.errors.push_back(error);
      }
      request["error"] = error;
      s.requests.push_back(std::move(request));
      continue;
    }
    ++s.completed;
    s.input_tokens += r.prompt_tokens;
    s.output_tokens += r.output_tokens;
    s.cached_prompt_tokens += r.cached_prompt_tokens;
    const double ttft_ms = Ms(r.first_token() - r.sent);
    const double e2e_ms = Ms(r.done - r.sent);
    ttft.push_back(ttft_ms);
    e2e.push_back(e2e_ms);
    request["ttft_ms"] = Round3(ttft_ms);
    request["e2e_ms"] = Round3(e2e_ms);
    bool met = slo.ttft_ms <= 0 || ttft_ms <= slo.ttft_ms;
    if (r.output_tokens > 1) {
      const double tpot_ms = Ms(r.arrivals.back().at - r.arrivals.front().at) / static_cast<double>(r.output_tokens - 1);
      tpot.push_back(tpot_ms);
      request["tpot_ms"] = Round3(tpot_ms);
      met = met && (slo.tpot_ms <= 0 || tpot_ms <= slo.tpot_ms);
    }
    for (size_t i = 1; i < r.arrivals.size(); ++i) itl.push_back(Ms(r.arrivals[i].at - r.arrivals[i - 1].at));
    s.slo_met += met;
    request["slo_met"] = met;
    s.requests.push_back(std::move(request));
  }
  s.ttft_ms = Summarize(std::move(ttft));
  s.tpot_ms = Summarize(std::move(tpot));
  s.itl_ms = Summarize(std::move(itl));
  s.e2e_ms = Summarize(std::move(e2e));
  if (s.window_s > 0) {
    s.request_throughput = static_cast<double>(window_completions) / s.window_s;
    s.output_throughput = static_cast<double>(window_tokens) / s.window_s;
  }
  // The share first: a share <= 1 keeps goodput <= throughput exactly, in floating point too.
  if (s.measured > 0) s.goodput = s.request_throughput * (static_cast<double>(s.slo_met) / static_cast<double>(s.measured));
  return s;
}

ordered_json ToJson(const RunSummary& s) {
  const bool closed = s.plan.mode == LoadPlan::Mode::kClosed;
  ordered_json run = {
      {"name", s.plan.Name()},
      {"mode", closed ? "closed" : "open"},
      {"concurrency", closed ? ordered_json(s.plan.concurrency) : ordered_json(nullptr)},
      {"request_rate", closed ? ordered_json(nullptr) : ordered_json(s.plan.rate)},
      {"warmup_requests", s.plan.warmup_requests},
      {"num_requests", s.measured},
      {"completed", s.completed},
      {"failed", s.failed},
      {"errors", s.errors},
      {"duration_s", s.window_s},
      {"request_throughput", s.request_throughput},
      {"output_throughput", s.output_throughput},
      {"total_input_tokens", s.input_tokens},
      {"total_output_tokens", s.output_tokens},
      {"cached_prompt_tokens", s.cached_prompt_tokens},
      {"ttft_ms", ToJson(s.ttft_ms)},
      {"tpot_ms", ToJson(s.tpot_ms)},
      {"itl_ms", ToJson(s.itl_ms)},
      {"e2e_ms", ToJson(s.e2e_ms)},
      {"slo_met", s.slo_met},
      {"goodput", s.goodput},
      {"requests", s.requests},
  };
  return run;
}

std::string FormatTable(const std::vector<RunSummary>& runs, const Slo& slo) {
  std::string out = absl::StrFormat("%-16s %6s %5s %8s %10s %22s %20s %14s %16s %9s\n", "load", "reqs", "fail",
                                    "req/s", "out tok/s", "TTFT ms p50/p90/p99", "TPOT ms p50/p90/p99",
                                    "ITL ms p50/p99", "E2E ms p50/p99", "goodput");
  for (const RunSummary& s : runs) {
    absl::StrAppendFormat(&out, "%-16s %6d %5d %8.2f %10.1f %22s %20s %14s %16s %9.2f\n", s.plan.Name(), s.measured,
                          s.failed, s.request_throughput, s.output_throughput,
                          absl::StrFormat("%.1f/%.1f/%.1f", s.ttft_ms.p50, s.ttft_ms.p90, s.ttft_ms.p99),
                          absl::StrFormat("%.2f/%.2f/%.2f", s.tpot_ms.p50, s.tpot_ms.p90, s.tpot_ms.p99),
                          absl::StrFormat("%.2f/%.2f", s.itl_ms.p50, s.itl_ms.p99),
                          absl::StrFormat("%.0f/%.0f", s.e2e_ms.p50, s.e2e_ms.p99), s.goodput);
  }
  if (slo.ttft_ms > 0 || slo.tpot_ms > 0) {
    absl::StrAppend(&out, "goodput: requests/s that met",
                    slo.ttft_ms > 0 ? absl::StrFormat(" TTFT <= %g ms", slo.ttft_ms) : "",
                    slo.ttft_ms > 0 && slo.tpot_ms > 0 ? " and" : "",
                    slo.tpot_ms > 0 ? absl::StrFormat(" TPOT <= %g ms", slo.tpot_ms) : "", "\n");
  } else {
    absl::StrAppend(&out, "goodput: no latency bound given (--slo-ttft-ms, --slo-tpot-ms), so every completed request counts\n");
  }
  for (const RunSummary& s : runs) {
    for (const std::string& e : s.errors) absl::StrAppend(&out, s.plan.Name(), ": error: ", e, "\n");
  }
  return out;
}

}  // namespace cohort::bench
