// KV-cache blocks with reference counts and a prefix cache.
//
// A block is free, held (reference count > 0: in the block tables of that many requests), or
// cached-idle (count 0 but keyed by its hash, kept for reuse until evicted least-recently-used).
// Full blocks whose tokens are computed are entered in the cache under their chained hash
// (common/block_hash.h); a new request acquires the cached blocks that match the start of its
// prompt instead of computing them. A cached block is never written again: only its hash-defined
// content can live there.
//
// Not thread-safe: the scheduler owns it and calls it from the engine thread.
#pragma once

#include <cstdint>
#include <list>
#include <span>
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
  };
  explicit BlockManager(const Options& options);

  int64_t num_blocks() const { return num_blocks_; }
  int64_t block_size() const { return block_size_; }
  bool prefix_caching() const { return prefix_caching_; }
  // Blocks a request could be given now: free ones plus idle cached ones (evicted on demand).
  int64_t num_available() const { return static_cast<int64_t>(free_.size() + idle_.size()); }
  int64_t num_held() const { return num_blocks_ - num_available(); }
  int64_t num_cached() const { return static_cast<int64_t>(by_hash_.size()); }
  uint64_t prefix_queries() const { return prefix_queries_; }
  uint64_t prefix_hit_blocks() const { return prefix_hit_blocks_; }

  // Appends to `table` the cached blocks matching the leading `block_hashes`, at most `max_blocks`,
  // taking a reference on each. Returns how many matched.
  int64_t AcquirePrefix(std::span<const uint64_t> block_hashes, int64_t max_blocks, std::vector<int32_t>& table);

  // Grows `table` to `blocks_needed` blocks. Returns false, changing nothing, when too few are
  // available.
  bool Grow(std::vector<int32_t>& table, int64_t blocks_needed);

  // Enters table[from .. to) in the prefix cache under block_hashes[from .. to); those blocks must be
  // full and computed. A block already cached, or whose hash another block already holds, is left as is.
  void CacheBlocks(std::span<const int32_t> table, std::span<const uint64_t> block_hashes, int64_t from, int64_t to);

  // Drops one reference to every block of `table` and clears it.
  void Release(std::vector<int32_t>& table);

  // Events since the last call, oldest first.
  std::vector<PrefixCacheEvent> TakeEvents();
  uint64_t last_event_id() const { return next_event_id_ - 1; }
  std::vector<uint64_t> CachedHashes() const;

  // Checks the bookkeeping against the block tables of every live request: reference counts equal
  // the number of tables holding each block, and every block is exactly one of free, held, idle.
  absl::Status CheckConsistency(const std::vector<std::span<const int32_t>>& tables) const;

 private:
  static constexpr uint64_t kNoHash = 0;

  int32_t TakeBlock();  // from the free list, else by evicting the least recently used idle block
  void Emit(PrefixCacheEvent::Kind kind, uint64_t hash);

  int64_t num_blocks_;
  int64_t block_size_;
  bool prefix_caching_;
  std::vector<int32_t> ref_count_;
  std::vector<uint64_t> hash_of_;                  // kNoHash unless cached
  std::vector<int32_t> free_;
  std::list<int32_t> idle_;                        // cached, unreferenced; front = least recently used
  std::vector<std::list<int32_t>::iterator> idle_pos_;
  std::unordered_map<uint64_t, int32_t> by_hash_;
  std::vector<PrefixCacheEvent> events_;
  uint64_t next_event_id_ = 1;
  uint64_t prefix_queries_ = 0;
  uint64_t prefix_hit_blocks_ = 0;
};

}  // namespace cohort
