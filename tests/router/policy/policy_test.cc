#include "router/policy/policy.h"

#include <array>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace cohort {
namespace {

// A worker whose cost is exactly `running`: an empty KV cache and no queue or backlog.
Candidate Worker(uint32_t running, int64_t cached_prefix_blocks = 0) {
  Candidate c;
  c.running = running;
  c.max_batch_tokens = 256;
  c.free_kv_blocks = 100;
  c.total_kv_blocks = 100;
  c.cached_prefix_blocks = cached_prefix_blocks;
  return c;
}

// --- LoadCost -------------------------------------------------------------------------------

TEST(LoadCostTest, IdleWorkerCostsNothing) { EXPECT_DOUBLE_EQ(LoadCost(Worker(0)), 0.0); }

TEST(LoadCostTest, EachKindOfLoadRaisesTheCost) {
  const Candidate idle = Worker(0);
  const double base = LoadCost(idle);

  Candidate running = idle;
  running.running = 3;
  Candidate waiting = idle;
  waiting.waiting = 1;
  Candidate backlog = idle;
  backlog.tokens_in_flight = 100;
  Candidate fuller_kv = idle;
  fuller_kv.free_kv_blocks = 10;
  Candidate dispatched = idle;
  dispatched.dispatched_since_report = 1;

  EXPECT_GT(LoadCost(running), base);
  EXPECT_GT(LoadCost(waiting), base);
  EXPECT_GT(LoadCost(backlog), base);
  EXPECT_GT(LoadCost(fuller_kv), base);
  EXPECT_GT(LoadCost(dispatched), base);
}

TEST(LoadCostTest, MoreOfEachKindCostsMore) {
  Candidate a = Worker(2), b = Worker(3);
  EXPECT_LT(LoadCost(a), LoadCost(b));

  a = b = Worker(0);
  a.waiting = 1;
  b.waiting = 2;
  EXPECT_LT(LoadCost(a), LoadCost(b));

  a = b = Worker(0);
  a.tokens_in_flight = 256;
  b.tokens_in_flight = 1024;
  EXPECT_LT(LoadCost(a), LoadCost(b));

  a = b = Worker(0);
  a.free_kv_blocks = 50;
  b.free_kv_blocks = 5;
  EXPECT_LT(LoadCost(a), LoadCost(b));
}

TEST(LoadCostTest, QueuedRequestCostsMoreThanARunningOne) {
  Candidate queued = Worker(0);
  queued.waiting = 1;
  EXPECT_GT(LoadCost(queued), LoadCost(Worker(1)));
}

TEST(LoadCostTest, DispatchedSinceReportCountsLikeWaiting) {
  Candidate waiting = Worker(1);
  waiting.waiting = 2;
  Candidate dispatched = Worker(1);
  dispatched.dispatched_since_report = 2;
  EXPECT_DOUBLE_EQ(LoadCost(waiting), LoadCost(dispatched));

  Candidate both = Worker(1);
  both.waiting = 1;
  both.dispatched_since_report = 1;
  EXPECT_DOUBLE_EQ(LoadCost(both), LoadCost(waiting));
}

TEST(LoadCostTest, BacklogCountsInStepBudgets) {
  Candidate backlog = Worker(0);
  backlog.tokens_in_flight = 2 * backlog.max_batch_tokens;  // two full steps of prefill
  EXPECT_DOUBLE_EQ(LoadCost(backlog), LoadCost(Worker(2)));
}

TEST(LoadCostTest, FullKvCacheAddsFour) {
  Candidate full = Worker(0);
  full.free_kv_blocks = 0;
  EXPECT_DOUBLE_EQ(LoadCost(full), 4.0);
}

// --- RoundRobin -----------------------------------------------------------------------------

TEST(RoundRobinPolicyTest, CyclesThroughAllCandidatesWhateverTheirLoad) {
  const std::vector<Candidate> table = {Worker(9), Worker(0), Worker(4)};
  RoundRobinPolicy policy;
  std::mt19937_64 rng(1);
  std::vector<size_t> chosen;
  for (int i = 0; i < 7; ++i) chosen.push_back(policy.Choose(table, rng));
  EXPECT_EQ(chosen, (std::vector<size_t>{0, 1, 2, 0, 1, 2, 0}));
}

// --- LeastLoaded ----------------------------------------------------------------------------

TEST(LeastLoadedPolicyTest, PicksTheCheapestRow) {
  struct Case {
    std::string name;
    std::vector<Candidate> table;
    size_t expected;
  };
  Candidate queued = Worker(0);
  queued.waiting = 1;  // cost 2
  Candidate full_kv = Worker(0);
  full_kv.free_kv_blocks = 0;  // cost 4
  Candidate backlog = Worker(0);
  backlog.tokens_in_flight = 3 * 256;  // cost 3
  Candidate unreported = Worker(0);
  unreported.dispatched_since_report = 3;  // cost 6

  const std::vector<Case> cases = {
      {"first", {Worker(1), Worker(2), Worker(3), Worker(4)}, 0},
      {"last", {Worker(4), Worker(3), Worker(2), Worker(1)}, 3},
      {"middle", {Worker(5), Worker(7), Worker(1), Worker(6), Worker(2)}, 2},
      {"queue beats running", {queued, Worker(3), full_kv}, 0},
      {"backlog and kv", {full_kv, backlog, Worker(5)}, 1},
      {"unreported dispatches", {unreported, Worker(5)}, 1},
      {"single", {Worker(8)}, 0},
  };
  LeastLoadedPolicy policy;
  std::mt19937_64 rng(1);
  for (const Case& c : cases) {
    EXPECT_EQ(policy.Choose(c.table, rng), c.expected) << c.name;
  }
}

// --- PrefixAffinity -------------------------------------------------------------------------

TEST(PrefixAffinityPolicyTest, PicksTheLongestCachedPrefix) {
  // Worker 2 is busier than the others but well within the hotspot bound (1.5 * 1 + 4 = 5.5).
  const std::vector<Candidate> table = {Worker(1, 2), Worker(1, 0), Worker(3, 5), Worker(2, 4)};
  PrefixAffinityPolicy policy;
  std::mt19937_64 rng(1);
  for (int i = 0; i < 20; ++i) EXPECT_EQ(policy.Choose(table, rng), 2u);
}

TEST(PrefixAffinityPolicyTest, EqualPrefixesGoToTheCheaperWorker) {
  PrefixAffinityPolicy policy;
  std::mt19937_64 rng(1);
  EXPECT_EQ(policy.Choose(std::vector<Candidate>{Worker(3, 4), Worker(1, 4), Worker(0, 0)}, rng), 1u);
  EXPECT_EQ(policy.Choose(std::vector<Candidate>{Worker(1, 4), Worker(3, 4), Worker(0, 0)}, rng), 0u);
}

TEST(PrefixAffinityPolicyTest, AffinityWorkerAtTheHotspotBoundIsStillChosen) {
  // Least loaded costs 2: bound 1.5 * 2 + 4 = 7, and exactly 7 is not over it.
  const std::vector<Candidate> table = {Worker(2), Worker(7, 8)};
  PrefixAffinityPolicy policy;
  std::mt19937_64 rng(1);
  for (int i = 0; i < 20; ++i) EXPECT_EQ(policy.Choose(table, rng), 1u);
}

TEST(PrefixAffinityPolicyTest, HotspotIsRefusedForPowerOfTwoChoices) {
  // Worker 3 holds the prefix but costs 8 > 1.5 * 2 + 4: it is a hotspot and the most loaded, so
  // the power-of-two fallback never picks it.
  const std::vector<Candidate> table = {Worker(2), Worker(3), Worker(4), Worker(8, 8)};
  std::mt19937_64 rng(7);

  PrefixAffinityPolicy lenient(/*hotspot_factor=*/10.0, /*hotspot_slack=*/0.0);
  EXPECT_EQ(lenient.Choose(table, rng), 3u);  // the same table without the hotspot rule

  PrefixAffinityPolicy policy;
  std::array<int, 4> counts{};
  for (int i = 0; i < 600; ++i) ++counts[policy.Choose(table, rng)];
  EXPECT_EQ(counts[3], 0);
  EXPECT_GT(counts[0], 0);
  EXPECT_GT(counts[1], 0);
  EXPECT_GT(counts[2], 0);
}

TEST(PrefixAffinityPolicyTest, HotspotFallsBackToTheShorterPrefixThatIsNot) {
  // The longest prefix is on a hotspot; a shorter one on a worker within the bound still wins
  // over a random choice.
  const std::vector<Candidate> table = {Worker(0), Worker(9, 8), Worker(1, 3)};
  PrefixAffinityPolicy policy;
  std::mt19937_64 rng(1);
  for (int i = 0; i < 20; ++i) EXPECT_EQ(policy.Choose(table, rng), 2u);
}

TEST(PrefixAffinityPolicyTest, TwoChoicesNeverPickTheMoreLoadedOfTwo) {
  PrefixAffinityPolicy policy;
  for (uint64_t seed = 0; seed < 50; ++seed) {
    std::mt19937_64 rng(seed);
    EXPECT_EQ(policy.Choose(std::vector<Candidate>{Worker(1), Worker(4)}, rng), 0u) << "seed " << seed;
    EXPECT_EQ(policy.Choose(std::vector<Candidate>{Worker(4), Worker(1)}, rng), 1u) << "seed " << seed;
  }
}

TEST(PrefixAffinityPolicyTest, TwoChoicesSpreadOverAllButTheMostLoaded) {
  // No worker holds the prefix. Each unordered pair is equally likely and the cheaper of it wins,
  // so worker 0 wins 3/6 of draws, worker 1 2/6, worker 2 1/6 and worker 3 never.
  const std::vector<Candidate> table = {Worker(0), Worker(1), Worker(2), Worker(10)};
  PrefixAffinityPolicy policy;
  std::mt19937_64 rng(42);
  constexpr int kDraws = 6000;
  std::array<int, 4> counts{};
  for (int i = 0; i < kDraws; ++i) ++counts[policy.Choose(table, rng)];

  EXPECT_EQ(counts[3], 0);
  EXPECT_NEAR(counts[0], kDraws * 3 / 6, kDraws / 20);
  EXPECT_NEAR(counts[1], kDraws * 2 / 6, kDraws / 20);
  EXPECT_NEAR(counts[2], kDraws * 1 / 6, kDraws / 20);
}

TEST(PrefixAffinityPolicyTest, SingleCandidateIsChosen) {
  PrefixAffinityPolicy policy;
  std::mt19937_64 rng(1);
  EXPECT_EQ(policy.Choose(std::vector<Candidate>{Worker(7)}, rng), 0u);
}

// --- MakePolicy -----------------------------------------------------------------------------

TEST(MakePolicyTest, AcceptsTheThreeNames) {
  auto round_robin = MakePolicy("round_robin");
  ASSERT_TRUE(round_robin.ok()) << round_robin.status();
  EXPECT_NE(dynamic_cast<RoundRobinPolicy*>(round_robin->get()), nullptr);

  auto least_loaded = MakePolicy("least_loaded");
  ASSERT_TRUE(least_loaded.ok()) << least_loaded.status();
  EXPECT_NE(dynamic_cast<LeastLoadedPolicy*>(least_loaded->get()), nullptr);

  auto prefix_affinity = MakePolicy("prefix_affinity");
  ASSERT_TRUE(prefix_affinity.ok()) << prefix_affinity.status();
  EXPECT_NE(dynamic_cast<PrefixAffinityPolicy*>(prefix_affinity->get()), nullptr);
}

TEST(MakePolicyTest, RejectsOtherNamesNamingTheFlag) {
  for (const std::string name : {"random", "", "Round_Robin", "least-loaded"}) {
    auto policy = MakePolicy(name);
    ASSERT_FALSE(policy.ok()) << name;
    EXPECT_TRUE(absl::IsInvalidArgument(policy.status())) << policy.status();
    const std::string message(policy.status().message());
    EXPECT_NE(message.find("--policy"), std::string::npos) << message;
    EXPECT_NE(message.find("'" + name + "'"), std::string::npos) << message;
    EXPECT_NE(message.find("prefix_affinity"), std::string::npos) << message;
  }
}

}  // namespace
}  // namespace cohort
