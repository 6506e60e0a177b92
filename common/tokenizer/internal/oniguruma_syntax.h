// `tokenizers` compiles its regexes with Oniguruma (Ruby syntax); Cohort runs them on PCRE2.
// The two agree on everything tokenizer patterns use except a few shorthands, which this
// rewrites into explicit classes with Oniguruma's meaning:
//   \s  U+0009..U+000D, U+0085, Zl, Zp, Zs   (PCRE2 adds U+180E)
//   \w  Alphabetic, M, Nd, Pc, ²³¹¼½¾          (PCRE2: L, N and '_')
//   \h  [0-9a-fA-F]                          (PCRE2: horizontal space)
// and their negations \S, \W, \H outside character classes. Inside a class the positive forms
// are spliced in; a negated \S or \W there keeps PCRE2's meaning (one code point, U+180E, differs
// for \S), and \H there is refused.
#pragma once

#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace cohort::tokenizer_internal {

absl::StatusOr<std::string> OnigurumaToPcre2(std::string_view pattern);

}  // namespace cohort::tokenizer_internal
