// The loaded parts of a tokenizer.json and the encode / decode paths through them, in the
// order `tokenizers` runs them:
//   added tokens (raw) -> normalizer -> added tokens (normalized) -> pre-tokenizer -> BPE
//   -> post-processor
// and for decoding: id -> token -> decoder bytes -> lossy UTF-8.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "common/tokenizer/internal/added_vocabulary.h"
#include "common/tokenizer/internal/bpe.h"
#include "common/tokenizer/internal/decoder.h"
#include "common/tokenizer/internal/json_fields.h"
#include "common/tokenizer/internal/normalizer.h"
#include "common/tokenizer/internal/post_processor.h"
#include "common/tokenizer/internal/pre_tokenizer.h"

namespace cohort::tokenizer_internal {

class Pipeline {
 public:
  // `json` is a whole tokenizer.json; `file` names it in errors.
  static absl::StatusOr<std::unique_ptr<Pipeline>> FromJson(const Json& json, const std::string& file);

  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text, bool add_special_tokens) const;
  std::string Decode(std::span<const int32_t> ids, bool skip_special_tokens) const;

  // What token `id` adds to the decoded byte stream; false when it adds nothing (an unknown id,
  // or a special token being skipped).
  bool TokenBytes(int32_t id, bool skip_special_tokens, std::string_view& bytes) const;
  std::string_view separator() const { return decoder_.separator(); }

  int64_t id_limit() const { return static_cast<int64_t>(decoded_.size()); }
  std::optional<int32_t> TokenToId(std::string_view token) const;
  bool IsSpecial(int32_t id) const;

 private:
  struct DecodedToken {
    bool exists = false;
    bool special = false;
    std::string bytes;  // the decoder's contribution
  };

  Pipeline() = default;
  absl::Status EncodeText(std::string_view text, std::vector<int32_t>& ids) const;

  Normalizer normalizer_;
  PreTokenizer pre_tokenizer_;
  std::unique_ptr<BpeModel> model_;
  std::unique_ptr<AddedVocabulary> added_;
  PostProcessor post_processor_;
  Decoder decoder_;
  std::vector<DecodedToken> decoded_;  // by id
};

}  // namespace cohort::tokenizer_internal
