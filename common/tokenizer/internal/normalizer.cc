#include "common/tokenizer/internal/normalizer.h"

#include <utf8proc.h>

#include <cstdlib>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace cohort::tokenizer_internal {
namespace {

absl::Status NormalizeUnicode(std::string_view text, utf8proc_option_t form, std::string& out) {
  utf8proc_uint8_t* result = nullptr;
  const utf8proc_ssize_t n =
      utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(text.data()), static_cast<utf8proc_ssize_t>(text.size()),
                   &result, static_cast<utf8proc_option_t>(UTF8PROC_STABLE | form));
  if (n < 0) return absl::InternalError(absl::StrCat("Unicode normalization failed: ", utf8proc_errmsg(n)));
  out.assign(reinterpret_cast<const char*>(result), static_cast<size_t>(n));
  std::free(result);
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<Normalizer> Normalizer::FromJson(const Json& json, const JsonPlace& place) {
  Normalizer normalizer;
  if (!json.is_null()) COHORT_RETURN_IF_ERROR(AddSteps(json, place, normalizer.steps_));
  return normalizer;
}

absl::Status Normalizer::AddSteps(const Json& json, const JsonPlace& place, std::vector<Step>& steps) {
  COHORT_ASSIGN_OR_RETURN(const std::string type, TypeOf(json, place));
  if (type == "Sequence") {
    const JsonPlace list_place = place.Field("normalizers");
    COHORT_ASSIGN_OR_RETURN(const Json* list, RequiredArray(json, "normalizers", place));
    for (size_t i = 0; i < list->size(); ++i) COHORT_RETURN_IF_ERROR(AddSteps((*list)[i], list_place.Index(i), steps));
  } else if (type == "NFC") {
    steps.push_back(UnicodeForm::kNfc);
  } else if (type == "NFD") {
    steps.push_back(UnicodeForm::kNfd);
  } else if (type == "NFKC") {
    steps.push_back(UnicodeForm::kNfkc);
  } else if (type == "NFKD") {
    steps.push_back(UnicodeForm::kNfkd);
  } else if (type == "Prepend") {
    COHORT_ASSIGN_OR_RETURN(std::string prefix, RequiredString(json, "prepend", place));
    steps.push_back(Prepend{std::move(prefix)});
  } else if (type == "Replace") {
    auto pattern = json.find("pattern");
    if (pattern == json.end() || !pattern->is_object() || pattern->size() != 1) {
      return place.Field("pattern").Error("expected {\"String\": ...} or {\"Regex\": ...}");
    }
    const JsonPlace pattern_place = place.Field("pattern");
    std::unique_ptr<Regex> regex;
    if (pattern->contains("String")) {
      COHORT_ASSIGN_OR_RETURN(const std::string text, RequiredString(*pattern, "String", pattern_place));
      auto compiled = Regex::Compile(text, Regex::Syntax::kLiteral);
      if (!compiled.ok()) return pattern_place.Error(std::string(compiled.status().message()));
      regex = std::move(compiled).value();
    } else if (pattern->contains("Regex")) {
      COHORT_ASSIGN_OR_RETURN(const std::string text, RequiredString(*pattern, "Regex", pattern_place));
      auto compiled = Regex::Compile(text, Regex::Syntax::kOniguruma);
      if (!compiled.ok()) return pattern_place.Error(std::string(compiled.status().message()));
      regex = std::move(compiled).value();
    } else {
      return pattern_place.Error("expected {\"String\": ...} or {\"Regex\": ...}");
    }
    COHORT_ASSIGN_OR_RETURN(std::string content, RequiredString(json, "content", place));
    steps.push_back(Replace{std::move(regex), std::move(content)});
  } else {
    return place.Unsupported(type, "Sequence, NFC, NFD, NFKC, NFKD, Prepend, Replace");
  }
  return absl::OkStatus();
}

absl::Status Normalizer::Apply(std::string_view text, std::string& out) const {
  out.assign(text);
  std::string next;
  std::vector<Span> matches;
  for (const Step& step : steps_) {
    if (const auto* form = std::get_if<UnicodeForm>(&step)) {
      utf8proc_option_t option = UTF8PROC_COMPOSE;
      switch (*form) {
        case UnicodeForm::kNfc:
          option = UTF8PROC_COMPOSE;
          break;
        case UnicodeForm::kNfd:
          option = UTF8PROC_DECOMPOSE;
          break;
        case UnicodeForm::kNfkc:
          option = static_cast<utf8proc_option_t>(UTF8PROC_COMPOSE | UTF8PROC_COMPAT);
          break;
        case UnicodeForm::kNfkd:
          option = static_cast<utf8proc_option_t>(UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT);
          break;
      }
      COHORT_RETURN_IF_ERROR(NormalizeUnicode(out, option, next));
    } else if (const auto* prepend = std::get_if<Prepend>(&step)) {
      if (out.empty()) continue;  // `tokenizers` prepends to non-empty text only
      next = prepend->prefix;
      next += out;
    } else {
      const auto& replace = std::get<Replace>(step);
      matches.clear();
      COHORT_RETURN_IF_ERROR(replace.pattern->FindAll(out, matches));
      next.clear();
      size_t copied = 0;
      for (const Span& m : matches) {
        next.append(out, copied, m.begin - copied);
        next += replace.content;
        copied = m.end;
      }
      next.append(out, copied, std::string::npos);
    }
    out.swap(next);
  }
  return absl::OkStatus();
}

}  // namespace cohort::tokenizer_internal
