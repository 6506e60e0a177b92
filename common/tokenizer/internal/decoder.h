// tokenizer.json "decoder": how tokens become text again. Both supported decoders are a
// per-token byte contribution followed by one UTF-8 (lossy) conversion of the whole, which is
// what makes streaming decoding exact.
#pragma once

#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "common/tokenizer/internal/json_fields.h"

namespace cohort::tokenizer_internal {

class Decoder {
 public:
  // `json` is the "decoder" value; null means `tokenizers`' default of joining tokens with " ".
  static absl::StatusOr<Decoder> FromJson(const Json& json, const JsonPlace& place);

  // Appends the bytes `token` contributes.
  void AppendToken(std::string_view token, std::string& bytes) const;
  // Bytes between two consecutive tokens.
  std::string_view separator() const { return byte_level_ ? "" : " "; }

 private:
  bool byte_level_ = false;
};

}  // namespace cohort::tokenizer_internal
