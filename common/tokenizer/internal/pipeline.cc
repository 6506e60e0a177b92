#include "common/tokenizer/internal/pipeline.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status.h"
#include "common/tokenizer/internal/utf8.h"

namespace cohort::tokenizer_internal {

absl::StatusOr<std::unique_ptr<Pipeline>> Pipeline::FromJson(const Json& json, const std::string& file) {
  const JsonPlace root(file, "");
  if (!json.is_object()) return root.Error("expected a JSON object");
  const auto field = [&](const char* key) -> const Json& {
    static const Json kNull;
    auto it = json.find(key);
    return it == json.end() ? kNull : *it;
  };
  std::unique_ptr<Pipeline> pipeline(new Pipeline());
  COHORT_ASSIGN_OR_RETURN(pipeline->normalizer_, Normalizer::FromJson(field("normalizer"), root.Field("normalizer")));
  COHORT_ASSIGN_OR_RETURN(pipeline->pre_tokenizer_,
                          PreTokenizer::FromJson(field("pre_tokenizer"), root.Field("pre_tokenizer")));
  if (!json.contains("model")) return root.Error("has no \"model\"");
  COHORT_ASSIGN_OR_RETURN(pipeline->model_, BpeModel::FromJson(field("model"), root.Field("model")));
  COHORT_ASSIGN_OR_RETURN(pipeline->decoder_, Decoder::FromJson(field("decoder"), root.Field("decoder")));
  COHORT_ASSIGN_OR_RETURN(pipeline->post_processor_,
                          PostProcessor::FromJson(field("post_processor"), root.Field("post_processor")));
  COHORT_ASSIGN_OR_RETURN(pipeline->added_, AddedVocabulary::FromJson(field("added_tokens"), root.Field("added_tokens"),
                                                                      *pipeline->model_, pipeline->normalizer_));

  // Every id's decoded bytes, computed once: added tokens first, as Tokenizer::decode looks them up.
  const int64_t limit = std::max(pipeline->model_->id_limit(), pipeline->added_->id_limit());
  pipeline->decoded_.resize(static_cast<size_t>(limit));
  for (int64_t id = 0; id < limit; ++id) {
    const auto id32 = static_cast<int32_t>(id);
    const std::string* token = pipeline->added_->StoredContent(id32);
    if (token == nullptr) token = pipeline->model_->IdToToken(id32);
    if (token == nullptr) continue;
    DecodedToken& decoded = pipeline->decoded_[id];
    decoded.exists = true;
    decoded.special = pipeline->added_->IsSpecialContent(*token);
    pipeline->decoder_.AppendToken(*token, decoded.bytes);
  }
  return pipeline;
}

absl::Status Pipeline::EncodeText(std::string_view text, std::vector<int32_t>& ids) const {
  PreTokenizer::Scratch scratch;
  std::string normalized;
  const auto tokenize_word = [&](std::string_view word) {
    model_->Tokenize(word, ids);
    return absl::OkStatus();
  };
  const auto pre_tokenize = [&](std::string_view piece, int32_t token_id) {
    if (token_id >= 0) {
      ids.push_back(token_id);
      return absl::OkStatus();
    }
    return pre_tokenizer_.Run(piece, scratch, tokenize_word);
  };
  return added_->Split(text, AddedVocabulary::Stage::kRaw, [&](std::string_view piece, int32_t token_id) {
    if (token_id >= 0) {
      ids.push_back(token_id);
      return absl::OkStatus();
    }
    std::string_view normal_form = piece;
    if (!normalizer_.empty()) {
      COHORT_RETURN_IF_ERROR(normalizer_.Apply(piece, normalized));
      normal_form = normalized;
    }
    return added_->Split(normal_form, AddedVocabulary::Stage::kNormalized, pre_tokenize);
  });
}

absl::StatusOr<std::vector<int32_t>> Pipeline::Encode(std::string_view text, bool add_special_tokens) const {
  if (const size_t bad = FirstInvalidUtf8(text); bad != text.size()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("text is not valid UTF-8: byte 0x%02X at offset %d does not start a complete, valid character",
                        static_cast<uint8_t>(text[bad]), bad));
  }
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 4);
  COHORT_RETURN_IF_ERROR(EncodeText(text, ids));
  post_processor_.Apply(ids, add_special_tokens);
  return ids;
}

bool Pipeline::TokenBytes(int32_t id, bool skip_special_tokens, std::string_view& bytes) const {
  if (id < 0 || static_cast<size_t>(id) >= decoded_.size()) return false;
  const DecodedToken& token = decoded_[id];
  if (!token.exists || (skip_special_tokens && token.special)) return false;
  bytes = token.bytes;
  return true;
}

std::string Pipeline::Decode(std::span<const int32_t> ids, bool skip_special_tokens) const {
  std::string bytes;
  bool first = true;
  for (int32_t id : ids) {
    std::string_view token;
    if (!TokenBytes(id, skip_special_tokens, token)) continue;
    if (!first) bytes.append(separator());
    first = false;
    bytes.append(token);
  }
  std::string text;
  text.reserve(bytes.size());
  AppendUtf8Lossy(bytes, /*final=*/true, text);
  return text;
}

std::optional<int32_t> Pipeline::TokenToId(std::string_view token) const {
  if (auto id = added_->TokenToId(token)) return id;
  return model_->TokenToId(token);
}

bool Pipeline::IsSpecial(int32_t id) const {
  return id >= 0 && static_cast<size_t>(id) < decoded_.size() && decoded_[id].special;
}

}  // namespace cohort::tokenizer_internal
