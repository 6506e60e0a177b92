// Hashes of full KV blocks, identical in every process: the worker keys its prefix cache by them
// and the router predicts cache hits with them, so both must compute the same values.
//
// Block i's hash covers its tokens and, through the previous block's hash, everything before it:
//   h_0 = Mix(kSeed, tokens[0 .. B)),  h_i = Mix(h_{i-1}, tokens[i*B .. (i+1)*B))
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace cohort {

// Extends `hashes` to cover every full block of `tokens` (blocks already hashed are kept).
void ExtendBlockHashes(std::span<const int32_t> tokens, int64_t block_size, std::vector<uint64_t>& hashes);

}  // namespace cohort
