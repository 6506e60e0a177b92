#include "common/tokenizer/internal/bpe.h"

#include <queue>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/string_view.h"
#include "common/status.h"
#include "common/tokenizer/internal/utf8.h"

namespace cohort::tokenizer_internal {
namespace {

absl::string_view AsAbsl(std::string_view s) { return absl::string_view(s.data(), s.size()); }

// A merge waiting in the queue: the pair starting at symbol `pos`.
struct QueuedMerge {
  size_t pos;
  uint32_t rank;
  int32_t merged_id;
  // std::priority_queue pops the largest: make that the lowest rank, then the leftmost.
  bool operator<(const QueuedMerge& other) const { return rank != other.rank ? rank > other.rank : pos > other.pos; }
};

}  // namespace

absl::StatusOr<std::unique_ptr<BpeModel>> BpeModel::FromJson(const Json& json, const JsonPlace& place) {
  if (!json.is_object()) return place.Error("expected an object");
  // Files written before `tokenizers` tagged its models carry no "type"; BPE is the one with merges.
  std::string type = "BPE";
  if (json.contains("type")) {
    COHORT_ASSIGN_OR_RETURN(type, TypeOf(json, place));
  } else if (!json.contains("merges")) {
    return place.Error("has neither a \"type\" nor BPE merges");
  }
  if (type != "BPE") return place.Unsupported(type, "BPE");

  std::unique_ptr<BpeModel> model(new BpeModel());
  auto dropout = json.find("dropout");
  if (dropout != json.end() && !dropout->is_null() && !(dropout->is_number() && dropout->get<double>() == 0.0)) {
    return place.Field("dropout").Error("BPE dropout makes encoding random; only null or 0 is supported");
  }
  COHORT_ASSIGN_OR_RETURN(auto prefix, OptionalString(json, "continuing_subword_prefix", place));
  COHORT_ASSIGN_OR_RETURN(auto suffix, OptionalString(json, "end_of_word_suffix", place));
  model->continuing_subword_prefix_ = prefix.value_or("");
  model->end_of_word_suffix_ = suffix.value_or("");
  COHORT_ASSIGN_OR_RETURN(model->fuse_unk_, OptionalBool(json, "fuse_unk", false, place));
  COHORT_ASSIGN_OR_RETURN(model->byte_fallback_, OptionalBool(json, "byte_fallback", false, place));
  COHORT_ASSIGN_OR_RETURN(model->ignore_merges_, OptionalBool(json, "ignore_merges", false, place));

  auto vocab = json.find("vocab");
  if (vocab == json.end() || !vocab->is_object()) return place.Field("vocab").Error("expected an object");
  int64_t largest_id = -1;
  model->vocab_.reserve(vocab->size());
  for (const auto& [token, id] : vocab->items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > INT32_MAX) {
      return place.Field("vocab").Error(absl::StrCat("the id of \"", token, "\" is not an integer in [0, 2^31)"));
    }
    model->vocab_[token] = id.get<int32_t>();
    largest_id = std::max(largest_id, id.get<int64_t>());
  }
  model->tokens_by_id_.resize(static_cast<size_t>(largest_id + 1));
  for (const auto& [token, id] : model->vocab_) model->tokens_by_id_[id] = token;

  COHORT_ASSIGN_OR_RETURN(auto unk, OptionalString(json, "unk_token", place));
  if (unk) {
    auto it = model->vocab_.find(*unk);
    if (it == model->vocab_.end()) {
      return place.Field("unk_token").Error(absl::StrCat("\"", *unk, "\" is not in the vocabulary"));
    }
    model->unk_id_ = it->second;
  }

  COHORT_ASSIGN_OR_RETURN(const Json* merges, RequiredArray(json, "merges", place));
  const JsonPlace merges_place = place.Field("merges");
  const auto id_of = [&](const std::string& token, size_t rank) -> absl::StatusOr<int32_t> {
    auto it = model->vocab_.find(token);
    if (it == model->vocab_.end()) {
      return merges_place.Index(rank).Error(absl::StrCat("\"", token, "\" is not in the vocabulary"));
    }
    return it->second;
  };
  model->merges_.reserve(merges->size());
  for (size_t rank = 0; rank < merges->size(); ++rank) {
    const Json& entry = (*merges)[rank];
    std::string left, right;
    if (entry.is_string()) {
      // The older form: "left right", split on the one space.
      const std::string& line = entry.get_ref<const std::string&>();
      const size_t space = line.find(' ');
      if (space == std::string::npos || line.find(' ', space + 1) != std::string::npos) {
        return merges_place.Index(rank).Error(absl::StrCat("\"", line, "\" is not two tokens separated by a space"));
      }
      left = line.substr(0, space);
      right = line.substr(space + 1);
    } else if (entry.is_array() && entry.size() == 2 && entry[0].is_string() && entry[1].is_string()) {
      left = entry[0].get<std::string>();
      right = entry[1].get<std::string>();
    } else {
      return merges_place.Index(rank).Error("expected \"left right\" or [\"left\", \"right\"]");
    }
    COHORT_ASSIGN_OR_RETURN(const int32_t left_id, id_of(left, rank));
    COHORT_ASSIGN_OR_RETURN(const int32_t right_id, id_of(right, rank));
    // The right half loses its continuing-subword prefix in the merged token.
    std::string merged = left;
    const size_t strip = std::min(model->continuing_subword_prefix_.size(), right.size());
    merged.append(right, strip, std::string::npos);
    COHORT_ASSIGN_OR_RETURN(const int32_t merged_id, id_of(merged, rank));
    // A pair listed twice keeps its last rank, as `tokenizers`' map does.
    model->merges_[PairKey(left_id, right_id)] = Merge{static_cast<uint32_t>(rank), merged_id};
  }
  return model;
}

