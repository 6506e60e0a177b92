#include "common/tokenizer/internal/word_cache.h"

#include "absl/strings/string_view.h"

namespace cohort::tokenizer_internal {
namespace {

absl::string_view AsAbsl(std::string_view s) { return absl::string_view(s.data(), s.size()); }

}  // namespace

WordCache::WordCache(size_t capacity) : capacity_per_shard_(std::max<size_t>(1, capacity / kShards)) {}

WordCache::Shard& WordCache::ShardFor(std::string_view word) const {
  // Only spreads words over the locks; the map inside hashes them properly.
  if (word.empty()) return shards_[0];
  const size_t mix = word.size() * 31 + static_cast<uint8_t>(word.front()) * 7 + static_cast<uint8_t>(word.back());
  return shards_[mix % kShards];
}

bool WordCache::Lookup(std::string_view word, std::vector<int32_t>& out) const {
  Shard& shard = ShardFor(word);
  std::lock_guard lock(shard.mutex);
  auto it = shard.index.find(AsAbsl(word));
  if (it == shard.index.end()) return false;
  shard.recency.splice(shard.recency.begin(), shard.recency, it->second);
  out.insert(out.end(), it->second->ids.begin(), it->second->ids.end());
  return true;
}

void WordCache::Insert(std::string_view word, const int32_t* ids, size_t count) const {
  Shard& shard = ShardFor(word);
  std::lock_guard lock(shard.mutex);
  if (shard.index.contains(AsAbsl(word))) return;
  if (shard.index.size() >= capacity_per_shard_) {
    shard.index.erase(shard.recency.back().word);
    shard.recency.pop_back();
  }
  shard.recency.push_front(Entry{std::string(word), std::vector<int32_t>(ids, ids + count)});
  shard.index.emplace(shard.recency.front().word, shard.recency.begin());
}

}  // namespace cohort::tokenizer_internal
