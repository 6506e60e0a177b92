// How `tokenizers` cuts a piece of text around the matches of a pattern
// (NormalizedString::split with a SplitDelimiterBehavior).
#pragma once

#include <span>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "common/tokenizer/internal/regex.h"

namespace cohort::tokenizer_internal {

enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

// Parses "Removed", "Isolated", "MergedWithPrevious", "MergedWithNext" or "Contiguous".
absl::StatusOr<SplitBehavior> ParseSplitBehavior(std::string_view name);

// Scratch reused across calls so that splitting allocates nothing once warm.
struct SplitScratch {
  std::vector<Span> matches;
  std::vector<std::pair<Span, bool>> marked;  // (range, is a match or to be removed)
};

// The pieces of a `length`-byte text that `matches` (ordered, non-overlapping) cut it into under
// `behavior`, the matches' sense flipped first when `invert`. Pieces may be empty; `tokenizers`
// drops those afterwards, and so must callers.
void SplitAroundMatches(size_t length, std::span<const Span> matches, bool invert, SplitBehavior behavior,
                        SplitScratch& scratch, std::vector<Span>& pieces);

}  // namespace cohort::tokenizer_internal
