// UTF-8 as Rust's `str` defines it (what `tokenizers` works on): no overlong forms, no
// surrogates, nothing above U+10FFFF.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace cohort::tokenizer_internal {

enum class Utf8Kind { kValid, kInvalid, kTruncated };
struct Utf8Sequence {
  Utf8Kind kind;
  // kValid: bytes of the character. kInvalid: bytes of the maximal ill-formed subpart (one U+FFFD
  // replaces them). kTruncated: bytes present, a valid start cut short by the end of the input.
  size_t length;
};

// The sequence starting at bytes[i] (i < bytes.size()).
Utf8Sequence NextUtf8Sequence(std::string_view bytes, size_t i);

// Offset of the first byte that does not start a complete, valid character; bytes.size() when
// the whole input is valid.
size_t FirstInvalidUtf8(std::string_view bytes);

// Bytes of the character whose first byte is `lead` (valid UTF-8 only).
inline size_t Utf8Length(uint8_t lead) { return lead < 0x80 ? 1 : lead < 0xE0 ? 2 : lead < 0xF0 ? 3 : 4; }

// Decodes the character at text[i] of valid UTF-8 and moves i past it.
char32_t DecodeUtf8(std::string_view text, size_t& i);
void AppendUtf8(char32_t code_point, std::string& out);

// Appends `bytes` as String::from_utf8_lossy does: valid characters as they are, each maximal
// ill-formed subpart as one U+FFFD. With `final` false a truncated sequence at the very end is
// left alone: returns how many bytes were consumed (the rest is at most 3 bytes).
size_t AppendUtf8Lossy(std::string_view bytes, bool final, std::string& out);

// Rust's char::is_whitespace: the Unicode White_Space property.
bool IsWhiteSpace(char32_t c);

}  // namespace cohort::tokenizer_internal
