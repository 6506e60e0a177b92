#include "common/tokenizer/internal/oniguruma_syntax.h"

#include "absl/strings/str_cat.h"

namespace cohort::tokenizer_internal {
namespace {

constexpr const char* kSpaceItems = "\\t-\\r\\x{85}\\p{Zl}\\p{Zp}\\p{Zs}";
// Oniguruma also counts the Latin-1 superscripts and fractions as word characters.
constexpr const char* kWordItems = "\\p{Alphabetic}\\p{M}\\p{Nd}\\p{Pc}\\x{B2}\\x{B3}\\x{B9}\\x{BC}-\\x{BE}";
constexpr const char* kHexItems = "0-9a-fA-F";

const char* ClassItems(char shorthand) {
  switch (shorthand) {
    case 's':
    case 'S':
      return kSpaceItems;
    case 'w':
    case 'W':
      return kWordItems;
    case 'h':
    case 'H':
      return kHexItems;
    default:
      return nullptr;
  }
}

}  // namespace

absl::StatusOr<std::string> OnigurumaToPcre2(std::string_view pattern) {
  std::string out;
  out.reserve(pattern.size() + 32);
  bool in_class = false;
  size_t class_start = 0;  // offset in `out` just past "[" or "[^", to tell a leading literal ']'
  for (size_t i = 0; i < pattern.size(); ++i) {
    const char c = pattern[i];
    if (c == '\\' && i + 1 < pattern.size()) {
      const char next = pattern[++i];
      const char* items = ClassItems(next);
      const bool negated = next == 'S' || next == 'W' || next == 'H';
      if (items == nullptr) {
        out += c;
        out += next;
      } else if (!in_class) {
        absl::StrAppend(&out, negated ? "[^" : "[", items, "]");
      } else if (!negated) {
        out += items;
      } else if (next == 'H') {
        return absl::InvalidArgumentError(
            absl::StrCat("\\H inside a character class (at offset ", i - 1, ") is not supported"));
      } else {
        out += c;
        out += next;
      }
      continue;
    }
    if (!in_class && c == '[') {
      in_class = true;
      out += c;
      if (i + 1 < pattern.size() && pattern[i + 1] == '^') out += pattern[++i];
      class_start = out.size();
      continue;
    }
    if (in_class && c == '[' && i + 1 < pattern.size() && pattern[i + 1] == ':') {
      // A POSIX bracket such as [:alpha:]: copied through whole.
      const size_t end = pattern.find(":]", i + 2);
      if (end != std::string_view::npos) {
        out.append(pattern.substr(i, end + 2 - i));
        i = end + 1;
        continue;
      }
    }
    if (in_class && c == ']' && out.size() != class_start) in_class = false;
    out += c;
  }
  return out;
}

}  // namespace cohort::tokenizer_internal
