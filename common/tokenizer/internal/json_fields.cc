#include "common/tokenizer/internal/json_fields.h"

#include "absl/strings/str_cat.h"

namespace cohort::tokenizer_internal {

JsonPlace JsonPlace::Field(const std::string& key) const {
  return JsonPlace(file_, path_.empty() ? key : absl::StrCat(path_, ".", key));
}

JsonPlace JsonPlace::Index(size_t i) const { return JsonPlace(file_, absl::StrCat(path_, "[", i, "]")); }

absl::Status JsonPlace::Error(const std::string& message) const {
  return absl::InvalidArgumentError(absl::StrCat(file_, ": ", path_.empty() ? "" : path_ + ": ", message));
}

absl::Status JsonPlace::Unsupported(const std::string& type, const std::string& supported) const {
  return absl::InvalidArgumentError(
      absl::StrCat(file_, ": ", path_, " type \"", type, "\" is not supported (supported: ", supported, ")"));
}

absl::StatusOr<std::string> TypeOf(const Json& object, const JsonPlace& place) {
  if (!object.is_object()) return place.Error("expected an object");
  auto it = object.find("type");
  if (it == object.end() || !it->is_string()) return place.Error("expected a \"type\" string");
  return it->get<std::string>();
}

absl::StatusOr<std::optional<std::string>> OptionalString(const Json& object, const char* key, const JsonPlace& place) {
  auto it = object.find(key);
  if (it == object.end() || it->is_null()) return std::optional<std::string>();
  if (!it->is_string()) return place.Field(key).Error("expected a string");
  return std::optional<std::string>(it->get<std::string>());
}

absl::StatusOr<std::string> RequiredString(const Json& object, const char* key, const JsonPlace& place) {
  auto it = object.find(key);
  if (it == object.end() || !it->is_string()) return place.Field(key).Error("expected a string");
  return it->get<std::string>();
}

absl::StatusOr<bool> OptionalBool(const Json& object, const char* key, bool fallback, const JsonPlace& place) {
  auto it = object.find(key);
  if (it == object.end() || it->is_null()) return fallback;
  if (!it->is_boolean()) return place.Field(key).Error("expected true or false");
  return it->get<bool>();
}

absl::StatusOr<const Json*> RequiredArray(const Json& object, const char* key, const JsonPlace& place) {
  auto it = object.find(key);
  if (it == object.end() || !it->is_array()) return place.Field(key).Error("expected an array");
  return &*it;
}

}  // namespace cohort::tokenizer_internal
