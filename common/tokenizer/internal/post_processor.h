// tokenizer.json "post_processor" for single sequences: TemplateProcessing (e.g. BOS + $A),
// ByteLevel (offsets only: nothing to do for ids), and Sequences of those.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "common/tokenizer/internal/json_fields.h"

namespace cohort::tokenizer_internal {

class PostProcessor {
 public:
  // `json` is the "post_processor" value (null: none).
  static absl::StatusOr<PostProcessor> FromJson(const Json& json, const JsonPlace& place);

  // Rewrites the ids of one encoded sequence. `tokenizers` applies its templates either way;
  // without add_special_tokens their special tokens are left out.
  void Apply(std::vector<int32_t>& ids, bool add_special_tokens) const;

 private:
  struct Piece {
    bool is_sequence;          // $A: the encoded text
    std::vector<int32_t> ids;  // a special token's ids otherwise
  };
  using Template = std::vector<Piece>;

  absl::Status Add(const Json& json, const JsonPlace& place);

  std::vector<Template> templates_;  // applied in order
};

}  // namespace cohort::tokenizer_internal
