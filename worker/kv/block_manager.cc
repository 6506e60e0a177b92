#include "worker/kv/block_manager.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace cohort {

BlockManager::BlockManager(const Options& options)
    : num_blocks_(options.num_blocks),
      block_size_(options.block_size),
      prefix_caching_(options.prefix_caching),
      ref_count_(options.num_blocks, 0),
      hash_of_(options.num_blocks, kNoHash),
      idle_pos_(options.num_blocks) {
  COHORT_CHECK(num_blocks_ >= 0 && num_blocks_ <= INT32_MAX && block_size_ > 0, "blocks ", num_blocks_, " size ",
               block_size_);
  COHORT_CHECK(options.num_pools > 0 && num_blocks_ % options.num_pools == 0, "blocks ", num_blocks_, " pools ",
               options.num_pools);
  pool_size_ = num_blocks_ / options.num_pools;
  pools_.resize(options.num_pools);
  for (int64_t p = 0; p < options.num_pools; ++p) {
    std::vector<int32_t>& free = pools_[p].free;
    free.reserve(pool_size_);
    // Lowest id on top: a pool hands out its blocks in order.
    for (int64_t b = (p + 1) * pool_size_ - 1; b >= p * pool_size_; --b) free.push_back(static_cast<int32_t>(b));
  }
}

int64_t BlockManager::num_available() const {
  int64_t total = 0;
  for (int64_t p = 0; p < num_pools(); ++p) total += num_available(p);
  return total;
}

int64_t BlockManager::num_cached() const {
  int64_t total = 0;
  for (const Pool& pool : pools_) total += static_cast<int64_t>(pool.by_hash.size());
  return total;
}

int64_t BlockManager::CachedPrefixLength(int64_t pool, std::span<const uint64_t> block_hashes,
                                         int64_t max_blocks) const {
  const int64_t limit = std::min(max_blocks, static_cast<int64_t>(block_hashes.size()));
  int64_t matched = 0;
  while (matched < limit && pools_[pool].by_hash.count(block_hashes[matched]) != 0) ++matched;
  return matched;
}

std::string BlockManager::DescribeRequestCapacity() const {
  const int64_t tokens = pool_size() * block_size_;
  if (num_pools() == 1) return absl::StrCat(tokens);
  return absl::StrCat(tokens, " tokens in each of its ", num_pools(), " KV pools (one per GPU)");
}

int64_t BlockManager::AcquirePrefix(std::span<const uint64_t> block_hashes, int64_t max_blocks,
                                    std::vector<int32_t>& table) {
  if (!prefix_caching_) return 0;
  ++prefix_queries_;
  int64_t pool = table.empty() ? 0 : PoolOf(table[0]);
  int64_t matched = CachedPrefixLength(pool, block_hashes, max_blocks);
  if (table.empty()) {
    for (int64_t p = 1; p < num_pools(); ++p) {
      const int64_t length = CachedPrefixLength(p, block_hashes, max_blocks);
      if (length > matched || (length == matched && num_available(p) > num_available(pool))) {
        pool = p;
        matched = length;
      }
    }
  }
  Pool& chosen = pools_[pool];
  for (int64_t i = 0; i < matched; ++i) {
    const int32_t block = chosen.by_hash.at(block_hashes[i]);
    if (ref_count_[block]++ == 0) chosen.idle.erase(idle_pos_[block]);
    table.push_back(block);
  }
  prefix_hit_blocks_ += matched;
  return matched;
}

int64_t BlockManager::PoolForGrowth(std::span<const int32_t> table) const {
  if (!table.empty()) return PoolOf(table[0]);
  int64_t roomiest = 0;
  for (int64_t p = 1; p < num_pools(); ++p) {
    if (num_available(p) > num_available(roomiest)) roomiest = p;
  }
  return roomiest;
}

int32_t BlockManager::TakeBlock(int64_t pool) {
  Pool& from = pools_[pool];
  int32_t block;
  if (!from.free.empty()) {
    block = from.free.back();
    from.free.pop_back();
  } else {
    block = from.idle.front();
    from.idle.pop_front();
    const uint64_t hash = hash_of_[block];
    from.by_hash.erase(hash);
    hash_of_[block] = kNoHash;
    auto caching = pools_caching_.find(hash);
    if (--caching->second == 0) {
      pools_caching_.erase(caching);
      Emit(PrefixCacheEvent::Kind::kEvicted, hash);
    }
  }
  ref_count_[block] = 1;
  return block;
}

bool BlockManager::Grow(std::vector<int32_t>& table, int64_t blocks_needed) {
  const int64_t missing = blocks_needed - static_cast<int64_t>(table.size());
  if (missing <= 0) return true;
  const int64_t pool = PoolForGrowth(table);
  if (missing > num_available(pool)) return false;
  for (int64_t i = 0; i < missing; ++i) table.push_back(TakeBlock(pool));
  return true;
}

