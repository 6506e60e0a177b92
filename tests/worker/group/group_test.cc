// A worker whose GPUs span processes: rank 0's GroupLeader and a follower's RunFollower over a real
// socket. The follower's commands would run a GPU engine's part of each step, which cannot run on a
// machine without GPUs; here a recorder answers them instead, as an engine would.
#include "worker/group/group.h"

#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "gtest/gtest.h"

namespace cohort {
namespace {

constexpr char kModel[] = "deepseek-v2-lite";
constexpr char kNcclId[] = "a 128-byte NCCL id stands here";

// What a follower was told, and answers: a step's routed expert reads are its sequences' tokens.
class Follower {
 public:
  std::optional<CommandDone> Run(const Welcome& welcome, const Command& command) {
    absl::MutexLock lock(&mu_);
    welcome_ = welcome;
    commands_.push_back(command);
    if (command.has_step() && command.step().sequences_size() == 0) return std::nullopt;  // "dies"
    CommandDone done;
    if (command.has_step()) {
      for (const auto& seq : command.step().sequences()) done.set_routed_expert_reads(done.routed_expert_reads() + seq.tokens_size());
    }
    return done;
  }
  std::vector<Command> commands() {
    absl::MutexLock lock(&mu_);
    return commands_;
  }
  Welcome welcome() {
    absl::MutexLock lock(&mu_);
    return welcome_;
  }

