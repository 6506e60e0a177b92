// The scheduler as a pure function: each test drives steps by hand (no engine, no threads) and
// checks the plan a step produces, as a user of the worker would feel it: who runs, how many
// tokens, who waits, who is preempted, and that nothing is lost.
#include "worker/scheduler/scheduler.h"

#include <map>
#include <random>

#include "gtest/gtest.h"

namespace cohort {
namespace {

std::unique_ptr<Request> MakeRequest(uint64_t id, std::vector<int32_t> prompt, int64_t max_tokens,
                                     RequestPriority priority = RequestPriority::kInteractive) {
  auto r = std::make_unique<Request>();
  r->id = id;
  r->tokens = std::move(prompt);
  r->prompt_len = static_cast<int64_t>(r->tokens.size());
  r->max_tokens = max_tokens;
  r->priority = priority;
  return r;
}

std::vector<int32_t> Range(int32_t from, int32_t count) {
  std::vector<int32_t> out(count);
  for (int32_t i = 0; i < count; ++i) out[i] = from + i;
  return out;
}

// Runs one step: schedule, "compute", and append a sampled token to every request that got logits.
// Returns {request id: tokens computed this step}; finished requests are removed.
std::map<uint64_t, int64_t> Step(Scheduler& s, StepPlan* plan_out = nullptr) {
  StepPlan plan = s.Schedule();
  s.OnStepDone(plan);
  std::map<uint64_t, int64_t> computed;
  std::vector<uint64_t> finished;
  for (const ScheduledChunk& c : plan.chunks) {
    computed[c.request->id] = c.num_tokens;
    if (!c.compute_logits) continue;
    c.request->tokens.push_back(static_cast<int32_t>(1000 + c.request->num_generated()));
    if (c.request->num_generated() == c.request->max_tokens) finished.push_back(c.request->id);
  }
  for (uint64_t id : finished) s.Remove(id);
  if (plan_out != nullptr) *plan_out = plan;
  return computed;
}

using Computed = std::map<uint64_t, int64_t>;

TEST(SchedulerTest, NewRequestsJoinTheRunningBatchAtTheNextStep) {
  BlockManager bm({.num_blocks = 64, .block_size = 4});
  Scheduler s({.max_batch_tokens = 64}, bm);
  ASSERT_TRUE(s.Add(MakeRequest(1, Range(0, 5), 3)).ok());
  EXPECT_EQ(Step(s), (Computed{{1, 5}}));
  ASSERT_TRUE(s.Add(MakeRequest(2, Range(50, 3), 3)).ok());
  EXPECT_EQ(Step(s), (Computed{{1, 1}, {2, 3}}));  // 1 decodes while 2 prefills
  EXPECT_EQ(Step(s), (Computed{{1, 1}, {2, 1}}));
  EXPECT_EQ(s.num_running(), 1u);  // 1 produced its 3 tokens and left at once
  EXPECT_EQ(Step(s), (Computed{{2, 1}}));
  EXPECT_EQ(s.num_running(), 0u);
  EXPECT_EQ(bm.num_available(), 64);
}

TEST(SchedulerTest, LongPromptIsPrefilledInChunksWhileDecodesContinue) {
  BlockManager bm({.num_blocks = 64, .block_size = 4});
  Scheduler s({.max_batch_tokens = 8}, bm);
  ASSERT_TRUE(s.Add(MakeRequest(1, Range(0, 2), 10)).ok());
  Step(s);
  ASSERT_TRUE(s.Add(MakeRequest(2, Range(100, 20), 2)).ok());
  StepPlan plan;
  EXPECT_EQ(Step(s, &plan), (Computed{{1, 1}, {2, 7}}));
  EXPECT_FALSE(plan.chunks[1].compute_logits);  // a prefill chunk short of the prompt's end
  EXPECT_EQ(Step(s), (Computed{{1, 1}, {2, 7}}));
  EXPECT_EQ(Step(s, &plan), (Computed{{1, 1}, {2, 6}}));
  EXPECT_TRUE(plan.chunks[1].compute_logits);
  EXPECT_EQ(Step(s), (Computed{{1, 1}, {2, 1}}));
}

TEST(SchedulerTest, SharedPromptPrefixComesFromTheCache) {
  BlockManager bm({.num_blocks = 64, .block_size = 4});
  Scheduler s({.max_batch_tokens = 64}, bm);
  std::vector<int32_t> system = Range(0, 8);
  ASSERT_TRUE(s.Add(MakeRequest(1, system, 1)).ok());
  Step(s);  // computes 8 prompt tokens: two full blocks enter the cache; finishes
  std::vector<int32_t> prompt = system;
  prompt.push_back(77);
  prompt.push_back(78);
  ASSERT_TRUE(s.Add(MakeRequest(2, prompt, 5)).ok());
  EXPECT_EQ(Step(s), (Computed{{2, 2}}));  // only the two new tokens are computed
  EXPECT_EQ(s.Find(2)->cached_prompt_tokens, 8);
}

TEST(SchedulerTest, FullyCachedPromptStillComputesItsLastToken) {
  BlockManager bm({.num_blocks = 64, .block_size = 4});
  Scheduler s({.max_batch_tokens = 64}, bm);
  ASSERT_TRUE(s.Add(MakeRequest(1, Range(0, 8), 1)).ok());
  Step(s);
  ASSERT_TRUE(s.Add(MakeRequest(2, Range(0, 8), 1)).ok());
  StepPlan plan;
  EXPECT_EQ(Step(s, &plan), (Computed{{2, 4}}));  // the last block is recomputed for the logits
}

TEST(SchedulerTest, NewestRunningRequestIsPreemptedAndRecomputedWithoutLosingTokens) {
  // 4 blocks of 2 tokens. Two requests of 3-token prompts fill 4 blocks after one decode each.
  BlockManager bm({.num_blocks = 4, .block_size = 2, .prefix_caching = false});
  Scheduler s({.max_batch_tokens = 64}, bm);
  ASSERT_TRUE(s.Add(MakeRequest(1, Range(0, 3), 4)).ok());
  ASSERT_TRUE(s.Add(MakeRequest(2, Range(10, 3), 4)).ok());
  EXPECT_EQ(Step(s), (Computed{{1, 3}, {2, 3}}));  // 2 blocks each
  EXPECT_EQ(Step(s), (Computed{{1, 1}, {2, 1}}));  // positions 3: still in block 1
  StepPlan plan;
  EXPECT_EQ(Step(s, &plan), (Computed{{1, 1}}));  // 1 needs a third block: 2 (newest) is preempted
  ASSERT_EQ(plan.preempted.size(), 1u);
  EXPECT_EQ(plan.preempted[0]->id, 2u);
  const Request* two = s.Find(2);
  EXPECT_EQ(two->state, RequestState::kWaiting);
  EXPECT_EQ(two->num_generated(), 2);  // its tokens survive preemption
  EXPECT_EQ(two->computed, 0);
  Step(s);  // 1 finishes its 4th token and leaves
  EXPECT_EQ(Step(s), (Computed{{2, 5}}));  // 2 recomputes prompt + its 2 tokens in one go
  EXPECT_EQ(two->num_generated(), 3);
}

TEST(SchedulerTest, BatchRequestsFillSpareCapacityOnly) {
  BlockManager bm({.num_blocks = 64, .block_size = 4});
  Scheduler s({.max_batch_tokens = 6}, bm);
  ASSERT_TRUE(s.Add(MakeRequest(1, Range(0, 4), 5, RequestPriority::kBatch)).ok());
  ASSERT_TRUE(s.Add(MakeRequest(2, Range(10, 8), 5)).ok());
  // The interactive request arrived later but goes first; the batch one waits while it does.
  EXPECT_EQ(Step(s), (Computed{{2, 6}}));
  EXPECT_EQ(Step(s), (Computed{{1, 4}, {2, 2}}));
}

TEST(SchedulerTest, BatchRequestsArePreemptedBeforeInteractiveOnes) {
  BlockManager bm({.num_blocks = 4, .block_size = 2, .prefix_caching = false});
  Scheduler s({.max_batch_tokens = 64}, bm);
  ASSERT_TRUE(s.Add(MakeRequest(1, Range(0, 3), 4, RequestPriority::kBatch)).ok());
  Step(s);
  ASSERT_TRUE(s.Add(MakeRequest(2, Range(10, 3), 4)).ok());
  Step(s);
  StepPlan plan;
  Step(s, &plan);  // both need a third block; only two are left
  ASSERT_EQ(plan.preempted.size(), 1u);
  EXPECT_EQ(plan.preempted[0]->id, 1u);  // older, but batch
}

TEST(SchedulerTest, RequestThatCanNeverFitIsRejectedUpFront) {
  BlockManager bm({.num_blocks = 4, .block_size = 4});
  Scheduler s({}, bm);
  absl::Status st = s.Add(MakeRequest(1, Range(0, 10), 7));  // 17 tokens > 16
  EXPECT_TRUE(absl::IsInvalidArgument(st)) << st;
  EXPECT_TRUE(s.Add(MakeRequest(2, Range(0, 10), 6)).ok());
}

TEST(SchedulerTest, RemovingAWaitingOrRunningRequestReleasesEverything) {
  BlockManager bm({.num_blocks = 16, .block_size = 4});
  Scheduler s({.max_batch_tokens = 4}, bm);
  ASSERT_TRUE(s.Add(MakeRequest(1, Range(0, 9), 5)).ok());
  ASSERT_TRUE(s.Add(MakeRequest(2, Range(20, 9), 5)).ok());
  Step(s);
  EXPECT_NE(s.Remove(1), nullptr);
  EXPECT_NE(s.Remove(2), nullptr);
  EXPECT_EQ(s.Remove(2), nullptr);
  EXPECT_EQ(s.num_running() + s.num_waiting(), 0u);
  EXPECT_EQ(bm.num_available(), 16);
}

// Thousands of steps of random arrivals, cancellations and memory pressure. After every step the
// block bookkeeping must match the requests' tables exactly (each table within one KV pool); at the
// end every request that was not cancelled produced exactly max_tokens tokens, in order, and every
// block is available again.
void RunRandomizedSteps(int64_t num_pools) {
  std::mt19937 rng(1234);
  BlockManager bm({.num_blocks = 48, .block_size = 4, .num_pools = num_pools});
  Scheduler s({.max_batch_tokens = 24, .max_running = 16}, bm);
  std::map<uint64_t, int64_t> expected_tokens;  // id -> max_tokens, for requests not cancelled
  std::map<uint64_t, std::vector<int32_t>> outputs;
  uint64_t next_id = 1;
  int cancelled = 0;
  for (int step = 0; step < 5000; ++step) {
    if (step < 4000 && rng() % 3 == 0) {
      const int32_t shared = static_cast<int32_t>(rng() % 4);  // a few shared prefixes for cache hits
      std::vector<int32_t> prompt = Range(shared * 100, 4 + static_cast<int32_t>(rng() % 8));
      for (int i = 0, extra = static_cast<int>(rng() % 20); i < extra; ++i) prompt.push_back(rng() % 500);
      const int64_t max_tokens = 1 + rng() % 30;
      auto priority = rng() % 4 == 0 ? RequestPriority::kBatch : RequestPriority::kInteractive;
      ASSERT_TRUE(s.Add(MakeRequest(next_id, prompt, max_tokens, priority)).ok());
      expected_tokens[next_id++] = max_tokens;
    }
    if (rng() % 40 == 0 && !expected_tokens.empty()) {
      auto it = expected_tokens.begin();
      std::advance(it, rng() % expected_tokens.size());
      if (s.Remove(it->first) != nullptr) {
        expected_tokens.erase(it);
        ++cancelled;
      }
    }
    StepPlan plan = s.Schedule();
    ASSERT_LE(plan.num_tokens, 24);
    for (const ScheduledChunk& c : plan.chunks) {
      ASSERT_GT(c.num_tokens, 0);
      ASSERT_LE(c.num_tokens, c.request->uncomputed());
      ASSERT_EQ(c.compute_logits, c.num_tokens == c.request->uncomputed());
      ASSERT_GE(static_cast<int64_t>(c.request->block_table.size()) * 4, c.request->computed + c.num_tokens);
    }
    s.OnStepDone(plan);
    for (const ScheduledChunk& c : plan.chunks) {
      if (!c.compute_logits) continue;
      Request* r = c.request;
      const int32_t token = static_cast<int32_t>(r->num_generated());
      r->tokens.push_back(token);
      outputs[r->id].push_back(token);
      if (r->num_generated() == r->max_tokens) s.Remove(r->id);
    }
    ASSERT_TRUE(bm.CheckConsistency(s.BlockTables()).ok()) << "step " << step << ": " << bm.CheckConsistency(s.BlockTables());
  }
  EXPECT_EQ(s.num_running() + s.num_waiting(), 0u);
  EXPECT_EQ(bm.num_available(), 48);
  EXPECT_GT(s.num_preemptions(), 0u);  // the cache was small enough to force preemption
  EXPECT_GT(bm.prefix_hit_blocks(), 0u);
  EXPECT_GT(cancelled, 0);
  for (const auto& [id, max_tokens] : expected_tokens) {
    ASSERT_EQ(static_cast<int64_t>(outputs[id].size()), max_tokens) << "request " << id;
    for (int64_t i = 0; i < max_tokens; ++i) ASSERT_EQ(outputs[id][i], i) << "request " << id;
  }
}

TEST(SchedulerTest, RandomizedStepsLoseNothingAndLeakNoBlocks) { RunRandomizedSteps(1); }

TEST(SchedulerPoolsTest, RandomizedStepsLoseNothingAndLeakNoBlocks) { RunRandomizedSteps(2); }

TEST(SchedulerPoolsTest, ARequestThatCannotGrowPreemptsOnlyInItsOwnPool) {
  // Two pools of two 4-token blocks. Each request lands in the pool with the most available blocks.
  BlockManager bm({.num_blocks = 4, .block_size = 4, .prefix_caching = false, .num_pools = 2});
  Scheduler s({.max_batch_tokens = 64}, bm);
  ASSERT_TRUE(s.Add(MakeRequest(1, Range(0, 4), 4)).ok());   // pool 0
  ASSERT_TRUE(s.Add(MakeRequest(2, Range(10, 1), 4)).ok());  // pool 1
  ASSERT_TRUE(s.Add(MakeRequest(3, Range(20, 4), 4)).ok());  // pool 0, now full
  ASSERT_TRUE(s.Add(MakeRequest(4, Range(30, 1), 4)).ok());  // pool 1, the newest request
  EXPECT_EQ(Step(s), (Computed{{1, 4}, {2, 1}, {3, 4}, {4, 1}}));
  ASSERT_EQ(bm.PoolOf(s.Find(1)->block_table[0]), 0);
  ASSERT_EQ(bm.PoolOf(s.Find(4)->block_table[0]), 1);
  // 1 needs a second block of pool 0. Preempting 4, the newest, would free a block of pool 1 that
  // 1 cannot use; 3 is preempted instead, and 4 keeps decoding.
  StepPlan plan;
  EXPECT_EQ(Step(s, &plan), (Computed{{1, 1}, {2, 1}, {4, 1}}));
  ASSERT_EQ(plan.preempted.size(), 1u);
  EXPECT_EQ(plan.preempted[0]->id, 3u);
  EXPECT_EQ(s.Find(3)->state, RequestState::kWaiting);
  EXPECT_EQ(s.Find(4)->state, RequestState::kRunning);
  EXPECT_TRUE(bm.CheckConsistency(s.BlockTables()).ok()) << bm.CheckConsistency(s.BlockTables());
}

TEST(SchedulerPoolsTest, RequestLargerThanOnePoolIsRejectedUpFront) {
  // 32 tokens of KV cache in two pools of 16: a request's KV must fit in one.
  BlockManager bm({.num_blocks = 8, .block_size = 4, .num_pools = 2});
  Scheduler s({}, bm);
  absl::Status st = s.Add(MakeRequest(1, Range(0, 10), 10));
  EXPECT_TRUE(absl::IsInvalidArgument(st)) << st;
  EXPECT_EQ(st.message(),
            "the prompt (10 tokens) plus max_tokens (10) needs 20 tokens of KV cache; this worker holds 16 tokens "
            "in each of its 2 KV pools (one per GPU)");
  EXPECT_TRUE(s.Add(MakeRequest(2, Range(0, 10), 6)).ok());

  // With one pool the message names the whole cache, as it always did.
  BlockManager one_pool({.num_blocks = 4, .block_size = 4});
  Scheduler single({}, one_pool);
  st = single.Add(MakeRequest(1, Range(0, 10), 7));
  EXPECT_EQ(st.message(),
            "the prompt (10 tokens) plus max_tokens (7) needs 17 tokens of KV cache; this worker holds 16");
}

}  // namespace
}  // namespace cohort
