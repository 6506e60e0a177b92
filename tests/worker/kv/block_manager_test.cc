#include "worker/kv/block_manager.h"

#include <algorithm>
#include <random>
#include <set>
#include <string>

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

// Pools (one per GPU under data-parallel attention): a sequence's blocks must all live on one GPU.

// Every pool that holds a block of `table`.
std::set<int64_t> PoolsOf(const BlockManager& bm, const std::vector<int32_t>& table) {
  std::set<int64_t> pools;
  for (int32_t block : table) pools.insert(bm.PoolOf(block));
  return pools;
}

TEST(BlockManagerPoolsTest, OnePoolIsTheWholeCache) {
  BlockManager bm({.num_blocks = 6, .block_size = 2});
  EXPECT_EQ(bm.num_pools(), 1);
  EXPECT_EQ(bm.pool_size(), 6);
  std::vector<int32_t> t;
  ASSERT_TRUE(bm.Grow(t, 6));
  EXPECT_EQ(PoolsOf(bm, t), std::set<int64_t>{0});
  EXPECT_EQ(bm.num_available(0), 0);
  bm.Release(t);
  EXPECT_EQ(bm.num_available(0), 6);
  EXPECT_EQ(bm.num_available(), 6);
}

TEST(BlockManagerPoolsTest, EveryTableStaysInOnePoolThroughGrowAcquireAndRelease) {
  std::mt19937 rng(7);
  BlockManager bm({.num_blocks = 12, .block_size = 1, .num_pools = 3});
  EXPECT_EQ(bm.pool_size(), 4);
  std::vector<std::vector<int32_t>> tables;
  std::set<int64_t> pools_used;
  for (int op = 0; op < 3000; ++op) {
    const uint32_t kind = rng() % 3;
    if (kind == 0 || tables.empty()) {
      // A new request: three prompts of four tokens share their first token, so prefixes hit.
      const int32_t first = static_cast<int32_t>(rng() % 2);
      const auto hashes = HashesOf({first, 10 + static_cast<int32_t>(rng() % 3), 20, 30}, 1);
      std::vector<int32_t> t;
      bm.AcquirePrefix(hashes, static_cast<int64_t>(rng() % 4), t);
      bm.Grow(t, static_cast<int64_t>(t.size()) + 1 + static_cast<int64_t>(rng() % 2));
      bm.CacheBlocks(t, hashes, 0, std::min<int64_t>(static_cast<int64_t>(t.size()), 4));
      if (t.empty()) continue;
      tables.push_back(std::move(t));
    } else {
      std::vector<int32_t>& t = tables[rng() % tables.size()];
      if (kind == 1) {
        bm.Grow(t, static_cast<int64_t>(t.size()) + 1);
      } else {
        bm.Release(t);
        std::swap(t, tables.back());
        tables.pop_back();
      }
    }
    std::vector<std::span<const int32_t>> spans;
    for (const auto& t : tables) {
      ASSERT_EQ(PoolsOf(bm, t).size(), 1u) << "op " << op;
      pools_used.insert(bm.PoolOf(t[0]));
      spans.emplace_back(t);
    }
    ASSERT_TRUE(bm.CheckConsistency(spans).ok()) << "op " << op << ": " << bm.CheckConsistency(spans);
  }
  EXPECT_EQ(pools_used.size(), 3u);
  EXPECT_GT(bm.prefix_hit_blocks(), 0u);
  for (auto& t : tables) bm.Release(t);
  for (int64_t p = 0; p < 3; ++p) EXPECT_EQ(bm.num_available(p), 4) << "pool " << p;
}

TEST(BlockManagerPoolsTest, NewTablesGoToThePoolWithTheMostAvailableBlocks) {
  BlockManager bm({.num_blocks = 8, .block_size = 1, .num_pools = 2});
  std::vector<int32_t> a, b, c;
  ASSERT_TRUE(bm.Grow(a, 3));  // a tie: the lowest pool
  EXPECT_EQ(PoolsOf(bm, a), std::set<int64_t>{0});
  ASSERT_TRUE(bm.Grow(b, 2));  // 1 left in pool 0, 4 in pool 1
  EXPECT_EQ(PoolsOf(bm, b), std::set<int64_t>{1});
  ASSERT_TRUE(bm.Grow(c, 1));  // 1 against 2
  EXPECT_EQ(PoolsOf(bm, c), std::set<int64_t>{1});
  EXPECT_EQ(bm.num_available(0), 1);
  EXPECT_EQ(bm.num_available(1), 1);
  EXPECT_EQ(bm.num_available(), 2);
  EXPECT_EQ(bm.num_held(), 6);
}

TEST(BlockManagerPoolsTest, GrowFailsWhenTheTablesPoolIsFullAlthoughAnotherHasRoom) {
  BlockManager bm({.num_blocks = 8, .block_size = 1, .num_pools = 2});
  std::vector<int32_t> a, b;
  ASSERT_TRUE(bm.Grow(a, 3));  // pool 0
  ASSERT_TRUE(bm.Grow(b, 1));  // pool 1, which keeps 3 available
  EXPECT_FALSE(bm.Grow(a, 5));
  EXPECT_EQ(a.size(), 3u);
  EXPECT_EQ(bm.num_available(), 4);
  // A new table asking for more than any one pool has fails too, though the total would do.
  std::vector<int32_t> c;
  EXPECT_FALSE(bm.Grow(c, 4));
  EXPECT_TRUE(c.empty());
  EXPECT_TRUE(bm.Grow(a, 4));
  EXPECT_EQ(PoolsOf(bm, a), std::set<int64_t>{0});
  EXPECT_TRUE(bm.CheckConsistency({a, b}).ok());
}

