// Static batching (`cohort-worker --scheduler static`), the baseline continuous batching is measured
// against, driven step by step beside continuous batching on the same arrivals: what a user would
// notice is when a request that arrives mid-batch gets its first token, and how many steps the
// same mixed-length work takes.
#include <map>
#include <random>

#include "gtest/gtest.h"
#include "worker/scheduler/scheduler.h"

namespace cohort {
namespace {

std::unique_ptr<Request> MakeRequest(uint64_t id, int32_t prompt_len, int64_t max_tokens,
                                     RequestPriority priority = RequestPriority::kInteractive) {
  auto r = std::make_unique<Request>();
  r->id = id;
  for (int32_t i = 0; i < prompt_len; ++i) r->tokens.push_back(static_cast<int32_t>(id * 1000 + i));
  r->prompt_len = prompt_len;
  r->max_tokens = max_tokens;
  r->priority = priority;
  return r;
}

struct StepResult {
  std::map<uint64_t, int64_t> computed;  // request id -> tokens computed this step
  std::vector<uint64_t> first_token;     // requests that got their first token
  std::vector<uint64_t> finished;
};

// One step as the engine loop runs it: schedule, "compute", sample one token per logits row, and
// remove the requests that produced max_tokens.
StepResult Step(Scheduler& s) {
  StepPlan plan = s.Schedule();
  EXPECT_TRUE(plan.preempted.empty()) << "step " << plan.step << " preempted";
  s.OnStepDone(plan);
  StepResult result;
  for (const ScheduledChunk& c : plan.chunks) {
    result.computed[c.request->id] = c.num_tokens;
    if (!c.compute_logits) continue;
    c.request->tokens.push_back(7);
    if (c.request->num_generated() == 1) result.first_token.push_back(c.request->id);
    if (c.request->num_generated() == c.request->max_tokens) result.finished.push_back(c.request->id);
  }
  for (uint64_t id : result.finished) s.Remove(id);
  return result;
}

SchedulerOptions Options(BatchingPolicy batching, int64_t max_batch_tokens = 64, int64_t max_running = 256) {
  return {.max_batch_tokens = max_batch_tokens, .max_running = max_running, .batching = batching};
}

// Requests 1 (3 tokens) and 2 (8 tokens) run; request 3 arrives after the first step. Returns the
// step (1-based) at which request 3 got its first token.
int FirstTokenStepOfLateArrival(BatchingPolicy batching) {
  BlockManager bm({.num_blocks = 64, .block_size = 4});
  Scheduler s(Options(batching), bm);
  EXPECT_TRUE(s.Add(MakeRequest(1, 5, 3)).ok());
  EXPECT_TRUE(s.Add(MakeRequest(2, 5, 8)).ok());
  for (int step = 1; step <= 20; ++step) {
    StepResult r = Step(s);
    if (step == 1) {
      EXPECT_TRUE(s.Add(MakeRequest(3, 5, 2)).ok());
    }
    for (uint64_t id : r.first_token) {
      if (id == 3) return step;
    }
  }
  return -1;
}

TEST(StaticBatchingTest, RequestArrivingMidBatchWaitsForTheWholeBatchToEnd) {
  // Continuous: request 3 is prefilled at step 2, beside the decodes of 1 and 2.
  EXPECT_EQ(FirstTokenStepOfLateArrival(BatchingPolicy::kContinuous), 2);
  // Static: request 2 produces its 8th token at step 8; only then does a new batch form.
  EXPECT_EQ(FirstTokenStepOfLateArrival(BatchingPolicy::kStatic), 9);
}

TEST(StaticBatchingTest, FinishedMembersLeaveButNobodyTakesTheirPlace) {
  BlockManager bm({.num_blocks = 64, .block_size = 4});
  Scheduler s(Options(BatchingPolicy::kStatic), bm);
  ASSERT_TRUE(s.Add(MakeRequest(1, 4, 2)).ok());
  ASSERT_TRUE(s.Add(MakeRequest(2, 4, 5)).ok());
  EXPECT_EQ(Step(s).computed, (std::map<uint64_t, int64_t>{{1, 4}, {2, 4}}));
  ASSERT_TRUE(s.Add(MakeRequest(3, 4, 1)).ok());
  EXPECT_EQ(Step(s).finished, std::vector<uint64_t>{1});
  for (int step = 0; step < 3; ++step) {
    EXPECT_EQ(Step(s).computed, (std::map<uint64_t, int64_t>{{2, 1}}));  // a batch of one: 3 still waits
    EXPECT_EQ(s.num_waiting(), 1u);
  }
  EXPECT_EQ(s.num_running(), 0u);  // 2 finished at the last of those steps
  EXPECT_EQ(Step(s).computed, (std::map<uint64_t, int64_t>{{3, 4}}));
}

TEST(StaticBatchingTest, BatchIsEveryWaitingRequestUpToMaxRunning) {
  BlockManager bm({.num_blocks = 64, .block_size = 4});
  Scheduler s(Options(BatchingPolicy::kStatic, /*max_batch_tokens=*/64, /*max_running=*/3), bm);
  for (uint64_t id = 1; id <= 5; ++id) ASSERT_TRUE(s.Add(MakeRequest(id, 4, id == 1 ? 4 : 2)).ok());
  EXPECT_EQ(Step(s).computed.size(), 3u);
  EXPECT_EQ(s.num_waiting(), 2u);
  int steps = 1;
  while (s.num_running() > 0) {
    Step(s);
    ++steps;
  }
  EXPECT_EQ(steps, 4);  // request 1's 4 tokens set the batch's length
  EXPECT_EQ(Step(s).computed, (std::map<uint64_t, int64_t>{{4, 4}, {5, 4}}));
}

TEST(StaticBatchingTest, MembersBeyondTheTokenBudgetPrefillInTheBatchsLaterSteps) {
  BlockManager bm({.num_blocks = 64, .block_size = 4});
  Scheduler s(Options(BatchingPolicy::kStatic, /*max_batch_tokens=*/8), bm);
  for (uint64_t id = 1; id <= 3; ++id) ASSERT_TRUE(s.Add(MakeRequest(id, 6, 3)).ok());
  EXPECT_EQ(Step(s).computed, (std::map<uint64_t, int64_t>{{1, 6}, {2, 2}}));
  EXPECT_EQ(s.num_running(), 3u);  // 3 is in the batch, with no tokens yet
  ASSERT_TRUE(s.Add(MakeRequest(4, 2, 1)).ok());
  EXPECT_EQ(Step(s).computed, (std::map<uint64_t, int64_t>{{1, 1}, {2, 4}, {3, 3}}));
  EXPECT_EQ(Step(s).computed, (std::map<uint64_t, int64_t>{{1, 1}, {2, 1}, {3, 3}}));
  EXPECT_EQ(s.num_waiting(), 1u);  // 4 waits for the batch
}

TEST(StaticBatchingTest, BatchTakesOnlyRequestsWhoseWholeLengthFitsTheCache) {
  // 8 blocks of 4 tokens; each request needs 4 blocks for its 8 prompt and 8 generated tokens.
  BlockManager bm({.num_blocks = 8, .block_size = 4, .prefix_caching = false});
  Scheduler s(Options(BatchingPolicy::kStatic), bm);
  for (uint64_t id = 1; id <= 3; ++id) ASSERT_TRUE(s.Add(MakeRequest(id, 8, 8)).ok());
  EXPECT_EQ(Step(s).computed.size(), 2u);
  for (int step = 0; step < 7; ++step) Step(s);  // never preempted (Step checks)
  EXPECT_EQ(s.num_running(), 0u);
  EXPECT_EQ(Step(s).computed, (std::map<uint64_t, int64_t>{{3, 8}}));
  EXPECT_EQ(s.num_preemptions(), 0u);
}

// A closed loop of 8 users, each sending its next request when the previous one finished, with
// output lengths that differ 16-fold: the work every user waits for under static batching is the
// longest request of the batch, so the same 64 requests take far more steps.
int StepsToServe(BatchingPolicy batching) {
  BlockManager bm({.num_blocks = 512, .block_size = 4});
  Scheduler s(Options(batching), bm);
  uint64_t next_id = 1;
  auto send = [&] {
    const int64_t max_tokens = next_id % 8 == 0 ? 32 : 2;
    EXPECT_TRUE(s.Add(MakeRequest(next_id, 6, max_tokens)).ok());
    ++next_id;
  };
  for (int user = 0; user < 8; ++user) send();
  int served = 0;
  int steps = 0;
  while (served < 64) {
    StepResult r = Step(s);
    ++steps;
    for (size_t i = 0; i < r.finished.size(); ++i) {
      ++served;
      if (next_id <= 64) send();
    }
    EXPECT_LT(steps, 10000);
    if (steps >= 10000) break;
  }
  return steps;
}

TEST(StaticBatchingTest, MixedLengthsTakeManyMoreStepsThanUnderContinuousBatching) {
  const int continuous = StepsToServe(BatchingPolicy::kContinuous);
  const int static_steps = StepsToServe(BatchingPolicy::kStatic);
  EXPECT_GE(static_steps, 2 * continuous) << "continuous " << continuous << " steps, static " << static_steps;
}

// Random arrivals under memory pressure: the bookkeeping stays exact, a batch is never preempted,
// nothing new runs while a batch does, and every request produces exactly max_tokens tokens.
TEST(StaticBatchingTest, RandomizedStepsLoseNothingAndLeakNoBlocks) {
  std::mt19937 rng(99);
  BlockManager bm({.num_blocks = 40, .block_size = 4});
  Scheduler s(Options(BatchingPolicy::kStatic, /*max_batch_tokens=*/16, /*max_running=*/6), bm);
  std::map<uint64_t, int64_t> produced;
  uint64_t next_id = 1;
  for (int step = 0; step < 4000; ++step) {
    if (step < 3000 && rng() % 12 == 0) {
      const auto priority = rng() % 4 == 0 ? RequestPriority::kBatch : RequestPriority::kInteractive;
      ASSERT_TRUE(s.Add(MakeRequest(next_id, 1 + static_cast<int32_t>(rng() % 20), 1 + rng() % 24, priority)).ok());
      produced[next_id++] = 0;
    }
    const std::vector<Request*> before = s.running();
    StepPlan plan = s.Schedule();
    ASSERT_TRUE(plan.preempted.empty());
    for (const ScheduledChunk& c : plan.chunks) {
      if (!before.empty()) {
        ASSERT_NE(std::find(before.begin(), before.end(), c.request), before.end()) << "joined a running batch";
      }
    }
    s.OnStepDone(plan);
    std::vector<uint64_t> finished;
    for (const ScheduledChunk& c : plan.chunks) {
      if (!c.compute_logits) continue;
      c.request->tokens.push_back(1);
      ++produced[c.request->id];
      if (c.request->num_generated() == c.request->max_tokens) finished.push_back(c.request->id);
    }
    for (uint64_t id : finished) {
      std::unique_ptr<Request> r = s.Remove(id);
      EXPECT_EQ(produced[id], r->max_tokens);
    }
    ASSERT_TRUE(bm.CheckConsistency(s.BlockTables()).ok());
  }
  EXPECT_EQ(s.num_running() + s.num_waiting(), 0u);
  EXPECT_EQ(bm.num_available(), 40);
}

}  // namespace
}  // namespace cohort
