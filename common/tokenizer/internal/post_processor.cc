#include "common/tokenizer/internal/post_processor.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace cohort::tokenizer_internal {

absl::StatusOr<PostProcessor> PostProcessor::FromJson(const Json& json, const JsonPlace& place) {
  PostProcessor processor;
  if (!json.is_null()) COHORT_RETURN_IF_ERROR(processor.Add(json, place));
  return processor;
}

absl::Status PostProcessor::Add(const Json& json, const JsonPlace& place) {
  COHORT_ASSIGN_OR_RETURN(const std::string type, TypeOf(json, place));
  if (type == "ByteLevel") return absl::OkStatus();
  if (type == "Sequence") {
    COHORT_ASSIGN_OR_RETURN(const Json* list, RequiredArray(json, "processors", place));
    for (size_t i = 0; i < list->size(); ++i) {
      COHORT_RETURN_IF_ERROR(Add((*list)[i], place.Field("processors").Index(i)));
    }
    return absl::OkStatus();
  }
  if (type != "TemplateProcessing") return place.Unsupported(type, "TemplateProcessing, ByteLevel, Sequence");

  auto specials = json.find("special_tokens");
  if (specials == json.end() || !specials->is_object()) {
    return place.Field("special_tokens").Error("expected an object");
  }
  COHORT_ASSIGN_OR_RETURN(const Json* single, RequiredArray(json, "single", place));
  Template result;
  for (size_t i = 0; i < single->size(); ++i) {
    const JsonPlace piece_place = place.Field("single").Index(i);
    const Json& piece = (*single)[i];
    if (piece.is_object() && piece.contains("Sequence")) {
      COHORT_ASSIGN_OR_RETURN(const std::string id,
                              RequiredString(piece["Sequence"], "id", piece_place.Field("Sequence")));
      if (id != "A") return piece_place.Error(absl::StrCat("sequence \"", id, "\" in a single-sequence template"));
      result.push_back({true, {}});
    } else if (piece.is_object() && piece.contains("SpecialToken")) {
      COHORT_ASSIGN_OR_RETURN(const std::string name,
                              RequiredString(piece["SpecialToken"], "id", piece_place.Field("SpecialToken")));
      auto special = specials->find(name);
      if (special == specials->end() || !special->is_object() || !special->contains("ids") ||
          !(*special)["ids"].is_array()) {
        return piece_place.Error(absl::StrCat("special token \"", name, "\" has no ids in special_tokens"));
      }
      Piece token{false, {}};
      for (const Json& id : (*special)["ids"]) {
        if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > INT32_MAX) {
          return place.Field("special_tokens").Error(absl::StrCat("\"", name, "\" has an id that is not a token id"));
        }
        token.ids.push_back(id.get<int32_t>());
      }
      result.push_back(std::move(token));
    } else {
      return piece_place.Error("expected {\"Sequence\": ...} or {\"SpecialToken\": ...}");
    }
  }
  templates_.push_back(std::move(result));
  return absl::OkStatus();
}

void PostProcessor::Apply(std::vector<int32_t>& ids, bool add_special_tokens) const {
  std::vector<int32_t> out;
  for (const Template& t : templates_) {
    const auto sequences = std::count_if(t.begin(), t.end(), [](const Piece& p) { return p.is_sequence; });
    if (sequences == 1) {
      // The usual template (specials around $A once): grow the ids in place, no full copy.
      if (!add_special_tokens) continue;
      std::vector<int32_t> prefix;
      bool before = true;
      for (const Piece& piece : t) {
        if (piece.is_sequence) {
          before = false;
        } else if (before) {
          prefix.insert(prefix.end(), piece.ids.begin(), piece.ids.end());
        } else {
          ids.insert(ids.end(), piece.ids.begin(), piece.ids.end());
        }
      }
      ids.insert(ids.begin(), prefix.begin(), prefix.end());
      continue;
    }
    out.clear();
    for (const Piece& piece : t) {
      if (piece.is_sequence) {
        out.insert(out.end(), ids.begin(), ids.end());
      } else if (add_special_tokens) {
        out.insert(out.end(), piece.ids.begin(), piece.ids.end());
      }
    }
    ids.swap(out);
  }
}

}  // namespace cohort::tokenizer_internal
