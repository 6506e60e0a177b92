#include "common/tokenizer/internal/pipeline.h"
#include "common/tokenizer/internal/utf8.h"
#include "common/tokenizer/tokenizer.h"

namespace cohort {

IncrementalDecoder::IncrementalDecoder(const Tokenizer& tokenizer, bool skip_special_tokens)
    : pipeline_(*tokenizer.pipeline_), skip_special_tokens_(skip_special_tokens) {}

std::string IncrementalDecoder::Push(int32_t id) {
  std::string_view bytes;
  if (!pipeline_.TokenBytes(id, skip_special_tokens_, bytes)) return {};
  if (!first_token_) pending_.append(pipeline_.separator());
  first_token_ = false;
  pending_.append(bytes);
  // Everything up to a trailing, still completable sequence is final: no later byte can change
  // how from_utf8_lossy reads it.
  std::string text;
  const size_t consumed = tokenizer_internal::AppendUtf8Lossy(pending_, /*final=*/false, text);
  pending_.erase(0, consumed);
  return text;
}

std::string IncrementalDecoder::Flush() {
  std::string text;
  tokenizer_internal::AppendUtf8Lossy(pending_, /*final=*/true, text);
  pending_.clear();
  first_token_ = true;
  return text;
}

}  // namespace cohort
