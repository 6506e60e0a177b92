#include "common/tokenizer/internal/byte_level.h"

#include "common/tokenizer/internal/utf8.h"

namespace cohort::tokenizer_internal {

const ByteLevelAlphabet& ByteLevelAlphabet::Get() {
  static const ByteLevelAlphabet alphabet;
  return alphabet;
}

ByteLevelAlphabet::ByteLevelAlphabet() {
  byte_of_.fill(-1);
  // Printable Latin-1 bytes stand for themselves; the others, in order, for U+0100 onwards.
  const auto printable = [](int b) { return (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE; };
  char32_t next = 256;
  for (int b = 0; b < 256; ++b) {
    const char32_t c = printable(b) ? static_cast<char32_t>(b) : next++;
    std::string utf8;
    AppendUtf8(c, utf8);
    lengths_[b] = static_cast<uint8_t>(utf8.size());
    for (size_t k = 0; k < utf8.size(); ++k) chars_[b][k] = utf8[k];
    byte_of_[c] = static_cast<int16_t>(b);
  }
}

void ByteLevelAlphabet::Encode(std::string_view text, std::string& out) const {
  // Written in place: appending one or two bytes at a time costs a call per byte.
  const size_t start = out.size();
  out.resize(start + 2 * text.size());
  char* p = out.data() + start;
  for (char c : text) {
    const auto b = static_cast<uint8_t>(c);
    p[0] = chars_[b][0];
    p[1] = chars_[b][1];
    p += lengths_[b];
  }
  out.resize(static_cast<size_t>(p - out.data()));
}

std::optional<uint8_t> ByteLevelAlphabet::ByteFor(char32_t code_point) const {
  if (code_point >= byte_of_.size() || byte_of_[code_point] < 0) return std::nullopt;
  return static_cast<uint8_t>(byte_of_[code_point]);
}

void ByteLevelAlphabet::Decode(std::string_view token, std::string& out) const {
  const size_t start = out.size();
  for (size_t i = 0; i < token.size();) {
    const std::optional<uint8_t> b = ByteFor(DecodeUtf8(token, i));
    if (!b) {
      out.resize(start);
      out.append(token);
      return;
    }
    out.push_back(static_cast<char>(*b));
  }
}

}  // namespace cohort::tokenizer_internal
