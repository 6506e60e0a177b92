#include "common/tokenizer/internal/split.h"

#include "absl/strings/str_cat.h"

namespace cohort::tokenizer_internal {

absl::StatusOr<SplitBehavior> ParseSplitBehavior(std::string_view name) {
  if (name == "Removed") return SplitBehavior::kRemoved;
  if (name == "Isolated") return SplitBehavior::kIsolated;
  if (name == "MergedWithPrevious") return SplitBehavior::kMergedWithPrevious;
  if (name == "MergedWithNext") return SplitBehavior::kMergedWithNext;
  if (name == "Contiguous") return SplitBehavior::kContiguous;
  return absl::InvalidArgumentError(
      absl::StrCat("split behavior \"", std::string(name),
                   "\" is not one of Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous"));
}

void SplitAroundMatches(size_t length, std::span<const Span> matches, bool invert, SplitBehavior behavior,
                        SplitScratch& scratch, std::vector<Span>& pieces) {
  // Every byte covered: gaps (false) and matches (true), as Pattern::find_matches lists them.
  auto& marked = scratch.marked;
  marked.clear();
  if (length == 0) {
    marked.push_back({{0, 0}, false});
  } else {
    size_t previous = 0;
    for (const Span& m : matches) {
      if (previous != m.begin) marked.push_back({{previous, m.begin}, false});
      marked.push_back({m, true});
      previous = m.end;
    }
    if (previous != length) marked.push_back({{previous, length}, false});
  }
  if (invert) {
    for (auto& [span, is_match] : marked) is_match = !is_match;
  }

  // Folded in place: entries become (range, remove?) as NormalizedString::split computes them.
  size_t kept = 0;
  bool previous_match = false;
  switch (behavior) {
    case SplitBehavior::kRemoved:
      break;
    case SplitBehavior::kIsolated:
      for (auto& entry : marked) entry.second = false;
      break;
    case SplitBehavior::kContiguous:
      for (size_t r = 0; r < marked.size(); ++r) {
        const auto [span, is_match] = marked[r];  // a copy: the write below may land on entry r
        if (is_match == previous_match && kept > 0) {
          marked[kept - 1].first.end = span.end;
        } else {
          marked[kept++] = {span, false};
        }
        previous_match = is_match;
      }
      marked.resize(kept);
      break;
    case SplitBehavior::kMergedWithPrevious:
      for (size_t r = 0; r < marked.size(); ++r) {
        const auto [span, is_match] = marked[r];
        if (is_match && !previous_match && kept > 0) {
          marked[kept - 1].first.end = span.end;
        } else {
          marked[kept++] = {span, false};
        }
        previous_match = is_match;
      }
      marked.resize(kept);
      break;
    case SplitBehavior::kMergedWithNext: {
      // Walked from the end: a match joins the piece after it.
      const size_t n = marked.size();
      size_t write = n;  // entries kept occupy [write, n)
      for (size_t r = n; r-- > 0;) {
        const auto [span, is_match] = marked[r];
        if (is_match && !previous_match && write < n) {
          marked[write].first.begin = span.begin;
        } else {
          marked[--write] = {span, false};
        }
        previous_match = is_match;
      }
      marked.erase(marked.begin(), marked.begin() + static_cast<std::ptrdiff_t>(write));
      break;
    }
  }
  for (const auto& [span, remove] : marked) {
    if (!remove) pieces.push_back(span);
  }
}

}  // namespace cohort::tokenizer_internal
