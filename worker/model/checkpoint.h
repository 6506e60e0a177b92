// A Hugging Face checkpoint folder: `model.safetensors`, or shards listed by
// `model.safetensors.index.json`. Every file is memory-mapped and validated when opened; tensors
// are fetched by their published names with the shape the model expects.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/safetensors.h"

namespace cohort {

class Checkpoint {
 public:
  static absl::StatusOr<std::unique_ptr<Checkpoint>> Open(const std::string& dir);

  bool Has(const std::string& name) const { return tensors_.count(name) != 0; }
  // The tensor `name`, which must have exactly `shape` and a float type (F32, F16 or BF16).
  absl::StatusOr<const TensorView*> Get(const std::string& name, const std::vector<int64_t>& shape) const;
  // Get(), then upcast to float32.
  absl::StatusOr<std::vector<float>> ReadFloat32(const std::string& name, const std::vector<int64_t>& shape) const;
  const std::map<std::string, const TensorView*>& tensors() const { return tensors_; }
  const std::string& dir() const { return dir_; }

 private:
  explicit Checkpoint(std::string dir) : dir_(std::move(dir)) {}

  std::string dir_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const TensorView*> tensors_;
};

}  // namespace cohort