TEST(BlockManagerPoolsTest, AcquirePrefixTakesThePoolWithTheLongestCachedMatch) {
  BlockManager bm({.num_blocks = 8, .block_size = 1, .num_pools = 2});
  const auto hashes = HashesOf({1, 2, 3}, 1);
  std::vector<int32_t> short_match, long_match;
  ASSERT_TRUE(bm.Grow(short_match, 1));  // pool 0
  ASSERT_TRUE(bm.Grow(long_match, 3));   // pool 1
  ASSERT_EQ(PoolsOf(bm, long_match), std::set<int64_t>{1});
  bm.CacheBlocks(short_match, hashes, 0, 1);
  bm.CacheBlocks(long_match, hashes, 0, 3);
  bm.Release(short_match);
  bm.Release(long_match);

  std::vector<int32_t> t;
  EXPECT_EQ(bm.AcquirePrefix(hashes, 3, t), 3);
  EXPECT_EQ(PoolsOf(bm, t), std::set<int64_t>{1});
  EXPECT_EQ(bm.prefix_hit_blocks(), 3u);

  // Equal matches: the pool with more available blocks (pool 0, as t holds three of pool 1).
  std::vector<int32_t> u;
  EXPECT_EQ(bm.AcquirePrefix(hashes, 1, u), 1);
  EXPECT_EQ(PoolsOf(bm, u), std::set<int64_t>{0});

  // A table that has blocks matches only in its own pool.
  std::vector<int32_t> in_pool_0;
  ASSERT_TRUE(bm.Grow(in_pool_0, 1));
  ASSERT_EQ(PoolsOf(bm, in_pool_0), std::set<int64_t>{0});
  EXPECT_EQ(bm.AcquirePrefix(hashes, 3, in_pool_0), 1);
  EXPECT_EQ(PoolsOf(bm, in_pool_0), std::set<int64_t>{0});
  EXPECT_TRUE(bm.CheckConsistency({t, u, in_pool_0}).ok()) << bm.CheckConsistency({t, u, in_pool_0});
}

TEST(BlockManagerPoolsTest, APrefixCachedInTwoPoolsIsOneHashToTheRouter) {
  BlockManager bm({.num_blocks = 4, .block_size = 1, .num_pools = 2});
  const auto h = HashesOf({42}, 1);
  std::vector<int32_t> a, b;
  ASSERT_TRUE(bm.Grow(a, 1));  // pool 0
  ASSERT_TRUE(bm.Grow(b, 1));  // pool 1
  bm.CacheBlocks(a, h, 0, 1);
  bm.CacheBlocks(b, h, 0, 1);  // the same content, computed on the other GPU
  auto events = bm.TakeEvents();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].kind, PrefixCacheEvent::Kind::kAdded);
  EXPECT_EQ(events[0].block_hash, h[0]);
  EXPECT_EQ(bm.CachedHashes(), std::vector<uint64_t>{h[0]});
  EXPECT_EQ(bm.num_cached(), 2);  // two blocks
  bm.Release(a);
  bm.Release(b);

  std::vector<int32_t> fills_pool_0;
  ASSERT_TRUE(bm.Grow(fills_pool_0, 2));  // the free block, then evicts pool 0's copy
  ASSERT_EQ(PoolsOf(bm, fills_pool_0), std::set<int64_t>{0});
  EXPECT_TRUE(bm.TakeEvents().empty());  // pool 1 still has it
  EXPECT_EQ(bm.CachedHashes(), std::vector<uint64_t>{h[0]});
  EXPECT_EQ(bm.num_cached(), 1);

  std::vector<int32_t> fills_pool_1;
  ASSERT_TRUE(bm.Grow(fills_pool_1, 2));  // evicts the last copy
  events = bm.TakeEvents();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].kind, PrefixCacheEvent::Kind::kEvicted);
  EXPECT_EQ(events[0].block_hash, h[0]);
  EXPECT_TRUE(bm.CachedHashes().empty());
  EXPECT_TRUE(bm.CheckConsistency({fills_pool_0, fills_pool_1}).ok());
}

TEST(BlockManagerPoolsTest, CheckConsistencyCatchesATableSpanningTwoPools) {
  BlockManager bm({.num_blocks = 4, .block_size = 1, .num_pools = 2});
  std::vector<int32_t> a, b;
  ASSERT_TRUE(bm.Grow(a, 1));  // block 0, pool 0
  ASSERT_TRUE(bm.Grow(b, 1));  // block 2, pool 1
  ASSERT_TRUE(bm.CheckConsistency({a, b}).ok());
  // The same references, held by one table: the counts agree, the pools do not.
  const std::vector<int32_t> spanning = {a[0], b[0]};
  const absl::Status st = bm.CheckConsistency({spanning});
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("pool"), std::string::npos) << st;
}

TEST(BlockManagerDeathTest, BlockCountMustBeAMultipleOfThePools) {
  EXPECT_DEATH(BlockManager({.num_blocks = 5, .block_size = 1, .num_pools = 2}), "pools 2");
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
