#include "common/tokenizer/internal/regex.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "common/tokenizer/internal/oniguruma_syntax.h"
#include "common/tokenizer/internal/utf8.h"

namespace cohort::tokenizer_internal {
namespace {

std::string Pcre2Message(int code) {
  PCRE2_UCHAR buffer[256];
  pcre2_get_error_message(code, buffer, sizeof(buffer));
  return reinterpret_cast<const char*>(buffer);
}

// Per-thread match state: one ovector pair (only the whole match is read) and a JIT stack
// larger than PCRE2's 32 KiB default, so patterns with lookarounds survive long inputs.
class MatchScratch {
 public:
  MatchScratch()
      : data_(pcre2_match_data_create(1, nullptr)),
        context_(pcre2_match_context_create(nullptr)),
        jit_stack_(pcre2_jit_stack_create(64 * 1024, 8 * 1024 * 1024, nullptr)) {
    COHORT_CHECK(data_ != nullptr && context_ != nullptr, "PCRE2 could not allocate match data");
    if (jit_stack_ != nullptr) pcre2_jit_stack_assign(context_, nullptr, jit_stack_);
  }
  ~MatchScratch() {
    pcre2_jit_stack_free(jit_stack_);
    pcre2_match_context_free(context_);
    pcre2_match_data_free(data_);
  }
  pcre2_match_data* data() { return data_; }
  pcre2_match_context* context() { return context_; }

  static MatchScratch& ForThisThread() {
    thread_local MatchScratch scratch;
    return scratch;
  }

 private:
  pcre2_match_data* data_;
  pcre2_match_context* context_;
  pcre2_jit_stack* jit_stack_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Regex>> Regex::Compile(std::string_view pattern, Syntax syntax) {
  std::string translated(pattern);
  // Oniguruma's ^ and $ are line anchors; PCRE2's are with MULTILINE.
  uint32_t options = PCRE2_UTF | PCRE2_UCP | PCRE2_NO_UTF_CHECK;
  if (syntax == Syntax::kOniguruma) {
    COHORT_ASSIGN_OR_RETURN(translated, OnigurumaToPcre2(pattern));
    options |= PCRE2_MULTILINE;
  } else if (syntax == Syntax::kLiteral) {
    options = PCRE2_UTF | PCRE2_LITERAL;
  }
  if (FirstInvalidUtf8(pattern) != pattern.size()) {
    return absl::InvalidArgumentError("pattern is not valid UTF-8");
  }
  int error = 0;
  PCRE2_SIZE error_offset = 0;
  pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(translated.data()), translated.size(), options, &error,
                                   &error_offset, nullptr);
  if (code == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("invalid regex /", std::string(pattern), "/: ", Pcre2Message(error),
                                                   " (offset ", error_offset, " of the PCRE2 form /", translated,
                                                   "/)"));
  }
  const bool jit = pcre2_jit_compile(code, PCRE2_JIT_COMPLETE) == 0;
  return std::unique_ptr<Regex>(new Regex(std::string(pattern), code, jit));
}

Regex::~Regex() { pcre2_code_free(static_cast<pcre2_code*>(code_)); }

absl::StatusOr<bool> Regex::Search(std::string_view subject, size_t offset, bool anchored, Span& span) const {
  MatchScratch& scratch = MatchScratch::ForThisThread();
  auto* code = static_cast<pcre2_code*>(code_);
  const auto* text = reinterpret_cast<PCRE2_SPTR>(subject.data());
  const uint32_t options = anchored ? PCRE2_ANCHORED : 0;
  // An anchored search cannot use the JIT code compiled for unanchored ones.
  const int rc = jit_ && !anchored
                     ? pcre2_jit_match(code, text, subject.size(), offset, options, scratch.data(), scratch.context())
                     : pcre2_match(code, text, subject.size(), offset, options | PCRE2_NO_UTF_CHECK, scratch.data(),
                                   scratch.context());
  if (rc == PCRE2_ERROR_NOMATCH) return false;
  if (rc < 0) {
    return absl::ResourceExhaustedError(
        absl::StrCat("regex /", pattern_, "/ gave up on a ", subject.size(), "-byte piece: ", Pcre2Message(rc)));
  }
  // rc == 0 means the ovector holds fewer pairs than the pattern has groups; the whole match is
  // there all the same.
  const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(scratch.data());
  span = {ovector[0], ovector[1]};
  return true;
}

absl::Status Regex::FindAll(std::string_view subject, std::vector<Span>& matches) const {
  size_t search_from = 0;
  bool have_last = false;
  size_t last_match_end = 0;
  Span span;
  while (search_from <= subject.size()) {
    COHORT_ASSIGN_OR_RETURN(const bool found, Search(subject, search_from, /*anchored=*/false, span));
    if (!found) break;
    if (span.begin == span.end && have_last && last_match_end == span.end) {
      search_from += search_from < subject.size() ? Utf8Length(static_cast<uint8_t>(subject[search_from])) : 1;
      continue;
    }
    search_from = span.end;
    have_last = true;
    last_match_end = span.end;
    matches.push_back(span);
  }
  return absl::OkStatus();
}

absl::StatusOr<bool> Regex::MatchesAt(std::string_view subject, size_t offset) const {
  Span span;
  return Search(subject, offset, /*anchored=*/true, span);
}

}  // namespace cohort::tokenizer_internal
