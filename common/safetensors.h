// Reader for the safetensors format: an 8-byte little-endian header length, a JSON header mapping
// tensor names to {dtype, shape, data_offsets}, then the raw data. The file is memory-mapped;
// tensors are views into it.
//
//   COHORT_ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open("model.safetensors"));
//   const TensorView* t = file->Find("lm_head.weight");
//
// Open validates the whole header up front (sizes, dtypes, offsets inside the file, no overlapping
// ranges), so a view handed out later is always in bounds.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/dtype.h"
#include "common/mapped_file.h"

namespace cohort {

struct TensorView {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  std::span<const std::byte> data;
  const std::string* file;  // path of the file it lives in, for error messages

  int64_t num_elements() const;
};

class SafetensorsFile {
 public:
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  // Parses an in-memory image (the same checks as Open); `bytes` must outlive the object.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Parse(std::string path,
                                                                std::span<const std::byte> bytes);

  const std::string& path() const { return path_; }
  // nullptr when the file has no tensor of that name.
  const TensorView* Find(const std::string& name) const;
  const std::map<std::string, TensorView>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  explicit SafetensorsFile(std::string path) : path_(std::move(path)) {}
  absl::Status ParseHeader(std::span<const std::byte> bytes);

  std::string path_;
  std::unique_ptr<MappedFile> mapping_;
  std::map<std::string, TensorView> tensors_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace cohort
