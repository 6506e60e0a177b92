#include "worker/kv/block_manager.h"

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
  free_.reserve(num_blocks_);
  for (int64_t b = num_blocks_ - 1; b >= 0; --b) free_.push_back(static_cast<int32_t>(b));
}

int64_t BlockManager::AcquirePrefix(std::span<const uint64_t> block_hashes, int64_t max_blocks,
                                    std::vector<int32_t>& table) {
  if (!prefix_caching_) return 0;
  ++prefix_queries_;
  int64_t matched = 0;
  for (; matched < max_blocks && matched < static_cast<int64_t>(block_hashes.size()); ++matched) {
    auto it = by_hash_.find(block_hashes[matched]);
    if (it == by_hash_.end()) break;
    const int32_t block = it->second;
    if (ref_count_[block]++ == 0) idle_.erase(idle_pos_[block]);
    table.push_back(block);
  }
  prefix_hit_blocks_ += matched;
  return matched;
}

int32_t BlockManager::TakeBlock() {
  int32_t block;
  if (!free_.empty()) {
    block = free_.back();
    free_.pop_back();
  } else {
    block = idle_.front();
    idle_.pop_front();
    Emit(PrefixCacheEvent::Kind::kEvicted, hash_of_[block]);
    by_hash_.erase(hash_of_[block]);
    hash_of_[block] = kNoHash;
  }
  ref_count_[block] = 1;
  return block;
}

bool BlockManager::Grow(std::vector<int32_t>& table, int64_t blocks_needed) {
  const int64_t missing = blocks_needed - static_cast<int64_t>(table.size());
  if (missing <= 0) return true;
  if (missing > num_available()) return false;
  for (int64_t i = 0; i < missing; ++i) table.push_back(TakeBlock());
  return true;
}

void BlockManager::CacheBlocks(std::span<const int32_t> table, std::span<const uint64_t> block_hashes, int64_t from,
                               int64_t to) {
  if (!prefix_caching_) return;
  COHORT_CHECK(to <= static_cast<int64_t>(table.size()) && to <= static_cast<int64_t>(block_hashes.size()),
               "caching blocks up to ", to, " of a table of ", table.size(), " with ", block_hashes.size(), " hashes");
  for (int64_t i = from; i < to; ++i) {
    const int32_t block = table[i];
    if (hash_of_[block] != kNoHash) continue;           // came from the cache
    if (by_hash_.count(block_hashes[i]) != 0) continue;  // another request computed the same block
    hash_of_[block] = block_hashes[i];
    by_hash_.emplace(block_hashes[i], block);
    Emit(PrefixCacheEvent::Kind::kAdded, block_hashes[i]);
  }
}

void BlockManager::Release(std::vector<int32_t>& table) {
  for (int32_t block : table) {
    COHORT_CHECK(block >= 0 && block < num_blocks_ && ref_count_[block] > 0, "releasing block ", block,
                 " that is not held");
    if (--ref_count_[block] > 0) continue;
    if (hash_of_[block] != kNoHash) {
      idle_pos_[block] = idle_.insert(idle_.end(), block);  // most recently used at the back
    } else {
      free_.push_back(block);
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
  out.reserve(by_hash_.size());
  for (const auto& [hash, block] : by_hash_) out.push_back(hash);
  return out;
}

absl::Status BlockManager::CheckConsistency(const std::vector<std::span<const int32_t>>& tables) const {
  std::vector<int32_t> expected(num_blocks_, 0);
  for (const auto& table : tables) {
    for (int32_t block : table) {
      if (block < 0 || block >= num_blocks_) return absl::InternalError(absl::StrCat("table holds block ", block));
      ++expected[block];
    }
  }
  std::vector<int> where(num_blocks_, 0);  // how many of free / idle list a block is on
  for (int32_t b : free_) ++where[b];
  for (int32_t b : idle_) ++where[b];
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
      auto it = by_hash_.find(hash_of_[b]);
      if (it == by_hash_.end() || it->second != b) return absl::InternalError(absl::StrCat("block ", b, " hash map"));
    }
  }
  if (by_hash_.size() > static_cast<size_t>(num_blocks_)) return absl::InternalError("more hashes than blocks");
  return absl::OkStatus();
}

}  // namespace cohort