void BlockManager::CacheBlocks(std::span<const int32_t> table, std::span<const uint64_t> block_hashes, int64_t from,
                               int64_t to) {
  if (!prefix_caching_) return;
  COHORT_CHECK(to <= static_cast<int64_t>(table.size()) && to <= static_cast<int64_t>(block_hashes.size()),
               "caching blocks up to ", to, " of a table of ", table.size(), " with ", block_hashes.size(), " hashes");
  for (int64_t i = from; i < to; ++i) {
    const int32_t block = table[i];
    const uint64_t hash = block_hashes[i];
    if (hash_of_[block] != kNoHash) continue;  // came from the cache
    // Another request of this pool computed the same block; a copy in another pool does not count,
    // as this pool's requests cannot attend over it.
    if (!pools_[PoolOf(block)].by_hash.emplace(hash, block).second) continue;
    hash_of_[block] = hash;
    if (++pools_caching_[hash] == 1) Emit(PrefixCacheEvent::Kind::kAdded, hash);
  }
}

void BlockManager::Release(std::vector<int32_t>& table) {
  for (int32_t block : table) {
    COHORT_CHECK(block >= 0 && block < num_blocks_ && ref_count_[block] > 0, "releasing block ", block,
                 " that is not held");
    if (--ref_count_[block] > 0) continue;
    Pool& pool = pools_[PoolOf(block)];
    if (hash_of_[block] != kNoHash) {
      idle_pos_[block] = pool.idle.insert(pool.idle.end(), block);  // most recently used at the back
    } else {
      pool.free.push_back(block);
    }
  }
  table.clear();
}

void BlockManager::Emit(PrefixCacheEvent::Kind kind, uint64_t hash) {
  events_.push_back({next_event_id_++, kind, hash});
}

std::vector<PrefixCacheEvent> BlockManager::TakeEvents() {
  std::vector<PrefixCacheEvent> out;
  out.swap(events_);
  return out;
}

std::vector<uint64_t> BlockManager::CachedHashes() const {
  std::vector<uint64_t> out;
  out.reserve(pools_caching_.size());
  for (const auto& [hash, pools] : pools_caching_) out.push_back(hash);
  return out;
}

absl::Status BlockManager::CheckConsistency(const std::vector<std::span<const int32_t>>& tables) const {
  std::vector<int32_t> expected(num_blocks_, 0);
  for (const auto& table : tables) {
    for (int32_t block : table) {
      if (block < 0 || block >= num_blocks_) return absl::InternalError(absl::StrCat("table holds block ", block));
      if (PoolOf(block) != PoolOf(table[0])) {
        return absl::InternalError(absl::StrCat("a table holds block ", table[0], " of pool ", PoolOf(table[0]),
                                                " and block ", block, " of pool ", PoolOf(block)));
      }
      ++expected[block];
    }
  }
  std::vector<int> where(num_blocks_, 0);  // how many of free / idle list a block is on
  std::unordered_map<uint64_t, int32_t> pools_caching;
  for (int64_t p = 0; p < num_pools(); ++p) {
    const Pool& pool = pools_[p];
    for (int32_t b : pool.idle) {
      if (PoolOf(b) != p) return absl::InternalError(absl::StrCat("block ", b, " is on the idle list of pool ", p));
      if (hash_of_[b] == kNoHash) return absl::InternalError(absl::StrCat("idle block ", b, " has no hash"));
      ++where[b];
    }
    for (int32_t b : pool.free) {
      if (PoolOf(b) != p) return absl::InternalError(absl::StrCat("block ", b, " is on the free list of pool ", p));
      if (hash_of_[b] != kNoHash) return absl::InternalError(absl::StrCat("free block ", b, " has a hash"));
      ++where[b];
    }
    for (const auto& [hash, b] : pool.by_hash) {
      if (PoolOf(b) != p || hash_of_[b] != hash) {
        return absl::InternalError(absl::StrCat("pool ", p, " maps a hash to block ", b, " that does not hold it"));
      }
      ++pools_caching[hash];
    }
  }
  if (pools_caching != pools_caching_) return absl::InternalError("the count of pools caching each hash is off");
  for (int64_t b = 0; b < num_blocks_; ++b) {
    if (ref_count_[b] != expected[b]) {
      return absl::InternalError(absl::StrCat("block ", b, " has reference count ", ref_count_[b], " but ",
                                              expected[b], " tables hold it"));
    }
    const int should_be_listed = ref_count_[b] == 0 ? 1 : 0;
    if (where[b] != should_be_listed) {
      return absl::InternalError(absl::StrCat("block ", b, " (count ", ref_count_[b], ") is on ", where[b],
                                              " free/idle lists"));
    }
    if (hash_of_[b] != kNoHash) {
      const auto& by_hash = pools_[PoolOf(static_cast<int32_t>(b))].by_hash;
      auto it = by_hash.find(hash_of_[b]);
      if (it == by_hash.end() || it->second != b) return absl::InternalError(absl::StrCat("block ", b, " hash map"));
    }
  }
  return absl::OkStatus();
}

}  // namespace cohort
