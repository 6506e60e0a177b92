#include "worker/kv/block_allocator.h"

#include <set>

#include "gtest/gtest.h"

namespace cohort {
namespace {

TEST(BlockAllocatorTest, AllocatesDistinctBlocksUntilFull) {
  BlockAllocator blocks(5);
  std::vector<int32_t> a, b;
  ASSERT_TRUE(blocks.Allocate(3, a));
  ASSERT_TRUE(blocks.Allocate(2, b));
  EXPECT_EQ(blocks.num_free(), 0);
  std::set<int32_t> all(a.begin(), a.end());
  all.insert(b.begin(), b.end());
  EXPECT_EQ(all.size(), 5u);
  for (int32_t id : all) EXPECT_TRUE(id >= 0 && id < 5);
}

TEST(BlockAllocatorTest, FailedAllocationChangesNothing) {
  BlockAllocator blocks(4);
  std::vector<int32_t> a;
  ASSERT_TRUE(blocks.Allocate(3, a));
  std::vector<int32_t> b = {};
  EXPECT_FALSE(blocks.Allocate(2, b));
  EXPECT_TRUE(b.empty());
  EXPECT_EQ(blocks.num_free(), 1);
}

TEST(BlockAllocatorTest, FreedBlocksCanBeAllocatedAgain) {
  BlockAllocator blocks(2);
  std::vector<int32_t> a;
  ASSERT_TRUE(blocks.Allocate(2, a));
  blocks.Free(a);
  EXPECT_TRUE(a.empty());
  EXPECT_EQ(blocks.num_free(), 2);
  std::vector<int32_t> b;
  EXPECT_TRUE(blocks.Allocate(2, b));
}

TEST(BlockAllocatorTest, BlocksForTokensRoundsUp) {
  EXPECT_EQ(BlocksForTokens(0, 16), 0);
  EXPECT_EQ(BlocksForTokens(1, 16), 1);
  EXPECT_EQ(BlocksForTokens(16, 16), 1);
  EXPECT_EQ(BlocksForTokens(17, 16), 2);
}

TEST(BlockAllocatorDeathTest, DoubleFreeIsABrokenInvariant) {
  BlockAllocator blocks(2);
  std::vector<int32_t> a;
  ASSERT_TRUE(blocks.Allocate(1, a));
  std::vector<int32_t> copy = a;
  blocks.Free(a);
  EXPECT_DEATH(blocks.Free(copy), "not in use");
}

}  // namespace
}  // namespace cohort
