#include "worker/model/checkpoint.h"

#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status.h"
#include "nlohmann/json.hpp"

namespace cohort {

absl::StatusOr<std::unique_ptr<Checkpoint>> Checkpoint::Open(const std::string& dir) {
  namespace fs = std::filesystem;
  auto checkpoint = std::unique_ptr<Checkpoint>(new Checkpoint(dir));
  const fs::path index_path = fs::path(dir) / "model.safetensors.index.json";
  const fs::path single_path = fs::path(dir) / "model.safetensors";

  if (fs::exists(index_path)) {
    std::ifstream in(index_path);
    std::stringstream text;
    text << in.rdbuf();
    auto index = nlohmann::json::parse(text.str(), nullptr, /*allow_exceptions=*/false);
    if (index.is_discarded() || !index.is_object() || !index.contains("weight_map") ||
        !index["weight_map"].is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(index_path.string(), ": not a safetensors index (no 'weight_map' object)"));
    }
    std::map<std::string, SafetensorsFile*> opened;
    for (auto& [name, file_json] : index["weight_map"].items()) {
      if (!file_json.is_string()) {
        return absl::InvalidArgumentError(absl::StrCat(index_path.string(), ": weight_map['", name, "'] is not a file name"));
      }
      const std::string file_name = file_json.get<std::string>();
      if (file_name.find('/') != std::string::npos) {
        return absl::InvalidArgumentError(
            absl::StrCat(index_path.string(), ": weight_map['", name, "'] names '", file_name, "' outside the folder"));
      }
      auto it = opened.find(file_name);
      if (it == opened.end()) {
        COHORT_ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open((fs::path(dir) / file_name).string()));
        it = opened.emplace(file_name, file.get()).first;
        checkpoint->files_.push_back(std::move(file));
      }
      const TensorView* view = it->second->Find(name);
      if (view == nullptr) {
        return absl::InvalidArgumentError(absl::StrCat(it->second->path(), ": has no tensor '", name, "', which ",
                                                       index_path.string(), " places there"));
      }
      checkpoint->tensors_[name] = view;
    }
  } else if (fs::exists(single_path)) {
    COHORT_ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open(single_path.string()));
    for (const auto& [name, view] : file->tensors()) checkpoint->tensors_[name] = &view;
    checkpoint->files_.push_back(std::move(file));
  } else {
    return absl::NotFoundError(absl::StrCat(dir, ": no model.safetensors or model.safetensors.index.json"));
  }
  return checkpoint;
}

absl::StatusOr<const TensorView*> Checkpoint::Get(const std::string& name, const std::vector<int64_t>& shape) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) {
    return absl::NotFoundError(absl::StrCat(dir_, ": missing tensor '", name, "'"));
  }
  const TensorView* view = it->second;
  if (view->shape != shape) {
    return absl::InvalidArgumentError(absl::StrCat(*view->file, ": tensor '", name, "' has shape [",
                                                   absl::StrJoin(view->shape, ", "), "], expected [",
                                                   absl::StrJoin(shape, ", "), "] from config.json"));
  }
  if (!IsFloatWeightType(view->dtype)) {
    return absl::InvalidArgumentError(absl::StrCat(*view->file, ": tensor '", name, "' has dtype ",
                                                   DTypeName(view->dtype), "; expected BF16, F16 or F32"));
  }
  return view;
}

absl::StatusOr<std::vector<float>> Checkpoint::ReadFloat32(const std::string& name,
                                                           const std::vector<int64_t>& shape) const {
  COHORT_ASSIGN_OR_RETURN(const TensorView* view, Get(name, shape));
  std::vector<float> out(view->num_elements());
  ConvertToFloat32(view->dtype, view->data, out);
  return out;
}

}  // namespace cohort
