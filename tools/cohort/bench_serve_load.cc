#include "tools/cohort/bench_serve_load.h"

#include <algorithm>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <mutex>
#include <random>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace cohort::bench {
namespace {

using Phase = RequestRecord::Phase;

constexpr int kMaxFailuresInARow = 20;
constexpr auto kRedrawEvery = std::chrono::milliseconds(200);

bool RequestIsMalformed(const absl::Status& status) {
  // The server says the request itself is wrong: every other request would fail the same way.
  return absl::IsInvalidArgument(status) || absl::IsNotFound(status) || absl::IsUnimplemented(status) ||
         absl::IsFailedPrecondition(status) || absl::IsPermissionDenied(status) || absl::IsUnauthenticated(status);
}

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// Finished records handed over from the transport's threads.
class Inbox {
 public:
  void Push(RequestRecord* record) {
    std::lock_guard<std::mutex> lock(mu_);
    done_.push_back(record);
    wake_.notify_one();
  }
  // Waits until something finished or `until`; returns what finished.
  std::deque<RequestRecord*> Take(Clock::time_point until) {
    std::unique_lock<std::mutex> lock(mu_);
    wake_.wait_until(lock, until, [&] { return !done_.empty(); });
    std::deque<RequestRecord*> out;
    out.swap(done_);
    return out;
  }

 private:
  std::mutex mu_;
  std::condition_variable wake_;
  std::deque<RequestRecord*> done_;
};

// The progress bar: one line on stderr, redrawn in place.
class ProgressBar {
 public:
  ProgressBar(bool enabled, std::string name, int64_t total) : enabled_(enabled), name_(std::move(name)), total_(total) {}
  ~ProgressBar() {
    if (enabled_ && drawn_) std::fputs("\r\033[K", stderr);
  }
  void Draw(int64_t measured_done, int64_t failed, int64_t tokens, double elapsed_s) {
    if (!enabled_) return;
    const auto now = Clock::now();
    if (drawn_ && now - last_ < kRedrawEvery) return;
    last_ = now;
    drawn_ = true;
    constexpr int kWidth = 30;
    const int filled = static_cast<int>(kWidth * measured_done / std::max<int64_t>(1, total_));
    std::string bar(static_cast<size_t>(filled), '#');
    bar.resize(kWidth, '.');
    std::fputs(absl::StrFormat("\r\033[K%s [%s] %d/%d requests, %.1f s, %.0f tok/s%s", name_, bar, measured_done,
                               total_, elapsed_s, elapsed_s > 0 ? tokens / elapsed_s : 0.0,
                               failed > 0 ? absl::StrCat(", ", failed, " failed") : "")
                   .c_str(),
               stderr);
    std::fflush(stderr);
  }

 private:
  bool enabled_;
  std::string name_;
  int64_t total_;
  bool drawn_ = false;
  Clock::time_point last_{};
};

}  // namespace

std::string LoadPlan::Name() const {
  return mode == Mode::kClosed ? absl::StrCat("concurrency ", concurrency) : absl::StrFormat("rate %g/s", rate);
}

absl::StatusOr<LoadResult> RunLoad(Transport& transport, Workload& workload, const LoadPlan& plan, bool progress) {
  LoadResult result;
  result.plan = plan;
  Inbox inbox;
  ProgressBar bar(progress, plan.Name(), plan.num_requests);
  const Transport::DoneFn done = [&inbox](RequestRecord* r) { inbox.Push(r); };

  int64_t in_flight = 0;
  int64_t measured_done = 0;
  int64_t failed = 0;
  int64_t failures_in_a_row = 0;
  int64_t tokens = 0;
  absl::Status abort;
  auto send = [&] {
    const int64_t index = static_cast<int64_t>(result.records.size());
    auto record = std::make_unique<RequestRecord>();
    record->phase = index < plan.warmup_requests                     ? Phase::kWarmup
                    : index < plan.warmup_requests + plan.num_requests ? Phase::kMeasured
                                                                       : Phase::kCooldown;
    const BenchRequest request = workload.Next();
    record->prompt_tokens = request.prompt_tokens();
    record->max_tokens = request.max_tokens;
    RequestRecord* raw = record.get();
    result.records.push_back(std::move(record));
    ++in_flight;
    transport.Start(request, raw, done);
    if (index == plan.warmup_requests) result.window_start = raw->sent;
  };
  // Takes in finished requests; false once the run must stop.
  auto take_in = [&](const std::deque<RequestRecord*>& finished) {
    for (RequestRecord* r : finished) {
      --in_flight;
      tokens += r->output_tokens;
      if (r->ok()) {
        failures_in_a_row = 0;
      } else if (!absl::IsCancelled(r->status)) {
        ++failures_in_a_row;
        if (r->phase == Phase::kMeasured) ++failed;
        if (abort.ok() && RequestIsMalformed(r->status)) {
          abort = absl::Status(r->status.code(), absl::StrCat("the server refused a request: ", r->status.message()));
        } else if (abort.ok() && failures_in_a_row >= kMaxFailuresInARow) {
          abort = absl::UnavailableError(
              absl::StrCat(kMaxFailuresInARow, " requests in a row failed; the last: ", r->status.ToString()));
        }
      }
      if (r->phase == Phase::kMeasured) {
        ++measured_done;
        result.window_end = std::max(result.window_end, r->done);
      }
    }
  };

  result.started = Clock::now();
  std::mt19937_64 rng(plan.seed);
  std::exponential_distribution<double> gap(plan.mode == LoadPlan::Mode::kOpen ? plan.rate : 1.0);
  Clock::time_point next_arrival = result.started;
  if (plan.mode == LoadPlan::Mode::kClosed) {
    for (int64_t i = 0; i < plan.concurrency; ++i) send();
  }
  while (measured_done < plan.num_requests && abort.ok()) {
    Clock::time_point wake = Clock::now() + kRedrawEvery;
    if (plan.mode == LoadPlan::Mode::kOpen) wake = std::min(wake, next_arrival);
    const std::deque<RequestRecord*> finished = inbox.Take(wake);
    take_in(finished);
    if (plan.mode == LoadPlan::Mode::kClosed) {
      // Each finished user sends again, until every measured request is done.
      for (size_t i = 0; i < finished.size() && measured_done < plan.num_requests && abort.ok(); ++i) send();
    } else {
      for (const auto now = Clock::now(); next_arrival <= now && measured_done < plan.num_requests && abort.ok();) {
        send();
        next_arrival += std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(gap(rng)));
      }
    }
    bar.Draw(measured_done, failed, tokens, Seconds(Clock::now() - result.started));
  }
  // Cool-down requests (and, after an error, everything) are cancelled; their records stay.
  transport.CancelAll();
  while (in_flight > 0) take_in(inbox.Take(Clock::now() + std::chrono::seconds(1)));
  if (!abort.ok()) return abort;
  return result;
}

}  // namespace cohort::bench