 private:
  absl::Mutex mu_;
  Welcome welcome_;
  std::vector<Command> commands_;
};

Command StepCommand(uint64_t id, std::vector<std::vector<int32_t>> sequences) {
  Command c;
  c.set_id(id);
  auto* step = c.mutable_step();
  step->set_rows(4);
  step->add_tokens_per_rank(2);
  step->add_tokens_per_rank(4);
  for (const auto& tokens : sequences) {
    auto* seq = step->add_sequences();
    for (int32_t t : tokens) seq->add_tokens(t);
    seq->set_start_position(7);
    seq->add_block_table(3);
    seq->set_compute_logits(true);
  }
  return c;
}

TEST(GroupTest, AFollowerJoinsTakesTheNcclIdAndRunsEachCommandInTurn) {
  EngineOptions rank0;
  rank0.kv_block_size = 32;
  rank0.max_batch_tokens = 4096;
  rank0.max_sequences = 96;
  rank0.num_layers = 5;
  rank0.gpu_memory_fraction = 0.8;
  rank0.kv_cache_bytes = 0;
  rank0.expanded_prefill_max_context = 1000;
  auto leader = GroupLeader::Start("127.0.0.1", 0, /*world_size=*/2, kModel, kNcclId, SettingsOf(rank0));
  ASSERT_TRUE(leader.ok()) << leader.status();
  Follower follower;
  absl::Status ended;
  std::thread rank1([&] {
    ended = RunFollower(absl::StrCat("127.0.0.1:", (*leader)->port()), 1, kModel,
                        [&](const Welcome& w, const Command& c) { return follower.Run(w, c); });
  });
  ASSERT_TRUE((*leader)->AwaitRanks(absl::Seconds(10)).ok());

  Command prepare;
  prepare.set_id(1);
  prepare.mutable_prepare();
  absl::StatusOr<CommandDone> done = (*leader)->Run(1, prepare, absl::Seconds(10));
  ASSERT_TRUE(done.ok()) << done.status();
  EXPECT_EQ(done->id(), 1u);
  EXPECT_EQ(done->code(), 0);
  EXPECT_EQ(follower.welcome().world_size(), 2u);
  EXPECT_EQ(follower.welcome().nccl_unique_id(), kNcclId);
  // The follower takes rank 0's engine settings over its own.
  EngineOptions mine;
  mine.max_batch_tokens = 64;
  ApplySettings(follower.welcome().settings(), mine);
  EXPECT_EQ(mine.kv_block_size, 32);
  EXPECT_EQ(mine.max_batch_tokens, 4096);
  EXPECT_EQ(mine.max_sequences, 96);
  EXPECT_EQ(mine.num_layers, 5);
  EXPECT_EQ(mine.gpu_memory_fraction, 0.8);
  EXPECT_EQ(mine.kv_cache_bytes, 0);
  EXPECT_EQ(mine.expanded_prefill_max_context, 1000);

  done = (*leader)->Run(1, StepCommand(2, {{5, 6, 7}, {8}}), absl::Seconds(10));
  ASSERT_TRUE(done.ok()) << done.status();
  EXPECT_EQ(done->id(), 2u);
  EXPECT_EQ(done->routed_expert_reads(), 4) << "the follower saw both sequences' tokens";
  const std::vector<Command> seen = follower.commands();
  ASSERT_EQ(seen.size(), 2u);
  EXPECT_TRUE(seen[0].has_prepare());
  ASSERT_TRUE(seen[1].has_step());
  EXPECT_EQ(seen[1].step().rows(), 4u);
  EXPECT_EQ(seen[1].step().sequences(1).start_position(), 7);

  // The follower goes away in the middle of a step: rank 0 hears it at once, not at the deadline.
  const absl::Time start = absl::Now();
  done = (*leader)->Run(1, StepCommand(3, {}), absl::Seconds(30));
  EXPECT_TRUE(absl::IsUnavailable(done.status())) << done.status();
  EXPECT_LT(absl::Now() - start, absl::Seconds(10));
  rank1.join();
  EXPECT_TRUE(ended.ok()) << ended;
  done = (*leader)->Run(1, prepare, absl::Seconds(1));
  EXPECT_TRUE(absl::IsUnavailable(done.status())) << "no rank 1 any more: " << done.status();
}

TEST(GroupTest, RankZeroRefusesAnotherModelAndWaitsForTheRanksThatAreMissing) {
  auto leader = GroupLeader::Start("127.0.0.1", 0, /*world_size=*/3, kModel, kNcclId);
  ASSERT_TRUE(leader.ok()) << leader.status();
  const std::string address = absl::StrCat("127.0.0.1:", (*leader)->port());
  auto never = [](const Welcome&, const Command&) -> std::optional<CommandDone> { return CommandDone(); };
  const absl::Status wrong_model = RunFollower(address, 1, "deepseek-v3", never);
  EXPECT_TRUE(absl::IsFailedPrecondition(wrong_model)) << wrong_model;
  EXPECT_NE(wrong_model.message().find("rank 1 serves deepseek-v3; rank 0 serves deepseek-v2-lite"),
            std::string::npos)
      << wrong_model;
  const absl::Status outside = RunFollower(address, 3, kModel, never);
  EXPECT_TRUE(absl::IsFailedPrecondition(outside)) << outside;

  Follower follower;
  std::thread rank2([&] {
    (void)RunFollower(address, 2, kModel, [&](const Welcome& w, const Command& c) { return follower.Run(w, c); });
  });
  const absl::Status waited = (*leader)->AwaitRanks(absl::Milliseconds(500));
  EXPECT_TRUE(absl::IsDeadlineExceeded(waited)) << waited;
  EXPECT_NE(waited.message().find("rank 1 did not join"), std::string::npos) << waited;
  leader->reset();  // rank 0 ends: the follower's stream ends too
  rank2.join();
}

// The engine's view (RemoteRanks): a prepare gives the rank's KV blocks, a step's sequences reach
// the rank whole, and an error the rank reports comes back with its code, naming the rank.
TEST(GroupTest, LeaderRanksCarryTheEnginesCallsAndTheRanksErrors) {
  auto leader = GroupLeader::Start("127.0.0.1", 0, /*world_size=*/2, kModel, kNcclId);
  ASSERT_TRUE(leader.ok()) << leader.status();
  cohort::worker::v1::Step seen;  // the last step rank 1 was sent
  std::thread rank1([&] {
    (void)RunFollower(absl::StrCat("127.0.0.1:", (*leader)->port()), 1, kModel,
                      [&](const Welcome&, const Command& c) -> std::optional<CommandDone> {
                        CommandDone done;
                        if (c.has_prepare()) done.set_kv_blocks(77);
                        if (c.has_step()) {
                          seen = c.step();
                          if (c.step().sequences_size() == 0) {
                            done.set_code(static_cast<int32_t>(absl::StatusCode::kInternal));
                            done.set_message("an illegal memory access");
                          }
                          done.set_routed_expert_reads(c.step().sequences_size());
                        }
                        return done;
                      });
  });
  ASSERT_TRUE((*leader)->AwaitRanks(absl::Seconds(10)).ok());
  LeaderRanks ranks(**leader, 2, kNcclId);
  EXPECT_EQ(ranks.world_size(), 2);
  absl::StatusOr<int64_t> blocks = ranks.Prepare(1, absl::Seconds(10));
  ASSERT_TRUE(blocks.ok()) << blocks.status();
  EXPECT_EQ(*blocks, 77);
  EXPECT_TRUE(ranks.Start(1, absl::Seconds(10)).ok());

  const std::vector<int32_t> tokens = {4, 5, 6}, table = {0, 2};
  const std::vector<int32_t> tokens_per_rank = {1, 3};
  const SequenceStep part[] = {{tokens, 9, table, false}};
  absl::StatusOr<int64_t> reads = ranks.Step(1, part, /*rows=*/3, /*decode_graph=*/false, tokens_per_rank,
                                             absl::Seconds(10));
  ASSERT_TRUE(reads.ok()) << reads.status();
  EXPECT_EQ(*reads, 1);
  EXPECT_EQ(seen.rows(), 3u);
  EXPECT_FALSE(seen.decode_graph());
  ASSERT_EQ(seen.tokens_per_rank_size(), 2);
  EXPECT_EQ(seen.tokens_per_rank(1), 3);
  ASSERT_EQ(seen.sequences_size(), 1);
  EXPECT_EQ(std::vector<int32_t>(seen.sequences(0).tokens().begin(), seen.sequences(0).tokens().end()), tokens);
  EXPECT_EQ(std::vector<int32_t>(seen.sequences(0).block_table().begin(), seen.sequences(0).block_table().end()),
            table);
  EXPECT_EQ(seen.sequences(0).start_position(), 9);
  EXPECT_FALSE(seen.sequences(0).compute_logits());

  reads = ranks.Step(1, {}, 1, true, tokens_per_rank, absl::Seconds(10));
  EXPECT_TRUE(absl::IsInternal(reads.status())) << reads.status();
  EXPECT_EQ(reads.status().message(), "rank 1: an illegal memory access");
  leader->reset();
  rank1.join();
}

TEST(GroupTest, AFollowerThatCannotReachRankZeroSaysWhere) {
  const absl::Status unreachable = RunFollower(
      "127.0.0.1:1", 1, kModel, [](const Welcome&, const Command&) { return std::optional<CommandDone>(); },
      absl::Milliseconds(300));
  EXPECT_TRUE(absl::IsUnavailable(unreachable)) << unreachable;
  EXPECT_NE(unreachable.message().find("rank 0 at 127.0.0.1:1 did not answer"), std::string::npos) << unreachable;
}

}  // namespace
}  // namespace cohort
