#include "common/safetensors.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status.h"
#include "nlohmann/json.hpp"

namespace cohort {
namespace {

// Larger headers are not produced by any writer; refusing them bounds what a bad file can cost.
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;

absl::Status Bad(const std::string& path, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(path, ": invalid safetensors file: ", what));
}

}  // namespace

int64_t TensorView::num_elements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  COHORT_ASSIGN_OR_RETURN(auto mapping, MappedFile::Open(path));
  auto file = std::unique_ptr<SafetensorsFile>(new SafetensorsFile(path));
  COHORT_RETURN_IF_ERROR(file->ParseHeader(mapping->bytes()));
  file->mapping_ = std::move(mapping);
  return file;
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Parse(
    std::string path, std::span<const std::byte> bytes) {
  auto file = std::unique_ptr<SafetensorsFile>(new SafetensorsFile(std::move(path)));
  COHORT_RETURN_IF_ERROR(file->ParseHeader(bytes));
  return file;
}

const TensorView* SafetensorsFile::Find(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

absl::Status SafetensorsFile::ParseHeader(std::span<const std::byte> bytes) {
  if (bytes.size() < 8) {
    return Bad(path_, absl::StrCat("file is ", bytes.size(), " bytes, shorter than the 8-byte header length"));
  }
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | static_cast<uint8_t>(bytes[i]);
  if (header_len > kMaxHeaderBytes || header_len > bytes.size() - 8) {
    return Bad(path_, absl::StrCat("header length ", header_len, " exceeds the file (", bytes.size(),
                                   " bytes); the file is truncated or not safetensors"));
  }
  const char* header_begin = reinterpret_cast<const char*>(bytes.data() + 8);
  nlohmann::json header = nlohmann::json::parse(header_begin, header_begin + header_len, nullptr,
                                                /*allow_exceptions=*/false);
  if (header.is_discarded() || !header.is_object()) {
    return Bad(path_, "header is not a JSON object");
  }

  const std::span<const std::byte> data = bytes.subspan(8 + header_len);
  std::vector<std::pair<uint64_t, const TensorView*>> ranges;  // (begin, tensor) for overlap checks
  for (auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      if (!entry.is_object()) return Bad(path_, "__metadata__ is not an object");
      for (auto& [key, value] : entry.items()) {
        if (value.is_string()) metadata_[key] = value.get<std::string>();
      }
      continue;
    }
    auto where = [&](const std::string& what) { return Bad(path_, absl::StrCat("tensor '", name, "': ", what)); };
    if (!entry.is_object()) return where("entry is not an object");
    auto dtype_it = entry.find("dtype");
    auto shape_it = entry.find("shape");
    auto offsets_it = entry.find("data_offsets");
    if (dtype_it == entry.end() || !dtype_it->is_string()) return where("missing string 'dtype'");
    if (shape_it == entry.end() || !shape_it->is_array()) return where("missing array 'shape'");
    if (offsets_it == entry.end() || !offsets_it->is_array() || offsets_it->size() != 2) {
      return where("'data_offsets' must be [begin, end]");
    }
    auto dtype = ParseDType(dtype_it->get<std::string>());
    if (!dtype) return where(absl::StrCat("unknown dtype '", dtype_it->get<std::string>(), "'"));

    TensorView view{name, *dtype, {}, {}, &path_};
    uint64_t elements = 1;
    for (const auto& dim : *shape_it) {
      if (!dim.is_number_unsigned()) return where("shape entries must be non-negative integers");
      uint64_t d = dim.get<uint64_t>();
      // Bounded so that elements * DTypeSize (at most 8) cannot overflow below.
      if (d != 0 && elements > (uint64_t{1} << 60) / d) return where("shape is too large");
      elements *= d;
      view.shape.push_back(static_cast<int64_t>(d));
    }
    for (const auto& off : *offsets_it) {
      if (!off.is_number_unsigned()) return where("data_offsets must be non-negative integers");
    }
    const uint64_t begin = (*offsets_it)[0].get<uint64_t>();
    const uint64_t end = (*offsets_it)[1].get<uint64_t>();
    if (end < begin) return where(absl::StrCat("data_offsets [", begin, ", ", end, "] end before they begin"));
    if (end > data.size()) {
      return where(absl::StrCat("data_offsets [", begin, ", ", end, "] run past the end of the data (",
                                data.size(), " bytes); the file is truncated"));
    }
    if (end - begin != elements * DTypeSize(*dtype)) {
      return where(absl::StrCat("holds ", end - begin, " bytes but shape [",
                                absl::StrJoin(view.shape, ", "), "] of ", DTypeName(*dtype), " needs ",
                                elements * DTypeSize(*dtype)));
    }
    view.data = data.subspan(begin, end - begin);
    auto [it, inserted] = tensors_.emplace(name, std::move(view));
    if (!inserted) return where("appears twice");
    if (end > begin) ranges.emplace_back(begin, &it->second);  // empty tensors occupy nothing
  }

  std::sort(ranges.begin(), ranges.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  for (size_t i = 1; i < ranges.size(); ++i) {
    const TensorView& prev = *ranges[i - 1].second;
    const uint64_t prev_end = ranges[i - 1].first + prev.data.size();
    if (ranges[i].first < prev_end) {
      return Bad(path_, absl::StrCat("tensors '", prev.name, "' and '", ranges[i].second->name,
                                     "' overlap in the data section"));
    }
  }
  return absl::OkStatus();
}

}  // namespace cohort
