#include "common/dtype.h"

#include <cmath>

#include "common/status.h"

namespace cohort {
namespace {

struct DTypeInfo {
  DType dtype;
  const char* name;
  size_t size;
};

constexpr DTypeInfo kDTypes[] = {
    {DType::kF32, "F32", 4},     {DType::kF16, "F16", 2},        {DType::kBF16, "BF16", 2},
    {DType::kF64, "F64", 8},     {DType::kI64, "I64", 8},        {DType::kI32, "I32", 4},
    {DType::kI16, "I16", 2},     {DType::kI8, "I8", 1},          {DType::kU8, "U8", 1},
    {DType::kBool, "BOOL", 1},   {DType::kF8E4M3, "F8_E4M3", 1}, {DType::kF8E5M2, "F8_E5M2", 1},
};

const DTypeInfo& Info(DType dtype) {
  for (const auto& info : kDTypes) {
    if (info.dtype == dtype) return info;
  }
  COHORT_CHECK(false, "unknown dtype ", static_cast<int>(dtype));
  return kDTypes[0];
}

}  // namespace

std::optional<DType> ParseDType(std::string_view name) {
  for (const auto& info : kDTypes) {
    if (name == info.name) return info.dtype;
  }
  return std::nullopt;
}

const char* DTypeName(DType dtype) { return Info(dtype).name; }
size_t DTypeSize(DType dtype) { return Info(dtype).size; }

bool IsFloatWeightType(DType dtype) {
  return dtype == DType::kF32 || dtype == DType::kF16 || dtype == DType::kBF16;
}

float F16ToFloat(uint16_t bits) {
  const int sign = (bits >> 15) & 1;
  const int exponent = (bits >> 10) & 0x1f;
  const int mantissa = bits & 0x3ff;
  float magnitude;
  if (exponent == 0) {
    magnitude = std::ldexp(static_cast<float>(mantissa), -24);
  } else if (exponent == 31) {
    magnitude = mantissa == 0 ? INFINITY : NAN;
  } else {
    magnitude = std::ldexp(static_cast<float>(mantissa | 0x400), exponent - 25);
  }
  return sign ? -magnitude : magnitude;
}

uint16_t FloatToBF16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if (std::isnan(value)) return 0x7fc0;
  const uint32_t rounding = 0x7fff + ((bits >> 16) & 1);
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

uint16_t FloatToF16(float value) {
  // Through double arithmetic: exact for the values tests write (representable in f16 range).
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000);
  float magnitude = std::fabs(value);
  if (std::isnan(value)) return 0x7e00;
  if (magnitude >= 65520.0f) return sign | 0x7c00;
  if (magnitude < std::ldexp(1.0f, -14)) {  // subnormal: units of 2^-24
    return sign | static_cast<uint16_t>(std::nearbyint(magnitude * std::ldexp(1.0f, 24)));
  }
  int exponent;
  float fraction = std::frexp(magnitude, &exponent);  // magnitude = fraction * 2^exponent, [0.5, 1)
  int mantissa = static_cast<int>(std::nearbyint((fraction * 2.0f - 1.0f) * 1024.0f));
  int biased = exponent - 1 + 15;
  if (mantissa == 1024) {
    mantissa = 0;
    ++biased;
  }
  if (biased >= 31) return sign | 0x7c00;
  return sign | static_cast<uint16_t>((biased << 10) | mantissa);
}

void ConvertToFloat32(DType dtype, std::span<const std::byte> src, std::span<float> dst) {
  COHORT_CHECK(IsFloatWeightType(dtype), "not a float weight type: ", DTypeName(dtype));
  COHORT_CHECK(src.size() == dst.size() * DTypeSize(dtype), "size mismatch ", src.size(), " vs ",
               dst.size());
  const std::byte* p = src.data();
  switch (dtype) {
    case DType::kF32:
      std::memcpy(dst.data(), p, src.size());
      return;
    case DType::kBF16:
      for (size_t i = 0; i < dst.size(); ++i) {
        uint16_t bits;
        std::memcpy(&bits, p + 2 * i, 2);
        dst[i] = BF16ToFloat(bits);
      }
      return;
    case DType::kF16:
      for (size_t i = 0; i < dst.size(); ++i) {
        uint16_t bits;
        std::memcpy(&bits, p + 2 * i, 2);
        dst[i] = F16ToFloat(bits);
      }
      return;
    default:
      return;
  }
}

}  // namespace cohort
