#include "common/tokenizer/internal/utf8.h"

namespace cohort::tokenizer_internal {

Utf8Sequence NextUtf8Sequence(std::string_view bytes, size_t i) {
  const auto at = [&](size_t k) { return static_cast<uint8_t>(bytes[i + k]); };
  const uint8_t lead = at(0);
  if (lead < 0x80) return {Utf8Kind::kValid, 1};
  // Continuation bytes needed, and the range allowed for the first of them (Unicode table 3-7).
  size_t needed;
  uint8_t low = 0x80, high = 0xBF;
  if (lead >= 0xC2 && lead <= 0xDF) {
    needed = 1;
  } else if (lead == 0xE0) {
    needed = 2, low = 0xA0;  // no overlong 3-byte forms
  } else if ((lead >= 0xE1 && lead <= 0xEC) || lead == 0xEE || lead == 0xEF) {
    needed = 2;
  } else if (lead == 0xED) {
    needed = 2, high = 0x9F;  // no surrogates
  } else if (lead == 0xF0) {
    needed = 3, low = 0x90;  // no overlong 4-byte forms
  } else if (lead >= 0xF1 && lead <= 0xF3) {
    needed = 3;
  } else if (lead == 0xF4) {
    needed = 3, high = 0x8F;  // nothing above U+10FFFF
  } else {
    return {Utf8Kind::kInvalid, 1};  // a continuation byte, C0, C1 or F5..FF
  }
  for (size_t k = 1; k <= needed; ++k) {
    if (i + k >= bytes.size()) return {Utf8Kind::kTruncated, k};
    const uint8_t b = at(k);
    const uint8_t lo = k == 1 ? low : 0x80, hi = k == 1 ? high : 0xBF;
    if (b < lo || b > hi) return {Utf8Kind::kInvalid, k};
  }
  return {Utf8Kind::kValid, needed + 1};
}

size_t FirstInvalidUtf8(std::string_view bytes) {
  size_t i = 0;
  while (i < bytes.size()) {
    if (static_cast<uint8_t>(bytes[i]) < 0x80) {
      ++i;
      continue;
    }
    const Utf8Sequence seq = NextUtf8Sequence(bytes, i);
    if (seq.kind != Utf8Kind::kValid) return i;
    i += seq.length;
  }
  return bytes.size();
}

char32_t DecodeUtf8(std::string_view text, size_t& i) {
  const auto b = [&](size_t k) { return static_cast<char32_t>(static_cast<uint8_t>(text[i + k])); };
  const char32_t lead = b(0);
  char32_t c;
  if (lead < 0x80) {
    c = lead;
    i += 1;
  } else if (lead < 0xE0) {
    c = ((lead & 0x1F) << 6) | (b(1) & 0x3F);
    i += 2;
  } else if (lead < 0xF0) {
    c = ((lead & 0x0F) << 12) | ((b(1) & 0x3F) << 6) | (b(2) & 0x3F);
    i += 3;
  } else {
    c = ((lead & 0x07) << 18) | ((b(1) & 0x3F) << 12) | ((b(2) & 0x3F) << 6) | (b(3) & 0x3F);
    i += 4;
  }
  return c;
}

void AppendUtf8(char32_t c, std::string& out) {
  if (c < 0x80) {
    out.push_back(static_cast<char>(c));
  } else if (c < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (c >> 6)));
    out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else if (c < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (c >> 12)));
    out.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (c >> 18)));
    out.push_back(static_cast<char>(0x80 | ((c >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  }
}

size_t AppendUtf8Lossy(std::string_view bytes, bool final, std::string& out) {
  constexpr std::string_view kReplacement = "\xEF\xBF\xBD";  // U+FFFD
  size_t i = 0, valid_from = 0;
  while (i < bytes.size()) {
    if (static_cast<uint8_t>(bytes[i]) < 0x80) {
      ++i;
      continue;
    }
    const Utf8Sequence seq = NextUtf8Sequence(bytes, i);
    if (seq.kind == Utf8Kind::kValid) {
      i += seq.length;
      continue;
    }
    out.append(bytes.substr(valid_from, i - valid_from));
    if (seq.kind == Utf8Kind::kTruncated && !final) return i;
    out.append(kReplacement);
    i += seq.length;
    valid_from = i;
  }
  out.append(bytes.substr(valid_from));
  return bytes.size();
}

bool IsWhiteSpace(char32_t c) {
  // PropList.txt White_Space (unchanged since Unicode 6.3).
  if (c <= 0x20) return c == 0x20 || (c >= 0x09 && c <= 0x0D);
  if (c < 0x85) return false;
  return c == 0x85 || c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 ||
         c == 0x202F || c == 0x205F || c == 0x3000;
}

}  // namespace cohort::tokenizer_internal
