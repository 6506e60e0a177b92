#include "worker/kv/block_manager.h"

#include <set>

#include "common/block_hash.h"
#include "gtest/gtest.h"

namespace cohort {
namespace {

std::vector<uint64_t> HashesOf(const std::vector<int32_t>& tokens, int64_t block_size) {
  std::vector<uint64_t> hashes;
  ExtendBlockHashes(tokens, block_size, hashes);
  return hashes;
}

TEST(BlockHashTest, ChainsOverThePrefixAndIgnoresPartialBlocks) {
  const auto a = HashesOf({1, 2, 3, 4, 5, 6, 7}, 2);
  ASSERT_EQ(a.size(), 3u);  // the 7th token is a partial block
  // Same second block after a different first block: a different hash (the prefix matters).
  const auto b = HashesOf({9, 9, 3, 4}, 2);
  EXPECT_NE(a[1], b[1]);
  // Same prefix: same hashes, extended incrementally.
  std::vector<uint64_t> c;
  ExtendBlockHashes(std::vector<int32_t>{1, 2, 3}, 2, c);
  ExtendBlockHashes(std::vector<int32_t>{1, 2, 3, 4, 5, 6}, 2, c);
  EXPECT_EQ(c, std::vector<uint64_t>(a.begin(), a.end()));
}

TEST(BlockManagerTest, GrowAllocatesDistinctBlocksAndFailsWithoutChange) {
  BlockManager bm({.num_blocks = 5, .block_size = 4});
  std::vector<int32_t> a, b;
  ASSERT_TRUE(bm.Grow(a, 3));
  ASSERT_TRUE(bm.Grow(b, 2));
  std::set<int32_t> all(a.begin(), a.end());
  all.insert(b.begin(), b.end());
  EXPECT_EQ(all.size(), 5u);
  EXPECT_FALSE(bm.Grow(b, 3));
  EXPECT_EQ(b.size(), 2u);
  bm.Release(a);
  EXPECT_TRUE(a.empty());
  EXPECT_EQ(bm.num_available(), 3);
  EXPECT_TRUE(bm.CheckConsistency({b}).ok());
}

TEST(BlockManagerTest, CachedPrefixIsSharedAndCounted) {
  BlockManager bm({.num_blocks = 8, .block_size = 2});
  const std::vector<int32_t> prompt = {1, 2, 3, 4, 5};
  const auto hashes = HashesOf(prompt, 2);
  std::vector<int32_t> first;
  ASSERT_TRUE(bm.Grow(first, 3));
  bm.CacheBlocks(first, hashes, 0, 2);
  EXPECT_EQ(bm.num_cached(), 2);

  std::vector<int32_t> second;
  EXPECT_EQ(bm.AcquirePrefix(hashes, 2, second), 2);
  EXPECT_EQ(second, std::vector<int32_t>(first.begin(), first.begin() + 2));
  EXPECT_TRUE(bm.CheckConsistency({first, second}).ok()) << bm.CheckConsistency({first, second});
  EXPECT_EQ(bm.prefix_hit_blocks(), 2u);

  // A prompt diverging in the second block shares only the first.
  std::vector<int32_t> third;
  EXPECT_EQ(bm.AcquirePrefix(HashesOf({1, 2, 9, 9}, 2), 2, third), 1);
  bm.Release(third);
}

TEST(BlockManagerTest, IdleCachedBlocksSurviveReleaseAndAreEvictedLeastRecentlyUsedFirst) {
  BlockManager bm({.num_blocks = 3, .block_size = 1});
  std::vector<int32_t> a, b;
  ASSERT_TRUE(bm.Grow(a, 1));
  ASSERT_TRUE(bm.Grow(b, 1));
  const auto ha = HashesOf({10}, 1), hb = HashesOf({20}, 1);
  bm.CacheBlocks(a, ha, 0, 1);
  bm.CacheBlocks(b, hb, 0, 1);
  bm.Release(a);  // a idle first: least recently used
  bm.Release(b);
  EXPECT_EQ(bm.num_available(), 3);
  EXPECT_EQ(bm.num_cached(), 2);
  bm.TakeEvents();

  std::vector<int32_t> c;
  ASSERT_TRUE(bm.Grow(c, 2));  // the free block, then evicts a's block
  auto events = bm.TakeEvents();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].kind, PrefixCacheEvent::Kind::kEvicted);
  EXPECT_EQ(events[0].block_hash, ha[0]);
  std::vector<int32_t> probe;
  EXPECT_EQ(bm.AcquirePrefix(ha, 1, probe), 0);
  EXPECT_EQ(bm.AcquirePrefix(hb, 1, probe), 1);
  EXPECT_TRUE(bm.CheckConsistency({c, probe}).ok());
}

TEST(BlockManagerTest, EventsHaveIncreasingIds) {
  BlockManager bm({.num_blocks = 4, .block_size = 1});
  std::vector<int32_t> t;
  ASSERT_TRUE(bm.Grow(t, 3));
  bm.CacheBlocks(t, HashesOf({1, 2, 3}, 1), 0, 3);
  auto events = bm.TakeEvents();
  ASSERT_EQ(events.size(), 3u);
  for (size_t i = 0; i < events.size(); ++i) {
    EXPECT_EQ(events[i].kind, PrefixCacheEvent::Kind::kAdded);
    EXPECT_EQ(events[i].id, i + 1);
  }
  EXPECT_EQ(bm.last_event_id(), 3u);
  EXPECT_TRUE(bm.TakeEvents().empty());
}

TEST(BlockManagerTest, DisabledPrefixCachingNeverMatches) {
  BlockManager bm({.num_blocks = 4, .block_size = 1, .prefix_caching = false});
  std::vector<int32_t> t;
  ASSERT_TRUE(bm.Grow(t, 2));
  const auto h = HashesOf({1, 2}, 1);
  bm.CacheBlocks(t, h, 0, 2);
  std::vector<int32_t> u;
  EXPECT_EQ(bm.AcquirePrefix(h, 2, u), 0);
  EXPECT_EQ(bm.num_cached(), 0);
}

TEST(BlockManagerDeathTest, ReleasingABlockNotHeldIsABrokenInvariant) {
  BlockManager bm({.num_blocks = 2, .block_size = 1});
  std::vector<int32_t> t;
  ASSERT_TRUE(bm.Grow(t, 1));
  std::vector<int32_t> copy = t;
  bm.Release(t);
  EXPECT_DEATH(bm.Release(copy), "not held");
}

}  // namespace
}  // namespace cohort
