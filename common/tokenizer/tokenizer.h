// Hugging Face `tokenizer.json` loading, encoding and decoding that give the ids and text the
// `tokenizers` library (0.23) gives, for the byte-level BPE family DeepSeek, Qwen, Llama 3 and
// GPT-2 use.
//
//   COHORT_ASSIGN_OR_RETURN(auto tokenizer, Tokenizer::Load("models/cohort-demo"));
//   COHORT_ASSIGN_OR_RETURN(std::vector<int32_t> ids, tokenizer->Encode("Hello", /*add_special_tokens=*/true));
//   std::string text = tokenizer->Decode(ids, /*skip_special_tokens=*/false);
//
//   IncrementalDecoder stream(*tokenizer, /*skip_special_tokens=*/true);
//   for (int32_t id : generated) send(stream.Push(id));   // whole UTF-8 characters only
//   send(stream.Flush());
//
// Supported parts (anything else fails Load with InvalidArgument naming the type and the file):
//   normalizer      null, Sequence, NFC, NFD, NFKC, NFKD, Prepend, Replace
//   pre_tokenizer   null, Sequence, Split, ByteLevel, Digits
//   model           BPE (dropout must be null or 0)
//   decoder         null, ByteLevel, Sequence of those
//   post_processor  null, TemplateProcessing, ByteLevel, Sequence of those
// Regexes are written in Oniguruma's syntax, as `tokenizers` reads them; they run on PCRE2 with
// `\s`, `\w`, `\h` and their negations given Oniguruma's meaning. `truncation` and `padding` are
// ignored, as transformers does when it does not ask for them.
//
// Thread safety: a loaded Tokenizer is immutable; Encode and Decode may be called from any number
// of threads at once. An IncrementalDecoder belongs to one stream (one thread at a time).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace cohort {

namespace tokenizer_internal {
class Pipeline;
}  // namespace tokenizer_internal

class Tokenizer {
 public:
  // `path`: a tokenizer.json file, or a folder holding tokenizer.json. tokenizer_config.json (and
  // chat_template.jinja) are read from the same folder when present.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Load(const std::string& path);
  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // Added tokens (special or not) written in the text are matched first, as `tokenizers` does by
  // default. add_special_tokens applies the post-processor (e.g. a template that prepends BOS).
  // Invalid UTF-8 gives InvalidArgument naming the byte offset.
  absl::StatusOr<std::vector<int32_t>> Encode(const std::string& text, bool add_special_tokens) const;
  // Ids the vocabulary does not hold are skipped, as `tokenizers` does; bytes that do not form
  // UTF-8 come out as U+FFFD.
  std::string Decode(std::span<const int32_t> ids, bool skip_special_tokens) const;

  // One past the largest id of the model's vocabulary and the added tokens.
  int64_t vocab_size() const;
  std::optional<int32_t> TokenToId(const std::string& token) const;
  // Whether Decode with skip_special_tokens leaves this id out (a special added token).
  bool IsSpecial(int32_t id) const;
  // From tokenizer_config.json's bos_token / eos_token (a string or {"content": ...}).
  std::optional<int32_t> bos_id() const { return bos_id_; }
  std::optional<int32_t> eos_id() const { return eos_id_; }
  // tokenizer_config.json's "chat_template" (or chat_template.jinja); empty when there is none.
  const std::string& chat_template() const { return chat_template_; }

 private:
  friend class IncrementalDecoder;
  explicit Tokenizer(std::unique_ptr<const tokenizer_internal::Pipeline> pipeline);

  std::unique_ptr<const tokenizer_internal::Pipeline> pipeline_;
  std::optional<int32_t> bos_id_;
  std::optional<int32_t> eos_id_;
  std::string chat_template_;
};

// Streaming detokenization: Push returns only whole UTF-8 characters; the concatenation of
// everything Push and Flush return equals Decode of all the ids pushed.
class IncrementalDecoder {
 public:
  // `tokenizer` must outlive the decoder.
  IncrementalDecoder(const Tokenizer& tokenizer, bool skip_special_tokens);
  std::string Push(int32_t id);
  // The rest: an incomplete UTF-8 tail comes out as U+FFFD, as Decode would give it. The decoder
  // starts afresh afterwards.
  std::string Flush();

 private:
  const tokenizer_internal::Pipeline& pipeline_;
  bool skip_special_tokens_;
  bool first_token_ = true;  // decoders that join tokens with a separator put none before the first
  std::string pending_;      // bytes of a UTF-8 character not complete yet
};

}  // namespace cohort
