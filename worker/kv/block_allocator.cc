#include "worker/kv/block_allocator.h"

#include "common/status.h"

namespace cohort {

BlockAllocator::BlockAllocator(int64_t num_blocks) : num_blocks_(num_blocks), in_use_(num_blocks, false) {
  COHORT_CHECK(num_blocks >= 0 && num_blocks <= INT32_MAX, "num_blocks ", num_blocks);
  free_.reserve(num_blocks);
  for (int64_t b = num_blocks - 1; b >= 0; --b) free_.push_back(static_cast<int32_t>(b));
}

bool BlockAllocator::Allocate(int64_t count, std::vector<int32_t>& table) {
  if (count > num_free()) return false;
  for (int64_t i = 0; i < count; ++i) {
    const int32_t block = free_.back();
    free_.pop_back();
    in_use_[block] = true;
    table.push_back(block);
  }
  return true;
}

void BlockAllocator::Free(std::vector<int32_t>& table) {
  for (int32_t block : table) {
    COHORT_CHECK(block >= 0 && block < num_blocks_ && in_use_[block], "freeing block ", block, " not in use");
    in_use_[block] = false;
    free_.push_back(block);
  }
  table.clear();
}

}  // namespace cohort
