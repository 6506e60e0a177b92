// Element types found in checkpoints, and their conversion to float32.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
#include <string_view>

namespace cohort {

enum class DType { kF32, kF16, kBF16, kF64, kI64, kI32, kI16, kI8, kU8, kBool, kF8E4M3, kF8E5M2 };

// Parses a safetensors dtype string ("BF16", "F32", ...).
std::optional<DType> ParseDType(std::string_view name);
const char* DTypeName(DType dtype);
size_t DTypeSize(DType dtype);
// True for the types Cohort loads as weights (upcast to float32 on the CPU).
bool IsFloatWeightType(DType dtype);

inline float BF16ToFloat(uint16_t bits) {
  uint32_t widened = static_cast<uint32_t>(bits) << 16;
  float out;
  std::memcpy(&out, &widened, sizeof(out));
  return out;
}

// IEEE half to float, including subnormals, infinities and NaN.
float F16ToFloat(uint16_t bits);

// Round-to-nearest-even float to bf16 (used by tests and tools that write checkpoints).
uint16_t FloatToBF16(float value);
uint16_t FloatToF16(float value);

// Converts `src` (little-endian elements of `dtype`) into `dst`, which holds exactly as many
// elements. Requires IsFloatWeightType(dtype).
void ConvertToFloat32(DType dtype, std::span<const std::byte> src, std::span<float> dst);

}  // namespace cohort
