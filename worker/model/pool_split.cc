#include "worker/model/pool_split.h"

#include <algorithm>
#include <utility>

namespace cohort {

PoolSplit::PoolSplit(int64_t num_pools) : parts_(num_pools), tokens_(num_pools, 0) {}

void PoolSplit::Split(std::span<const SequenceStep> batch, const KvCacheGeometry& geometry) {
  const int64_t pool_blocks = geometry.num_blocks / geometry.num_pools;
  for (Part& part : parts_) {
    part.tables.clear();
    part.batch.clear();
  }
  decode_only_ = true;
  for (const SequenceStep& seq : batch) {
    const int64_t pool = geometry.pool_of(seq.block_table[0]);
    std::vector<int32_t>& table = parts_[pool].tables.emplace_back(seq.block_table.begin(), seq.block_table.end());
    for (int32_t& block : table) block -= static_cast<int32_t>(pool * pool_blocks);
    decode_only_ = decode_only_ && seq.tokens.size() == 1 && seq.compute_logits;
  }
  // Every table is in place, so the parts may point into them now.
  std::fill(tokens_.begin(), tokens_.end(), 0);
  std::vector<int32_t> logits_in_pool(parts_.size(), 0);
  std::vector<std::pair<int64_t, int32_t>> logits_at;  // (pool, index among its logits rows), batch order
  for (const SequenceStep& seq : batch) {
    const int64_t pool = geometry.pool_of(seq.block_table[0]);
    Part& part = parts_[pool];
    part.batch.push_back({seq.tokens, seq.start_position, part.tables[part.batch.size()], seq.compute_logits});
    tokens_[pool] += static_cast<int32_t>(seq.tokens.size());
    if (seq.compute_logits) logits_at.emplace_back(pool, logits_in_pool[pool]++);
  }
  rows_ = 0;
  for (size_t p = 0; p < parts_.size(); ++p) {
    rows_ = std::max(rows_, decode_only_ ? static_cast<int>(parts_[p].batch.size()) : tokens_[p]);
  }
  logits_rows_.clear();
  for (const auto& [pool, index] : logits_at) logits_rows_.push_back(static_cast<int32_t>(pool * rows_ + index));
}

}  // namespace cohort
