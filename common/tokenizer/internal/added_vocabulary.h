// tokenizer.json "added_tokens": tokens matched in the text before any other processing, ids
// assigned the way `tokenizers` assigns them on load (the file's "id" fields are not read: a
// token already in the model keeps the model's id, a new one gets the next free id; a later
// entry for the same content replaces the earlier one).
//
// Matching follows AddedVocabulary::find_matches: leftmost-longest over the raw text for tokens
// with normalized=false, then over each normalized remainder for tokens with normalized=true;
// single_word, lstrip and rstrip as `tokenizers` applies them. As in `tokenizers` 0.23, a token
// with normalized=true is stored, matched and decoded in its normalized form, while "special"
// is judged on the original content (so such a token is not skipped when the normalizer
// changes it).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "common/tokenizer/internal/bpe.h"
#include "common/tokenizer/internal/json_fields.h"
#include "common/tokenizer/internal/normalizer.h"
#include "common/tokenizer/internal/regex.h"

namespace cohort::tokenizer_internal {

struct AddedToken {
  std::string content;
  bool single_word = false;
  bool lstrip = false;
  bool rstrip = false;
  bool normalized = true;
  bool special = false;
  bool operator==(const AddedToken&) const = default;
};

class AddedVocabulary {
 public:
  // Which of the two matchers to run: tokens matched on the raw text, or on normalized text.
  enum class Stage { kRaw, kNormalized };
  // A piece of text between tokens (token_id < 0), or a matched token.
  using EmitPiece = absl::FunctionRef<absl::Status(std::string_view text, int32_t token_id)>;

  // `json` is the "added_tokens" array (null or missing: none).
  static absl::StatusOr<std::unique_ptr<AddedVocabulary>> FromJson(const Json& json, const JsonPlace& place,
                                                                   const BpeModel& model, const Normalizer& normalizer);

  // Cuts `text` at the tokens of `stage`; empty pieces are not emitted.
  absl::Status Split(std::string_view text, Stage stage, EmitPiece emit) const;
  bool HasTokens(Stage stage) const { return !matchers_[static_cast<int>(stage)].patterns.empty(); }

  std::optional<int32_t> TokenToId(std::string_view content) const;
  // The token string of this id (normalized when the token is), or nullptr.
  const std::string* StoredContent(int32_t id) const;
  bool IsSpecialContent(std::string_view content) const;
  // One past the largest added id (0 when there are none).
  int64_t id_limit() const { return id_limit_; }

 private:
  // A byte trie over token contents for leftmost-longest matching.
  struct Matcher {
    struct Node {
      std::vector<std::pair<uint8_t, int32_t>> children;  // (byte, node), sorted by byte
      int32_t pattern = -1;                               // pattern ending here
    };
    std::vector<Node> nodes;
    std::vector<int32_t> ids;  // token id of each pattern
    std::vector<std::string> patterns;
    bool first_bytes[256] = {};

    void Add(std::string pattern, int32_t id);
    // The longest pattern starting at text[pos]: (pattern, length).
    std::optional<std::pair<int32_t, size_t>> LongestAt(std::string_view text, size_t pos) const;
  };

  struct Entry {
    AddedToken token;
    std::string stored;  // the content, normalized when token.normalized
  };

  AddedVocabulary() = default;
  absl::StatusOr<bool> IsWordChar(std::string_view text, size_t pos) const;
  absl::StatusOr<bool> EndsWithWordChar(std::string_view text) const;

  absl::flat_hash_map<std::string, int32_t> id_by_content_;
  absl::flat_hash_map<int32_t, Entry> token_by_id_;
  absl::flat_hash_set<std::string> special_contents_;
  Matcher matchers_[2];
  int64_t id_limit_ = 0;
  // Rust regex's \w, for single_word tokens.
  std::unique_ptr<Regex> word_char_;
};

}  // namespace cohort::tokenizer_internal
