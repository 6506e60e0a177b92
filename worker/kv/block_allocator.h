// Hands out KV-cache blocks. Not thread-safe: the scheduler that owns it calls it from one thread.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

namespace cohort {

class BlockAllocator {
 public:
  explicit BlockAllocator(int64_t num_blocks);

  int64_t num_blocks() const { return num_blocks_; }
  int64_t num_free() const { return static_cast<int64_t>(free_.size()); }

  // Appends `count` blocks to `table`, or returns false and changes nothing if fewer are free.
  bool Allocate(int64_t count, std::vector<int32_t>& table);
  // Returns every block of `table` and clears it.
  void Free(std::vector<int32_t>& table);

 private:
  int64_t num_blocks_;
  std::vector<int32_t> free_;  // used as a stack: recently freed blocks are reused first
  std::vector<bool> in_use_;
};

// Blocks needed to hold `tokens` positions.
inline int64_t BlocksForTokens(int64_t tokens, int64_t block_size) { return (tokens + block_size - 1) / block_size; }

}  // namespace cohort
