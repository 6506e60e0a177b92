#include "common/tokenizer/tokenizer.h"

#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "common/tokenizer/internal/json_fields.h"
#include "common/tokenizer/internal/pipeline.h"

namespace cohort {
namespace {

using tokenizer_internal::Json;
using tokenizer_internal::Pipeline;

absl::StatusOr<std::string> ReadWholeFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open for reading"));
  std::ostringstream contents;
  contents << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat(path, ": read failed"));
  return contents.str();
}

absl::StatusOr<Json> ReadJsonFile(const std::string& path) {
  COHORT_ASSIGN_OR_RETURN(const std::string text, ReadWholeFile(path));
  try {
    return Json::parse(text);
  } catch (const Json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not valid JSON: ", e.what()));
  }
}

// tokenizer_config.json writes a token as "text" or as an AddedToken {"content": "text", ...}.
absl::StatusOr<std::optional<std::string>> ConfigToken(const Json& config, const char* key, const std::string& file) {
  auto it = config.find(key);
  if (it == config.end() || it->is_null()) return std::optional<std::string>();
  if (it->is_string()) return std::optional<std::string>(it->get<std::string>());
  if (it->is_object() && it->contains("content") && (*it)["content"].is_string()) {
    return std::optional<std::string>((*it)["content"].get<std::string>());
  }
  return absl::InvalidArgumentError(absl::StrCat(file, ": ", key, ": expected a string or {\"content\": ...}"));
}

// "chat_template" is a string, or a list of {"name", "template"} of which "default" is the one.
absl::StatusOr<std::string> ConfigChatTemplate(const Json& config, const std::string& file) {
  auto it = config.find("chat_template");
  if (it == config.end() || it->is_null()) return std::string();
  if (it->is_string()) return it->get<std::string>();
  if (it->is_array()) {
    for (const Json& entry : *it) {
      if (entry.is_object() && entry.value("name", "") == "default" && entry.contains("template") &&
          entry["template"].is_string()) {
        return entry["template"].get<std::string>();
      }
    }
    return std::string();
  }
  return absl::InvalidArgumentError(absl::StrCat(file, ": chat_template: expected a string or a list of templates"));
}

}  // namespace

Tokenizer::Tokenizer(std::unique_ptr<const Pipeline> pipeline) : pipeline_(std::move(pipeline)) {}
Tokenizer::~Tokenizer() = default;

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::Load(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code error;
  const bool is_dir = fs::is_directory(path, error);
  const std::string tokenizer_file = is_dir ? (fs::path(path) / "tokenizer.json").string() : path;
  const fs::path folder = is_dir ? fs::path(path) : fs::path(path).parent_path();
  if (!fs::exists(tokenizer_file, error)) {
    return absl::NotFoundError(absl::StrCat(tokenizer_file, ": no such file (pass a tokenizer.json or its folder)"));
  }
  COHORT_ASSIGN_OR_RETURN(const Json json, ReadJsonFile(tokenizer_file));
  COHORT_ASSIGN_OR_RETURN(std::unique_ptr<Pipeline> pipeline, Pipeline::FromJson(json, tokenizer_file));
  std::unique_ptr<Tokenizer> tokenizer(new Tokenizer(std::move(pipeline)));

  const std::string config_file = (folder / "tokenizer_config.json").string();
  if (fs::exists(config_file, error)) {
    COHORT_ASSIGN_OR_RETURN(const Json config, ReadJsonFile(config_file));
    if (!config.is_object()) return absl::InvalidArgumentError(absl::StrCat(config_file, ": expected a JSON object"));
    for (auto [key, id] : {std::pair{"bos_token", &tokenizer->bos_id_}, std::pair{"eos_token", &tokenizer->eos_id_}}) {
      COHORT_ASSIGN_OR_RETURN(const std::optional<std::string> token, ConfigToken(config, key, config_file));
      if (!token) continue;
      *id = tokenizer->TokenToId(*token);
      if (!*id) {
        return absl::InvalidArgumentError(
            absl::StrCat(config_file, ": ", key, " \"", *token, "\" is not in the vocabulary of ", tokenizer_file));
      }
    }
    COHORT_ASSIGN_OR_RETURN(tokenizer->chat_template_, ConfigChatTemplate(config, config_file));
  }
  const std::string jinja_file = (folder / "chat_template.jinja").string();
  if (tokenizer->chat_template_.empty() && fs::exists(jinja_file, error)) {
    COHORT_ASSIGN_OR_RETURN(tokenizer->chat_template_, ReadWholeFile(jinja_file));
  }
  return tokenizer;
}

absl::StatusOr<std::vector<int32_t>> Tokenizer::Encode(const std::string& text, bool add_special_tokens) const {
  return pipeline_->Encode(text, add_special_tokens);
}

std::string Tokenizer::Decode(std::span<const int32_t> ids, bool skip_special_tokens) const {
  return pipeline_->Decode(ids, skip_special_tokens);
}

int64_t Tokenizer::vocab_size() const { return pipeline_->id_limit(); }

std::optional<int32_t> Tokenizer::TokenToId(const std::string& token) const { return pipeline_->TokenToId(token); }

bool Tokenizer::IsSpecial(int32_t id) const { return pipeline_->IsSpecial(id); }

}  // namespace cohort
