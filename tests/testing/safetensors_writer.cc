#include "tests/testing/safetensors_writer.h"

#include <fstream>
#include <sstream>

#include "common/status.h"
#include "nlohmann/json.hpp"

namespace cohort::testing {

std::string SafetensorsBytes(const std::string& header_json, const std::string& data) {
  std::string out(8, '\0');
  uint64_t n = header_json.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + header_json + data;
}

std::string SafetensorsBytes(const std::vector<TestTensor>& tensors) {
  nlohmann::json header = nlohmann::json::object();
  header["__metadata__"] = {{"format", "pt"}};
  std::string data;
  for (const TestTensor& t : tensors) {
    std::string bytes;
    if (!t.raw.empty()) {
      bytes.assign(t.raw.begin(), t.raw.end());
    } else {
      for (float v : t.values) {
        if (t.dtype == DType::kF32) {
          bytes.append(reinterpret_cast<const char*>(&v), 4);
        } else {
          COHORT_CHECK(t.dtype == DType::kBF16 || t.dtype == DType::kF16, "cannot write ", DTypeName(t.dtype));
          uint16_t h = t.dtype == DType::kBF16 ? FloatToBF16(v) : FloatToF16(v);
          bytes.append(reinterpret_cast<const char*>(&h), 2);
        }
      }
    }
    header[t.name] = {{"dtype", DTypeName(t.dtype)},
                      {"shape", t.shape},
                      {"data_offsets", {data.size(), data.size() + bytes.size()}}};
    data += bytes;
  }
  return SafetensorsBytes(header.dump(), data);
}

void WriteFile(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  COHORT_CHECK(out.good(), "writing ", path);
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  COHORT_CHECK(in.good(), "reading ", path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

}  // namespace cohort::testing
