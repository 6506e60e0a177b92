// How a step's batch is split between the GPUs of a data-parallel-attention engine: by the pool
// of each sequence's blocks, block ids counted from the pool's start, with the rows every GPU must
// bring and where each logits row lands among the GPUs' gathered rows.
#include "worker/model/pool_split.h"

#include <vector>

#include "gtest/gtest.h"

namespace cohort {
namespace {

// 2 pools of 8 blocks: blocks 0-7 are pool 0, 8-15 pool 1.
constexpr KvCacheGeometry kTwoPools{.block_size_tokens = 4, .num_blocks = 16, .bytes_per_token = 1, .num_pools = 2};

std::vector<int32_t> Table(const SequenceStep& step) { return {step.block_table.begin(), step.block_table.end()}; }

TEST(PoolSplitTest, MixedStepGoesToEachSequencesPoolWithTheMostTokensAsRows) {
  const std::vector<int32_t> decode_a = {7}, prefill = {1, 2, 3, 4, 5}, decode_b = {9}, chunk = {11, 12};
  const std::vector<int32_t> table_a = {0, 1}, table_p = {9, 10}, table_b = {3}, table_c = {12, 13, 8};
  const std::vector<SequenceStep> batch = {
      {decode_a, 5, table_a, true},   // pool 0
      {prefill, 0, table_p, true},    // pool 1
      {decode_b, 2, table_b, true},   // pool 0
      {chunk, 8, table_c, false},     // pool 1: a prompt chunk that wants no logits
  };
  PoolSplit split(2);
  split.Split(batch, kTwoPools);

  ASSERT_EQ(split.part(0).size(), 2u);
  ASSERT_EQ(split.part(1).size(), 2u);
  EXPECT_EQ(split.part(0)[0].tokens.data(), decode_a.data()) << "the tokens are the batch's";
  EXPECT_EQ(Table(split.part(0)[0]), (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(Table(split.part(0)[1]), (std::vector<int32_t>{3}));
  EXPECT_EQ(Table(split.part(1)[0]), (std::vector<int32_t>{1, 2})) << "counted from the pool's first block";
  EXPECT_EQ(Table(split.part(1)[1]), (std::vector<int32_t>{4, 5, 0}));
  EXPECT_EQ(split.part(1)[0].start_position, 0);
  EXPECT_EQ(split.part(1)[1].start_position, 8);
  EXPECT_FALSE(split.part(1)[1].compute_logits);

  EXPECT_FALSE(split.decode_only());
  EXPECT_EQ(std::vector<int32_t>(split.tokens().begin(), split.tokens().end()), (std::vector<int32_t>{2, 7}));
  EXPECT_EQ(split.rows(), 7) << "the most tokens of any pool";
  // Logits rows in batch order: pool 0's first, pool 1's first, pool 0's second.
  EXPECT_EQ(std::vector<int32_t>(split.logits_rows().begin(), split.logits_rows().end()),
            (std::vector<int32_t>{0, 7, 1}));
}

TEST(PoolSplitTest, DecodeStepBringsTheMostSequencesOfAnyPoolAndAnEmptyPoolTakesPart) {
  const std::vector<int32_t> t = {5};
  const std::vector<int32_t> tables[] = {{0}, {1}, {2}, {8}};
  std::vector<SequenceStep> batch;
  for (const auto& table : tables) batch.push_back({t, 3, table, true});
  PoolSplit split(2);
  split.Split(batch, kTwoPools);
  EXPECT_TRUE(split.decode_only());
  EXPECT_EQ(split.rows(), 3) << "pool 0 has three sequences";
  EXPECT_EQ(std::vector<int32_t>(split.logits_rows().begin(), split.logits_rows().end()),
            (std::vector<int32_t>{0, 1, 2, 3}));

  // Everything in pool 1: pool 0 still takes part, with nothing.
  batch = {{t, 3, tables[3], true}};
  split.Split(batch, kTwoPools);
  EXPECT_TRUE(split.part(0).empty());
  ASSERT_EQ(split.part(1).size(), 1u);
  EXPECT_EQ(Table(split.part(1)[0]), (std::vector<int32_t>{0}));
  EXPECT_EQ(split.rows(), 1);
  EXPECT_EQ(std::vector<int32_t>(split.tokens().begin(), split.tokens().end()), (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(std::vector<int32_t>(split.logits_rows().begin(), split.logits_rows().end()),
            (std::vector<int32_t>{1}));
}

}  // namespace
}  // namespace cohort
