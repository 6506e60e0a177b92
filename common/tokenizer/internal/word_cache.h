// A bounded, thread-safe map from a pre-tokenized word to its BPE ids, least recently used
// entries evicted first. Sharded by hash so that concurrent encoders rarely share a lock.
#pragma once

#include <algorithm>
#include <cstdint>
#include <list>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"

namespace cohort::tokenizer_internal {

class WordCache {
 public:
  explicit WordCache(size_t capacity);

  // Appends the cached ids of `word` to `out`; false when it is not cached.
  bool Lookup(std::string_view word, std::vector<int32_t>& out) const;
  void Insert(std::string_view word, const int32_t* ids, size_t count) const;

 private:
  static constexpr size_t kShards = 16;
  struct Entry {
    std::string word;
    std::vector<int32_t> ids;
  };
  struct Shard {
    std::mutex mutex;
    std::list<Entry> recency;  // most recently used first
    absl::flat_hash_map<std::string, std::list<Entry>::iterator> index;
  };
  Shard& ShardFor(std::string_view word) const;

  size_t capacity_per_shard_;
  mutable Shard shards_[kShards];
};

}  // namespace cohort::tokenizer_internal
