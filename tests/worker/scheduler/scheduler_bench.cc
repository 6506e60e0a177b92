// Scheduling overhead per step, with no engine: how much of a decode step the scheduler itself
// costs at a full batch. Prints the per-step time against the 100 us budget.
//
//   build/bin/scheduler_bench [running=256] [steps=20000]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "worker/scheduler/scheduler.h"

namespace cohort {
namespace {

std::unique_ptr<Request> NewRequest(uint64_t id, std::mt19937& rng) {
  auto r = std::make_unique<Request>();
  r->id = id;
  const int prompt = 64 + static_cast<int>(rng() % 512);
  r->tokens.resize(prompt);
  for (auto& t : r->tokens) t = static_cast<int32_t>(rng() % 100000);
  r->prompt_len = prompt;
  r->max_tokens = 64 + rng() % 512;
  return r;
}

int Run(int running, int steps) {
  std::mt19937 rng(1);
  // Room for every request at full length: this measures scheduling, not preemption.
  BlockManager blocks({.num_blocks = running * 80, .block_size = 16});
  Scheduler scheduler({.max_batch_tokens = 8192, .max_running = running}, blocks);
  uint64_t next_id = 1;
  for (int i = 0; i < running; ++i) (void)scheduler.Add(NewRequest(next_id++, rng));

  std::vector<double> step_us;
  step_us.reserve(steps);
  int64_t tokens = 0;
  std::vector<uint64_t> finished;
  for (int step = 0; step < steps; ++step) {
    const auto start = std::chrono::steady_clock::now();
    StepPlan plan = scheduler.Schedule();
    scheduler.OnStepDone(plan);  // the engine would run here
    finished.clear();
    for (const ScheduledChunk& c : plan.chunks) {
      if (!c.compute_logits) continue;
      c.request->tokens.push_back(static_cast<int32_t>(rng() % 100000));
      if (c.request->num_generated() >= c.request->max_tokens) finished.push_back(c.request->id);
    }
    for (uint64_t id : finished) {
      scheduler.Remove(id);
      (void)scheduler.Add(NewRequest(next_id++, rng));  // keep the batch full
    }
    const auto end = std::chrono::steady_clock::now();
    step_us.push_back(std::chrono::duration<double, std::micro>(end - start).count());
    tokens += plan.num_tokens;
  }
  // Steady state only: skip the first steps, which prefill the initial batch.
  std::vector<double> steady(step_us.begin() + steps / 10, step_us.end());
  std::sort(steady.begin(), steady.end());
  const double p50 = steady[steady.size() / 2], p99 = steady[steady.size() * 99 / 100];
  double mean = 0;
  for (double v : steady) mean += v;
  mean /= static_cast<double>(steady.size());
  std::printf("scheduler_bench: %d running requests, %d steps, %lld tokens scheduled\n", running, steps,
              static_cast<long long>(tokens));
  std::printf("  per step: mean %.1f us, p50 %.1f us, p99 %.1f us (budget 100 us: mean is %.0f%% of it)\n", mean,
              p50, p99, mean);
  std::printf("  per scheduled sequence: %.0f ns\n", mean * 1000.0 / running);
  return mean < 100.0 ? 0 : 1;
}

}  // namespace
}  // namespace cohort

int main(int argc, char** argv) {
  const int running = argc > 1 ? std::atoi(argv[1]) : 256;
  const int steps = argc > 2 ? std::atoi(argv[2]) : 20000;
  return cohort::Run(running, steps);
}
