// Compiled PCRE2 patterns (UTF + UCP, JIT when available), searched the way `tokenizers` searches
// its Oniguruma regexes.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace cohort::tokenizer_internal {

struct Span {
  size_t begin = 0;
  size_t end = 0;
  bool operator==(const Span&) const = default;
};

class Regex {
 public:
  enum class Syntax {
    kOniguruma,  // a `tokenizers` "Regex" pattern
    kLiteral,    // a `tokenizers` "String" pattern: the text itself
    kPcre2,      // Cohort's own patterns
  };
  static absl::StatusOr<std::unique_ptr<Regex>> Compile(std::string_view pattern, Syntax syntax);
  ~Regex();
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Appends the matches in `subject` (valid UTF-8) in the order Oniguruma's find_iter yields
  // them: leftmost first, each search starting where the last match ended, an empty match right
  // where the previous match ended skipped by one character. Fails only when PCRE2 gives up
  // (match or stack limits).
  absl::Status FindAll(std::string_view subject, std::vector<Span>& matches) const;
  // Whether the pattern matches starting exactly at subject[offset].
  absl::StatusOr<bool> MatchesAt(std::string_view subject, size_t offset) const;

  const std::string& pattern() const { return pattern_; }

 private:
  Regex(std::string pattern, void* code, bool jit) : pattern_(std::move(pattern)), code_(code), jit_(jit) {}
  // Returns 1 with the match in `span`, 0 for no match, or a status.
  absl::StatusOr<bool> Search(std::string_view subject, size_t offset, bool anchored, Span& span) const;

  std::string pattern_;
  void* code_;  // pcre2_code_8
  bool jit_;
};

}  // namespace cohort::tokenizer_internal
