#include "common/block_hash.h"

namespace cohort {
namespace {

constexpr uint64_t kSeed = 0x636f686f72742d31ull;  // "cohort-1"

// splitmix64's finaliser: cheap, and a good avalanche for sequential inputs.
uint64_t Mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

}  // namespace

void ExtendBlockHashes(std::span<const int32_t> tokens, int64_t block_size, std::vector<uint64_t>& hashes) {
  const int64_t full_blocks = static_cast<int64_t>(tokens.size()) / block_size;
  for (int64_t b = static_cast<int64_t>(hashes.size()); b < full_blocks; ++b) {
    uint64_t h = Mix((b == 0 ? kSeed : hashes[b - 1]) ^ static_cast<uint64_t>(block_size));
    for (int64_t i = b * block_size; i < (b + 1) * block_size; ++i) {
      h = Mix(h ^ static_cast<uint32_t>(tokens[i]));
    }
    hashes.push_back(h == 0 ? 1 : h);  // 0 means "not cached" to the block manager
  }
}

}  // namespace cohort
