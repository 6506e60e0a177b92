#include "common/tokenizer/internal/decoder.h"

#include "common/status.h"
#include "common/tokenizer/internal/byte_level.h"

namespace cohort::tokenizer_internal {

absl::StatusOr<Decoder> Decoder::FromJson(const Json& json, const JsonPlace& place) {
  Decoder decoder;
  if (json.is_null()) return decoder;
  COHORT_ASSIGN_OR_RETURN(const std::string type, TypeOf(json, place));
  if (type == "ByteLevel") {
    decoder.byte_level_ = true;
    return decoder;
  }
  if (type != "Sequence") return place.Unsupported(type, "ByteLevel, Sequence of ByteLevel");
  COHORT_ASSIGN_OR_RETURN(const Json* list, RequiredArray(json, "decoders", place));
  for (size_t i = 0; i < list->size(); ++i) {
    const JsonPlace item = place.Field("decoders").Index(i);
    COHORT_ASSIGN_OR_RETURN(const std::string item_type, TypeOf((*list)[i], item));
    if (item_type != "ByteLevel") return item.Unsupported(item_type, "ByteLevel");
    // A second ByteLevel would map the first one's output again: not worth supporting.
    if (decoder.byte_level_) return item.Error("more than one ByteLevel decoder in a Sequence is not supported");
    decoder.byte_level_ = true;
  }
  return decoder;
}

void Decoder::AppendToken(std::string_view token, std::string& bytes) const {
  if (byte_level_) {
    ByteLevelAlphabet::Get().Decode(token, bytes);
  } else {
    bytes.append(token);
  }
}

}  // namespace cohort::tokenizer_internal
