// GPT-2's byte-level alphabet: each byte stands for one printable code point (bytes_to_unicode),
// so any byte string becomes a string of visible characters and back.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace cohort::tokenizer_internal {

class ByteLevelAlphabet {
 public:
  static const ByteLevelAlphabet& Get();

  // The UTF-8 of the character that stands for `byte`.
  std::string_view CharFor(uint8_t byte) const { return {chars_[byte].data(), lengths_[byte]}; }
  // Appends the alphabet form of every byte of `text`.
  void Encode(std::string_view text, std::string& out) const;
  // The byte that `code_point` stands for, if it is in the alphabet.
  std::optional<uint8_t> ByteFor(char32_t code_point) const;
  // Appends the bytes `token` stands for; a token holding any character outside the alphabet
  // contributes its own UTF-8 instead, as the ByteLevel decoder does.
  void Decode(std::string_view token, std::string& out) const;

 private:
  ByteLevelAlphabet();
  std::array<std::array<char, 2>, 256> chars_;
  std::array<uint8_t, 256> lengths_;
  std::array<int16_t, 324> byte_of_;  // code point -> byte, -1 when not in the alphabet
};

}  // namespace cohort::tokenizer_internal
