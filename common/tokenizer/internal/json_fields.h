// Reading tokenizer.json fields with errors that name the file and the field at fault:
// "models/x/tokenizer.json: pre_tokenizer.pretokenizers[1].behavior: expected a string".
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace cohort::tokenizer_internal {

using Json = nlohmann::json;

// Where a JSON value sits: the file, and the path of keys and indices inside it.
class JsonPlace {
 public:
  JsonPlace(std::string file, std::string path) : file_(std::move(file)), path_(std::move(path)) {}
  JsonPlace Field(const std::string& key) const;
  JsonPlace Index(size_t i) const;
  const std::string& file() const { return file_; }
  const std::string& path() const { return path_; }
  // InvalidArgument "<file>: <path>: <message>".
  absl::Status Error(const std::string& message) const;
  // InvalidArgument "<file>: <path> type "X" is not supported (supported: ...)".
  absl::Status Unsupported(const std::string& type, const std::string& supported) const;

 private:
  std::string file_;
  std::string path_;
};

// The "type" string of a component object.
absl::StatusOr<std::string> TypeOf(const Json& object, const JsonPlace& place);
// A string field; missing or null gives nullopt.
absl::StatusOr<std::optional<std::string>> OptionalString(const Json& object, const char* key, const JsonPlace& place);
absl::StatusOr<std::string> RequiredString(const Json& object, const char* key, const JsonPlace& place);
// A boolean field; missing or null gives `fallback`.
absl::StatusOr<bool> OptionalBool(const Json& object, const char* key, bool fallback, const JsonPlace& place);
// An array field (required).
absl::StatusOr<const Json*> RequiredArray(const Json& object, const char* key, const JsonPlace& place);

}  // namespace cohort::tokenizer_internal
