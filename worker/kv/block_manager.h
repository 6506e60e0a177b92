// KV-cache blocks with reference counts and a prefix cache, split into pools.
//
// A block is free, held (reference count > 0: in the block tables of that many requests), or
// cached-idle (count 0 but keyed by its hash, kept for reuse until evicted least-recently-used).
// Full blocks whose tokens are computed are entered in the cache under their chained hash
// (common/block_hash.h); a new request acquires the cached blocks that match the start of its
// prompt instead of computing them. A cached block is never written again: only its hash-defined
// content can live there.
//
// Pools: the blocks are split into num_pools pools of consecutive ids, pool p = blocks
// [p * pool_size, (p + 1) * pool_size). Under data-parallel attention each GPU holds one pool and
// attends only over the sequences whose KV lives there, so every block of one table must come from
// one pool: a table's pool is that of its first block, chosen when the table is first filled. Each
// pool has its own free list, LRU list and prefix cache; the same content may be cached in several
// pools, in different blocks. Events and CachedHashes() show the router the worker's cache as one
// set of hashes. With one pool (the default) this is the plain single-GPU cache.
//
// Not thread-safe: the scheduler owns it and calls it from the engine thread.
#pragma once

#include <cstdint>
#include <list>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/status/status.h"

namespace cohort {

// Blocks needed to hold `tokens` positions.
inline int64_t BlocksForTokens(int64_t tokens, int64_t block_size) { return (tokens + block_size - 1) / block_size; }

struct PrefixCacheEvent {
  enum class Kind { kAdded, kEvicted };
  uint64_t id;  // increasing from 1
  Kind kind;
  uint64_t block_hash;
};

class BlockManager {
 public:
  struct Options {
    int64_t num_blocks = 0;
    int64_t block_size = 16;
    bool prefix_caching = true;
    int64_t num_pools = 1;  // num_blocks must be a multiple of it
  };
  explicit BlockManager(const Options& options);

  int64_t num_blocks() const { return num_blocks_; }
  int64_t block_size() const { return block_size_; }
  bool prefix_caching() const { return prefix_caching_; }
  int64_t num_pools() const { return static_cast<int64_t>(pools_.size()); }
  int64_t pool_size() const { return pool_size_; }  // blocks per pool
  // The most KV-cache tokens one request can hold, for error messages: "N", or "N tokens in each
  // of its P KV pools (one per GPU)".
  std::string DescribeRequestCapacity() const;
  int64_t PoolOf(int32_t block) const { return block / pool_size_; }
  // Blocks a request could be given now: free ones plus idle cached ones (evicted on demand), over
  // all pools or in one.
  int64_t num_available() const;
  int64_t num_available(int64_t pool) const {
    return static_cast<int64_t>(pools_[pool].free.size() + pools_[pool].idle.size());
  }
  int64_t num_held() const { return num_blocks_ - num_available(); }
  // Blocks in the prefix cache, summed over pools: a hash cached in two pools counts twice.
  int64_t num_cached() const;
  uint64_t prefix_queries() const { return prefix_queries_; }
  uint64_t prefix_hit_blocks() const { return prefix_hit_blocks_; }

  // Appends to `table` the cached blocks matching the leading `block_hashes`, at most `max_blocks`,
  // taking a reference on each. Returns how many matched. A non-empty table matches only in its own
  // pool; an empty one takes the pool with the longest match (ties: most available blocks, then
  // lowest index).
  int64_t AcquirePrefix(std::span<const uint64_t> block_hashes, int64_t max_blocks, std::vector<int32_t>& table);

  // The pool Grow() takes new blocks for `table` from: its own, or for an empty table the pool with
  // the most available blocks (ties: lowest index).
  int64_t PoolForGrowth(std::span<const int32_t> table) const;

  // Grows `table` to `blocks_needed` blocks from PoolForGrowth(table). Returns false, changing
  // nothing, when that pool has too few available, whatever room the other pools have.
  bool Grow(std::vector<int32_t>& table, int64_t blocks_needed);

  // Enters table[from .. to) in the prefix cache under block_hashes[from .. to); those blocks must be
  // full and computed. A block already cached, or whose hash another block of its pool already
  // holds, is left as is.
  void CacheBlocks(std::span<const int32_t> table, std::span<const uint64_t> block_hashes, int64_t from, int64_t to);

  // Drops one reference to every block of `table` and clears it.
  void Release(std::vector<int32_t>& table);

  // Events since the last call, oldest first. kAdded when a hash becomes cached in its first pool,
  // kEvicted when it leaves its last one.
  std::vector<PrefixCacheEvent> TakeEvents();
  uint64_t last_event_id() const { return next_event_id_ - 1; }
  // Every hash cached in some pool, each once.
  std::vector<uint64_t> CachedHashes() const;

  // Checks the bookkeeping against the block tables of every live request: each table lies in one
  // pool, reference counts equal the number of tables holding each block, and every block is
  // exactly one of free, held, idle, on its own pool's lists and in its own pool's hash map.
  absl::Status CheckConsistency(const std::vector<std::span<const int32_t>>& tables) const;

 private:
  static constexpr uint64_t kNoHash = 0;

  struct Pool {
    std::vector<int32_t> free;
    std::list<int32_t> idle;  // cached, unreferenced; front = least recently used
    std::unordered_map<uint64_t, int32_t> by_hash;
  };

  // Leading `block_hashes`, at most `max_blocks`, cached in `pool`.
  int64_t CachedPrefixLength(int64_t pool, std::span<const uint64_t> block_hashes, int64_t max_blocks) const;
  // From the pool's free list, else by evicting its least recently used idle block.
  int32_t TakeBlock(int64_t pool);
  void Emit(PrefixCacheEvent::Kind kind, uint64_t hash);

  int64_t num_blocks_;
  int64_t block_size_;
  bool prefix_caching_;
  int64_t pool_size_;
  std::vector<Pool> pools_;
  std::vector<int32_t> ref_count_;
  std::vector<uint64_t> hash_of_;                  // kNoHash unless cached
  std::vector<std::list<int32_t>::iterator> idle_pos_;
  std::unordered_map<uint64_t, int32_t> pools_caching_;  // hash -> how many pools cache it, > 0
  std::vector<PrefixCacheEvent> events_;
  uint64_t next_event_id_ = 1;
  uint64_t prefix_queries_ = 0;
  uint64_t prefix_hit_blocks_ = 0;
};

}  // namespace cohort
