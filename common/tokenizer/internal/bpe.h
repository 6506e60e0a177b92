// tokenizer.json "model" of type BPE: the vocabulary, the ranked merges, and the merge loop of
// `tokenizers` (lowest rank first, leftmost among equals), with a cache of recent words.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "common/tokenizer/internal/json_fields.h"
#include "common/tokenizer/internal/word_cache.h"

namespace cohort::tokenizer_internal {

class BpeModel {
 public:
  // `json` is the "model" value. Merges may be "a b" strings or ["a", "b"] pairs.
  static absl::StatusOr<std::unique_ptr<BpeModel>> FromJson(const Json& json, const JsonPlace& place);

  // Appends the ids of one pre-tokenized word.
  void Tokenize(std::string_view word, std::vector<int32_t>& out) const;

  std::optional<int32_t> TokenToId(std::string_view token) const;
  // The token of `id`, or nullptr when the vocabulary has no such id.
  const std::string* IdToToken(int32_t id) const;
  // Entries in the vocabulary (what `tokenizers` calls the model's vocab size).
  size_t vocab_entries() const { return vocab_.size(); }
  // One past the largest id.
  int64_t id_limit() const { return static_cast<int64_t>(tokens_by_id_.size()); }

 private:
  struct Merge {
    uint32_t rank;
    int32_t merged_id;
  };
  struct Symbol {
    int32_t id;
    int32_t prev;
    int32_t next;
    uint32_t bytes;  // 0 once merged into the symbol on its left
  };

  BpeModel() : cache_(kCacheWords) {}
  static uint64_t PairKey(int32_t left, int32_t right) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
  }
  const Merge* FindMerge(int32_t left, int32_t right) const;
  // The initial symbols of `word`: one per character (or per byte with byte_fallback), unknown
  // characters as unk_token when there is one and dropped otherwise.
  void SplitIntoSymbols(std::string_view word, std::vector<Symbol>& symbols) const;
  void MergeAll(std::vector<Symbol>& symbols) const;

  static constexpr size_t kCacheWords = 1 << 16;
  static constexpr size_t kLongestCachedWord = 256;  // bytes

  absl::flat_hash_map<std::string, int32_t> vocab_;
  std::vector<std::optional<std::string>> tokens_by_id_;
  absl::flat_hash_map<uint64_t, Merge> merges_;
  std::optional<int32_t> unk_id_;
  std::string continuing_subword_prefix_;
  std::string end_of_word_suffix_;
  bool fuse_unk_ = false;
  bool byte_fallback_ = false;
  bool ignore_merges_ = false;
  WordCache cache_;
};

}  // namespace cohort::tokenizer_internal
