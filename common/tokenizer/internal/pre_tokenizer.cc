#include "common/tokenizer/internal/pre_tokenizer.h"

#include "common/status.h"
#include "common/tokenizer/internal/byte_level.h"

namespace cohort::tokenizer_internal {
namespace {

// The pattern `tokenizers`' ByteLevel pre-tokenizer splits with when use_regex is true (GPT-2's).
constexpr const char* kGpt2Pattern = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

absl::StatusOr<std::shared_ptr<const Regex>> CompileAt(std::string_view pattern, Regex::Syntax syntax,
                                                       const JsonPlace& place) {
  auto regex = Regex::Compile(pattern, syntax);
  if (!regex.ok()) return place.Error(std::string(regex.status().message()));
  return std::shared_ptr<const Regex>(std::move(regex).value());
}

}  // namespace

absl::StatusOr<PreTokenizer> PreTokenizer::FromJson(const Json& json, const JsonPlace& place) {
  PreTokenizer pre_tokenizer;
  if (!json.is_null()) COHORT_RETURN_IF_ERROR(pre_tokenizer.AddStages(json, place));
  return pre_tokenizer;
}

absl::Status PreTokenizer::AddStages(const Json& json, const JsonPlace& place) {
  COHORT_ASSIGN_OR_RETURN(const std::string type, TypeOf(json, place));
  if (type == "Sequence") {
    COHORT_ASSIGN_OR_RETURN(const Json* list, RequiredArray(json, "pretokenizers", place));
    for (size_t i = 0; i < list->size(); ++i) {
      COHORT_RETURN_IF_ERROR(AddStages((*list)[i], place.Field("pretokenizers").Index(i)));
    }
  } else if (type == "Split") {
    Stage stage(StageKind::kSplit);
    auto pattern = json.find("pattern");
    const JsonPlace pattern_place = place.Field("pattern");
    if (pattern == json.end() || !pattern->is_object()) {
      return pattern_place.Error("expected {\"String\": ...} or {\"Regex\": ...}");
    }
    if (pattern->contains("Regex")) {
      COHORT_ASSIGN_OR_RETURN(const std::string text, RequiredString(*pattern, "Regex", pattern_place));
      COHORT_ASSIGN_OR_RETURN(stage.pattern, CompileAt(text, Regex::Syntax::kOniguruma, pattern_place));
    } else if (pattern->contains("String")) {
      COHORT_ASSIGN_OR_RETURN(const std::string text, RequiredString(*pattern, "String", pattern_place));
      COHORT_ASSIGN_OR_RETURN(stage.pattern, CompileAt(text, Regex::Syntax::kLiteral, pattern_place));
    } else {
      return pattern_place.Error("expected {\"String\": ...} or {\"Regex\": ...}");
    }
    COHORT_ASSIGN_OR_RETURN(const std::string behavior, RequiredString(json, "behavior", place));
    auto parsed = ParseSplitBehavior(behavior);
    if (!parsed.ok()) return place.Field("behavior").Error(std::string(parsed.status().message()));
    stage.behavior = *parsed;
    COHORT_ASSIGN_OR_RETURN(stage.invert, OptionalBool(json, "invert", false, place));
    stages_.push_back(std::move(stage));
  } else if (type == "ByteLevel") {
    COHORT_ASSIGN_OR_RETURN(const bool add_prefix_space, OptionalBool(json, "add_prefix_space", true, place));
    COHORT_ASSIGN_OR_RETURN(const bool use_regex, OptionalBool(json, "use_regex", true, place));
    if (add_prefix_space) stages_.emplace_back(StageKind::kPrefixSpace);
    if (use_regex) {
      Stage split(StageKind::kSplit);
      COHORT_ASSIGN_OR_RETURN(split.pattern, CompileAt(kGpt2Pattern, Regex::Syntax::kOniguruma, place));
      split.behavior = SplitBehavior::kIsolated;
      stages_.push_back(std::move(split));
    }
    stages_.emplace_back(StageKind::kByteMap);
  } else if (type == "Digits") {
    // Every numeric character (Rust's char::is_numeric: N*) is a match of its own.
    COHORT_ASSIGN_OR_RETURN(const bool individual, OptionalBool(json, "individual_digits", false, place));
    Stage stage(StageKind::kSplit);
    COHORT_ASSIGN_OR_RETURN(stage.pattern, CompileAt("\\p{N}", Regex::Syntax::kPcre2, place));
    stage.behavior = individual ? SplitBehavior::kIsolated : SplitBehavior::kContiguous;
    stages_.push_back(std::move(stage));
  } else {
    return place.Unsupported(type, "Sequence, Split, ByteLevel, Digits");
  }
  return absl::OkStatus();
}

absl::Status PreTokenizer::Run(std::string_view text, Scratch& scratch, EmitWord emit) const {
  if (scratch.stages.size() < stages_.size()) scratch.stages.resize(stages_.size());
  if (text.empty()) return absl::OkStatus();
  return RunFrom(0, text, scratch, emit);
}

absl::Status PreTokenizer::RunFrom(size_t index, std::string_view piece, Scratch& scratch, EmitWord emit) const {
  if (index == stages_.size()) return emit(piece);
  const Stage& stage = stages_[index];
  Scratch::Stage& buffers = scratch.stages[index];
  switch (stage.kind) {
    case StageKind::kPrefixSpace:
      if (piece.front() == ' ') return RunFrom(index + 1, piece, scratch, emit);
      buffers.text.assign(1, ' ');
      buffers.text.append(piece);
      return RunFrom(index + 1, buffers.text, scratch, emit);
    case StageKind::kByteMap:
      buffers.text.clear();
      ByteLevelAlphabet::Get().Encode(piece, buffers.text);
      return RunFrom(index + 1, buffers.text, scratch, emit);
    case StageKind::kSplit: {
      buffers.split.matches.clear();
      COHORT_RETURN_IF_ERROR(stage.pattern->FindAll(piece, buffers.split.matches));
      buffers.pieces.clear();
      SplitAroundMatches(piece.size(), buffers.split.matches, stage.invert, stage.behavior, buffers.split,
                         buffers.pieces);
      // Later stages use their own buffers, so this stage's pieces stay put while they run.
      for (const Span& span : buffers.pieces) {
        if (span.begin == span.end) continue;
        COHORT_RETURN_IF_ERROR(RunFrom(index + 1, piece.substr(span.begin, span.end - span.begin), scratch, emit));
      }
      return absl::OkStatus();
    }
  }
  return absl::OkStatus();
}

}  // namespace cohort::tokenizer_internal
