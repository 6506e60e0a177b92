// tokenizer.json "pre_tokenizer": cuts text into the words the model tokenizes one by one.
//
// Every `tokenizers` pre-tokenizer works on each piece independently, so the chain runs depth
// first: a piece goes through all stages and on to the model before the next piece is cut. No
// list of all pieces of a long text is ever built.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "common/tokenizer/internal/json_fields.h"
#include "common/tokenizer/internal/regex.h"
#include "common/tokenizer/internal/split.h"

namespace cohort::tokenizer_internal {

class PreTokenizer {
 public:
  // Per-call buffers, one set per stage (stages nest while a piece flows through).
  struct Scratch {
    struct Stage {
      std::string text;
      SplitScratch split;
      std::vector<Span> pieces;
    };
    std::vector<Stage> stages;
  };
  using EmitWord = absl::FunctionRef<absl::Status(std::string_view)>;

  // `json` is the "pre_tokenizer" value (null: the whole text is one word).
  static absl::StatusOr<PreTokenizer> FromJson(const Json& json, const JsonPlace& place);

  // Calls `emit` with each non-empty word of `text`, in order; stops at the first error.
  absl::Status Run(std::string_view text, Scratch& scratch, EmitWord emit) const;

 private:
  enum class StageKind {
    kSplit,        // cut around a pattern's matches
    kPrefixSpace,  // ByteLevel add_prefix_space: prepend ' ' unless the piece starts with one
    kByteMap,      // ByteLevel: every byte to its alphabet character
  };
  struct Stage {
    explicit Stage(StageKind k) : kind(k) {}
    StageKind kind;
    std::shared_ptr<const Regex> pattern;
    SplitBehavior behavior = SplitBehavior::kIsolated;
    bool invert = false;
  };

  absl::Status AddStages(const Json& json, const JsonPlace& place);
  absl::Status RunFrom(size_t stage, std::string_view piece, Scratch& scratch, EmitWord emit) const;

  std::vector<Stage> stages_;
};

}  // namespace cohort::tokenizer_internal
