#include "worker/model/pool_split.h"

#include <algorithm>

namespace cohort {

PoolSplit::PoolSplit(int64_t num_pools) : parts_(num_pools), tokens_(num_pools, 0), logits_in_pool_(num_pools, 0) {}

void PoolSplit::Split(std::span<const SequenceStep> batch, const KvCacheGeometry& geometry) {
  const int64_t pool_blocks = geometry.num_blocks / geometry.num_pools;
  for (Part& part : parts_) {
    part.tables_used = 0;
    part.batch.clear();
  }
  // Each sequence's pool, and its block table counted from the pool's first block, in a table the
  // part keeps from earlier steps where it has one (so a step of known size allocates nothing).
  decode_only_ = true;
  pool_of_.clear();
  for (const SequenceStep& seq : batch) {
    const int64_t pool = geometry.pool_of(seq.block_table[0]);
    pool_of_.push_back(pool);
    Part& part = parts_[pool];
    if (part.tables_used == part.tables.size()) part.tables.emplace_back();
    std::vector<int32_t>& table = part.tables[part.tables_used++];
    table.assign(seq.block_table.begin(), seq.block_table.end());
    for (int32_t& block : table) block -= static_cast<int32_t>(pool * pool_blocks);
    decode_only_ = decode_only_ && seq.tokens.size() == 1 && seq.compute_logits;
  }
  // Every table is in place, so the parts may point into them now.
  std::fill(tokens_.begin(), tokens_.end(), 0);
  // logits_rows_ first holds (pool, index among the pool's logits rows) as pool * batch size +
  // index; once rows_ is known it becomes pool * rows_ + index.
  const int32_t stride = static_cast<int32_t>(batch.size());
  std::fill(logits_in_pool_.begin(), logits_in_pool_.end(), 0);
  logits_rows_.clear();
  for (size_t i = 0; i < batch.size(); ++i) {
    const SequenceStep& seq = batch[i];
    const int64_t pool = pool_of_[i];
    Part& part = parts_[pool];
    part.batch.push_back({seq.tokens, seq.start_position, part.tables[part.batch.size()], seq.compute_logits});
    tokens_[pool] += static_cast<int32_t>(seq.tokens.size());
    if (seq.compute_logits) logits_rows_.push_back(static_cast<int32_t>(pool) * stride + logits_in_pool_[pool]++);
  }
  rows_ = 0;
  for (size_t p = 0; p < parts_.size(); ++p) {
    rows_ = std::max(rows_, decode_only_ ? static_cast<int>(parts_[p].batch.size()) : tokens_[p]);
  }
  for (int32_t& row : logits_rows_) row = row / stride * rows_ + row % stride;
}

}  // namespace cohort