std::optional<int32_t> BpeModel::TokenToId(std::string_view token) const {
  auto it = vocab_.find(AsAbsl(token));
  if (it == vocab_.end()) return std::nullopt;
  return it->second;
}

const std::string* BpeModel::IdToToken(int32_t id) const {
  if (id < 0 || static_cast<size_t>(id) >= tokens_by_id_.size() || !tokens_by_id_[id]) return nullptr;
  return &*tokens_by_id_[id];
}

const BpeModel::Merge* BpeModel::FindMerge(int32_t left, int32_t right) const {
  auto it = merges_.find(PairKey(left, right));
  return it == merges_.end() ? nullptr : &it->second;
}

void BpeModel::SplitIntoSymbols(std::string_view word, std::vector<Symbol>& symbols) const {
  const auto add = [&](int32_t id, uint32_t bytes) {
    const auto index = static_cast<int32_t>(symbols.size());
    if (index > 0) symbols.back().next = index;
    symbols.push_back(Symbol{id, index - 1, -1, bytes});
  };
  // An unk symbol not added yet (fuse_unk grows it over consecutive unknown characters).
  bool unk_pending = false;
  uint32_t unk_bytes = 0;
  std::string scratch;
  for (size_t i = 0; i < word.size();) {
    const size_t start = i;
    i += Utf8Length(static_cast<uint8_t>(word[i]));
    const auto bytes = static_cast<uint32_t>(i - start);
    std::string_view piece = word.substr(start, bytes);
    const bool decorated =
        (start > 0 && !continuing_subword_prefix_.empty()) || (i == word.size() && !end_of_word_suffix_.empty());
    if (decorated) {
      scratch.assign(start > 0 ? continuing_subword_prefix_ : "");
      scratch.append(piece);
      if (i == word.size()) scratch += end_of_word_suffix_;
      piece = scratch;
    }
    if (auto it = vocab_.find(AsAbsl(piece)); it != vocab_.end()) {
      if (unk_pending) add(*unk_id_, unk_bytes), unk_pending = false;
      add(it->second, bytes);
      continue;
    }
    if (byte_fallback_) {
      std::vector<int32_t> byte_ids;
      for (char c : piece) {
        auto byte_token = vocab_.find(absl::StrFormat("<0x%02X>", static_cast<uint8_t>(c)));
        if (byte_token == vocab_.end()) break;
        byte_ids.push_back(byte_token->second);
      }
      if (byte_ids.size() == piece.size()) {
        for (int32_t id : byte_ids) add(id, 1);
        continue;
      }
    }
    if (!unk_id_) continue;  // no unk_token: `tokenizers` drops the character
    if (unk_pending && fuse_unk_) {
      unk_bytes += bytes;
    } else {
      if (unk_pending) add(*unk_id_, unk_bytes);
      unk_pending = true;
      unk_bytes = bytes;
    }
  }
  if (unk_pending) add(*unk_id_, unk_bytes);
}

void BpeModel::MergeAll(std::vector<Symbol>& symbols) const {
  // Word::merge_all of `tokenizers`, entry for entry: stale queue entries are recognized by the
  // merged id their pair would give now.
  std::priority_queue<QueuedMerge> queue;
  for (size_t i = 0; i + 1 < symbols.size(); ++i) {
    if (const Merge* m = FindMerge(symbols[i].id, symbols[i + 1].id)) queue.push({i, m->rank, m->merged_id});
  }
  while (!queue.empty()) {
    const QueuedMerge top = queue.top();
    queue.pop();
    Symbol& current = symbols[top.pos];
    if (current.bytes == 0 || current.next == -1) continue;
    const Symbol right = symbols[current.next];
    const Merge* now = FindMerge(current.id, right.id);
    if (now == nullptr || now->merged_id != top.merged_id) continue;

    const int32_t right_index = current.next;
    current.id = top.merged_id;
    current.bytes += right.bytes;
    current.next = right.next;
    symbols[right_index].bytes = 0;
    if (right.next >= 0) symbols[right.next].prev = static_cast<int32_t>(top.pos);

    if (current.prev >= 0) {
      if (const Merge* m = FindMerge(symbols[current.prev].id, current.id)) {
        queue.push({static_cast<size_t>(current.prev), m->rank, m->merged_id});
      }
    }
    if (current.next >= 0) {
      if (const Merge* m = FindMerge(current.id, symbols[current.next].id)) {
        queue.push({top.pos, m->rank, m->merged_id});
      }
    }
  }
}

void BpeModel::Tokenize(std::string_view word, std::vector<int32_t>& out) const {
  if (word.empty()) return;
  if (ignore_merges_) {
    if (auto it = vocab_.find(AsAbsl(word)); it != vocab_.end()) {
      out.push_back(it->second);
      return;
    }
  }
  const bool cacheable = word.size() <= kLongestCachedWord;
  if (cacheable && cache_.Lookup(word, out)) return;
  thread_local std::vector<Symbol> symbols;
  symbols.clear();
  SplitIntoSymbols(word, symbols);
  MergeAll(symbols);
  const size_t first = out.size();
  for (const Symbol& s : symbols) {
    if (s.bytes != 0) out.push_back(s.id);
  }
  if (cacheable) cache_.Insert(word, out.data() + first, out.size() - first);
}

}  // namespace cohort::tokenizer_internal
