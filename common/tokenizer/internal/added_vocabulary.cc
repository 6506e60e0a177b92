#include "common/tokenizer/internal/added_vocabulary.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "common/status.h"
#include "common/tokenizer/internal/utf8.h"

namespace cohort::tokenizer_internal {
namespace {

absl::string_view AsAbsl(std::string_view s) { return absl::string_view(s.data(), s.size()); }

// Start of the whitespace run that ends `text` (text.size() when it does not end in whitespace).
size_t TrailingWhiteSpaceStart(std::string_view text) {
  size_t start = text.size();
  while (start > 0) {
    size_t lead = start - 1;
    while (lead > 0 && (static_cast<uint8_t>(text[lead]) & 0xC0) == 0x80) --lead;
    size_t i = lead;
    if (!IsWhiteSpace(DecodeUtf8(text, i))) break;
    start = lead;
  }
  return start;
}

// Length of the whitespace run that starts `text`.
size_t LeadingWhiteSpaceLength(std::string_view text) {
  size_t i = 0;
  while (i < text.size()) {
    size_t next = i;
    if (!IsWhiteSpace(DecodeUtf8(text, next))) break;
    i = next;
  }
  return i;
}

}  // namespace

void AddedVocabulary::Matcher::Add(std::string pattern, int32_t id) {
  if (pattern.empty()) return;  // would match everywhere; `tokenizers` ends up dropping its empty splits
  if (nodes.empty()) nodes.emplace_back();
  int32_t node = 0;
  for (char c : pattern) {
    const auto byte = static_cast<uint8_t>(c);
    auto& children = nodes[node].children;
    auto it = std::lower_bound(children.begin(), children.end(), std::make_pair(byte, INT32_MIN));
    if (it != children.end() && it->first == byte) {
      node = it->second;
    } else {
      const auto child = static_cast<int32_t>(nodes.size());
      children.insert(it, {byte, child});
      nodes.emplace_back();
      node = child;
    }
  }
  first_bytes[static_cast<uint8_t>(pattern[0])] = true;
  if (nodes[node].pattern >= 0) return;  // a duplicate: the first one added wins, as in aho-corasick
  nodes[node].pattern = static_cast<int32_t>(patterns.size());
  patterns.push_back(std::move(pattern));
  ids.push_back(id);
}

std::optional<std::pair<int32_t, size_t>> AddedVocabulary::Matcher::LongestAt(std::string_view text, size_t pos) const {
  std::optional<std::pair<int32_t, size_t>> best;
  int32_t node = 0;
  for (size_t i = pos; i < text.size(); ++i) {
    const auto& children = nodes[node].children;
    const auto byte = static_cast<uint8_t>(text[i]);
    auto it = std::lower_bound(children.begin(), children.end(), std::make_pair(byte, INT32_MIN));
    if (it == children.end() || it->first != byte) break;
    node = it->second;
    if (nodes[node].pattern >= 0) best = {{nodes[node].pattern, i + 1 - pos}};
  }
  return best;
}

absl::StatusOr<std::unique_ptr<AddedVocabulary>> AddedVocabulary::FromJson(const Json& json, const JsonPlace& place,
                                                                           const BpeModel& model,
                                                                           const Normalizer& normalizer) {
  std::unique_ptr<AddedVocabulary> vocab(new AddedVocabulary());
  COHORT_ASSIGN_OR_RETURN(
      vocab->word_char_, Regex::Compile(R"([\p{Alphabetic}\p{M}\p{Nd}\p{Pc}\p{Join_Control}])", Regex::Syntax::kPcre2));
  std::vector<AddedToken> tokens;
  if (!json.is_null()) {
    if (!json.is_array()) return place.Error("expected an array");
    for (size_t i = 0; i < json.size(); ++i) {
      const JsonPlace token_place = place.Index(i);
      const Json& entry = json[i];
      if (!entry.is_object()) return token_place.Error("expected an object");
      AddedToken token;
      COHORT_ASSIGN_OR_RETURN(token.content, RequiredString(entry, "content", token_place));
      COHORT_ASSIGN_OR_RETURN(token.special, OptionalBool(entry, "special", false, token_place));
      COHORT_ASSIGN_OR_RETURN(token.single_word, OptionalBool(entry, "single_word", false, token_place));
      COHORT_ASSIGN_OR_RETURN(token.lstrip, OptionalBool(entry, "lstrip", false, token_place));
      COHORT_ASSIGN_OR_RETURN(token.rstrip, OptionalBool(entry, "rstrip", false, token_place));
      COHORT_ASSIGN_OR_RETURN(token.normalized, OptionalBool(entry, "normalized", !token.special, token_place));
      tokens.push_back(std::move(token));
    }
  }

  // AddedVocabulary::add_tokens: contents marked special anywhere are special; a token already in
  // the model (or added before) keeps its id, a new one takes the next free id.
  for (const AddedToken& token : tokens) {
    if (token.special && !token.content.empty()) vocab->special_contents_.insert(token.content);
  }
  const auto model_size = static_cast<int64_t>(model.vocab_entries());
  std::optional<int64_t> largest_added;
  for (const AddedToken& token : tokens) {
    if (token.content.empty()) continue;
    int64_t id;
    if (auto existing = vocab->TokenToId(token.content)) {
      id = *existing;
    } else if (auto in_model = model.TokenToId(token.content)) {
      id = *in_model;
    } else if (!largest_added) {
      id = model_size;
    } else {
      id = (*largest_added >= model_size || model_size == 0) ? *largest_added + 1 : model_size;
    }
    if (id > INT32_MAX) return place.Error("added token ids run past 2^31");
    vocab->id_by_content_.insert_or_assign(token.content, static_cast<int32_t>(id));
    largest_added = std::max(largest_added.value_or(id), id);
    // A later entry for the same id replaces the earlier one, flags and all.
    vocab->token_by_id_[static_cast<int32_t>(id)] = Entry{token, token.content};
  }
  for (const auto& [content, id] : vocab->id_by_content_)
    vocab->id_limit_ = std::max<int64_t>(vocab->id_limit_, id + 1);

  // Tokens with normalized=true are matched, and decoded, in their normalized form.
  std::vector<int32_t> ids;
  for (const auto& [id, entry] : vocab->token_by_id_) ids.push_back(id);
  std::sort(ids.begin(), ids.end());
  for (int32_t id : ids) {
    Entry& entry = vocab->token_by_id_[id];
    if (!entry.token.normalized) {
      vocab->matchers_[static_cast<int>(Stage::kRaw)].Add(entry.token.content, id);
      continue;
    }
    if (!normalizer.empty()) COHORT_RETURN_IF_ERROR(normalizer.Apply(entry.token.content, entry.stored));
    vocab->matchers_[static_cast<int>(Stage::kNormalized)].Add(entry.stored, id);
  }
  return vocab;
}

std::optional<int32_t> AddedVocabulary::TokenToId(std::string_view content) const {
  auto it = id_by_content_.find(AsAbsl(content));
  if (it == id_by_content_.end()) return std::nullopt;
  return it->second;
}

const std::string* AddedVocabulary::StoredContent(int32_t id) const {
  auto it = token_by_id_.find(id);
  return it == token_by_id_.end() ? nullptr : &it->second.stored;
}

bool AddedVocabulary::IsSpecialContent(std::string_view content) const {
  return special_contents_.contains(AsAbsl(content));
}

absl::StatusOr<bool> AddedVocabulary::IsWordChar(std::string_view text, size_t pos) const {
  return word_char_->MatchesAt(text, pos);
}

absl::StatusOr<bool> AddedVocabulary::EndsWithWordChar(std::string_view text) const {
  size_t lead = text.size() - 1;
  while (lead > 0 && (static_cast<uint8_t>(text[lead]) & 0xC0) == 0x80) --lead;
  return IsWordChar(text, lead);
}

absl::Status AddedVocabulary::Split(std::string_view text, Stage stage, EmitPiece emit) const {
  const Matcher& matcher = matchers_[static_cast<int>(stage)];
  if (matcher.patterns.empty()) return text.empty() ? absl::OkStatus() : emit(text, -1);
  size_t emitted_to = 0;  // find_matches' start_offset
  size_t pos = 0;
  while (pos < text.size()) {
    if (!matcher.first_bytes[static_cast<uint8_t>(text[pos])]) {
      ++pos;
      continue;
    }
    const auto match = matcher.LongestAt(text, pos);
    if (!match) {
      ++pos;
      continue;
    }
    size_t start = pos, stop = pos + match->second;
    pos = stop;  // the next search starts after the match as found, whatever stripping does
    const int32_t id = matcher.ids[match->first];
    const AddedToken& token = token_by_id_.at(id).token;
    if (token.single_word) {
      bool word_before = false, word_after = false;
      if (start > 0) {
        COHORT_ASSIGN_OR_RETURN(word_before, EndsWithWordChar(text.substr(0, start)));
      }
      if (stop < text.size()) {
        COHORT_ASSIGN_OR_RETURN(word_after, IsWordChar(text, stop));
      }
      if (word_before || word_after) continue;
    }
    if (token.lstrip) start = std::max(TrailingWhiteSpaceStart(text.substr(0, start)), emitted_to);
    if (token.rstrip) stop += LeadingWhiteSpaceLength(text.substr(stop));
    if (emitted_to < start) COHORT_RETURN_IF_ERROR(emit(text.substr(emitted_to, start - emitted_to), -1));
    COHORT_RETURN_IF_ERROR(emit(text.substr(start, stop - start), id));
    emitted_to = stop;
  }
  if (emitted_to < text.size()) COHORT_RETURN_IF_ERROR(emit(text.substr(emitted_to), -1));
  return absl::OkStatus();
}

}  // namespace cohort::tokenizer_internal
