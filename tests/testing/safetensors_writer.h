// Writes safetensors files for tests, including deliberately broken ones.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/dtype.h"

namespace cohort::testing {

struct TestTensor {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  std::vector<float> values;  // converted to dtype when written (F32, F16, BF16)
  std::vector<uint8_t> raw;   // used as the data instead of `values` when not empty
};

// The bytes of a well-formed safetensors file holding `tensors` in order.
std::string SafetensorsBytes(const std::vector<TestTensor>& tensors);
// A file made of an explicit JSON header and data section (for malformed inputs).
std::string SafetensorsBytes(const std::string& header_json, const std::string& data);
void WriteFile(const std::string& path, const std::string& bytes);
std::string ReadFile(const std::string& path);

}  // namespace cohort::testing
