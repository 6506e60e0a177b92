// tokenizer.json "normalizer": a chain of text rewrites applied before pre-tokenization.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "absl/status/statusor.h"
#include "common/tokenizer/internal/json_fields.h"
#include "common/tokenizer/internal/regex.h"

namespace cohort::tokenizer_internal {

class Normalizer {
 public:
  // `json` is the "normalizer" value (null gives an empty chain).
  static absl::StatusOr<Normalizer> FromJson(const Json& json, const JsonPlace& place);

  bool empty() const { return steps_.empty(); }
  // Rewrites `text` (valid UTF-8) into `out`.
  absl::Status Apply(std::string_view text, std::string& out) const;

 private:
  enum class UnicodeForm { kNfc, kNfd, kNfkc, kNfkd };
  struct Prepend {
    std::string prefix;
  };
  struct Replace {
    std::shared_ptr<const Regex> pattern;
    std::string content;
  };
  using Step = std::variant<UnicodeForm, Prepend, Replace>;

  static absl::Status AddSteps(const Json& json, const JsonPlace& place, std::vector<Step>& steps);

  std::vector<Step> steps_;
};

}  // namespace cohort::tokenizer_internal
