#include "common/dtype.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "gtest/gtest.h"

namespace cohort {
namespace {

uint32_t FloatBits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

float BitsToFloat(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

// Little-endian element bytes of `values`, as they would sit in a safetensors data section.
template <typename T>
std::vector<std::byte> Bytes(const std::vector<T>& values) {
  std::vector<std::byte> out(values.size() * sizeof(T));
  std::memcpy(out.data(), values.data(), out.size());
  return out;
}

TEST(BF16Test, ExactValuesRoundTrip) {
  for (float v : {0.0f, 1.0f, -1.0f, 0.5f, -2.0f, 3.0f, 1.5f, 65536.0f, -0.0078125f, 1e30f}) {
    const float bf16_exact = BitsToFloat(FloatBits(v) & 0xffff0000u);
    EXPECT_EQ(BF16ToFloat(FloatToBF16(bf16_exact)), bf16_exact) << v;
  }
  EXPECT_EQ(FloatToBF16(1.0f), 0x3f80);
  EXPECT_EQ(FloatToBF16(-2.0f), 0xc000);
  EXPECT_EQ(BF16ToFloat(0x3f80), 1.0f);
  EXPECT_EQ(BF16ToFloat(0xc040), -3.0f);
}

TEST(BF16Test, RoundsToNearest) {
  // 1 + 2^-8 + 2^-10 lies above the halfway point between 0x3f80 and 0x3f81.
  EXPECT_EQ(FloatToBF16(BitsToFloat(0x3f80a000u)), 0x3f81);
  // Just below halfway rounds down.
  EXPECT_EQ(FloatToBF16(BitsToFloat(0x3f807fffu)), 0x3f80);
}

TEST(BF16Test, TiesRoundToEven) {
  // Exactly halfway between 0x3f80 (even) and 0x3f81: stays at the even one.
  EXPECT_EQ(FloatToBF16(BitsToFloat(0x3f808000u)), 0x3f80);
  // Exactly halfway between 0x3f81 (odd) and 0x3f82: goes up to the even one.
  EXPECT_EQ(FloatToBF16(BitsToFloat(0x3f818000u)), 0x3f82);
}

TEST(BF16Test, SpecialValues) {
  EXPECT_EQ(FloatToBF16(std::numeric_limits<float>::infinity()), 0x7f80);
  EXPECT_EQ(FloatToBF16(-std::numeric_limits<float>::infinity()), 0xff80);
  EXPECT_TRUE(std::isnan(BF16ToFloat(FloatToBF16(std::nanf("")))));
  EXPECT_TRUE(std::isinf(BF16ToFloat(0x7f80)));
  const float negative_zero = BF16ToFloat(FloatToBF16(-0.0f));
  EXPECT_EQ(negative_zero, 0.0f);
  EXPECT_TRUE(std::signbit(negative_zero));
}

TEST(F16Test, NormalValues) {
  EXPECT_EQ(F16ToFloat(0x3c00), 1.0f);
  EXPECT_EQ(F16ToFloat(0xc000), -2.0f);
  EXPECT_EQ(F16ToFloat(0x3555), 0.333251953125f);
  EXPECT_EQ(F16ToFloat(0x7bff), 65504.0f);         // largest finite half
  EXPECT_EQ(F16ToFloat(0x0400), std::ldexp(1.0f, -14));  // smallest normal
}

TEST(F16Test, SubnormalValues) {
  EXPECT_EQ(F16ToFloat(0x0001), std::ldexp(1.0f, -24));  // smallest subnormal
  EXPECT_EQ(F16ToFloat(0x03ff), 1023.0f * std::ldexp(1.0f, -24));
  EXPECT_EQ(F16ToFloat(0x8200), -512.0f * std::ldexp(1.0f, -24));
}

TEST(F16Test, InfinityNaNAndSignedZero) {
  EXPECT_EQ(F16ToFloat(0x7c00), std::numeric_limits<float>::infinity());
  EXPECT_EQ(F16ToFloat(0xfc00), -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(F16ToFloat(0x7e00)));
  EXPECT_TRUE(std::isnan(F16ToFloat(0x7c01)));
  EXPECT_EQ(F16ToFloat(0x0000), 0.0f);
  EXPECT_FALSE(std::signbit(F16ToFloat(0x0000)));
  EXPECT_EQ(F16ToFloat(0x8000), 0.0f);
  EXPECT_TRUE(std::signbit(F16ToFloat(0x8000)));
}

TEST(F16Test, FloatToF16RoundTripsRepresentableValues) {
  const float values[] = {0.0f,     1.0f,    -1.0f,   0.5f,  0.333251953125f, 1000.0f, -65504.0f,
                          6.1035156e-05f /* 2^-14 */, std::ldexp(1.0f, -24), std::ldexp(3.0f, -24),
                          1.0009765625f /* 1 + 2^-10 */};
  for (float v : values) {
    EXPECT_EQ(F16ToFloat(FloatToF16(v)), v) << v;
  }
  EXPECT_EQ(FloatToF16(1.0f), 0x3c00);
  EXPECT_EQ(FloatToF16(-2.0f), 0xc000);
  EXPECT_EQ(FloatToF16(65504.0f), 0x7bff);
  EXPECT_EQ(FloatToF16(-0.0f), 0x8000);
}

TEST(F16Test, FloatToF16RoundsAndSaturates) {
  // 1 + 2^-11 is a tie between 1.0 (even mantissa) and 1 + 2^-10: stays at 1.0.
  EXPECT_EQ(FloatToF16(1.00048828125f), 0x3c00);
  // 1 + 3 * 2^-11 is a tie between mantissas 1 and 2: goes to 2.
  EXPECT_EQ(FloatToF16(1.00146484375f), 0x3c02);
  // 2 - 2^-13 rounds up past the last mantissa value into the next binade: exactly 2.0.
  EXPECT_EQ(FloatToF16(1.99990234375f), 0x4000);
  EXPECT_EQ(FloatToF16(65519.0f), 0x7bff);  // still rounds down to the largest finite half
  EXPECT_EQ(FloatToF16(65520.0f), 0x7c00);  // rounds up to infinity
  EXPECT_EQ(FloatToF16(1e6f), 0x7c00);
  EXPECT_EQ(FloatToF16(-1e6f), 0xfc00);
  EXPECT_EQ(FloatToF16(std::numeric_limits<float>::infinity()), 0x7c00);
  EXPECT_TRUE(std::isnan(F16ToFloat(FloatToF16(std::nanf("")))));
}

TEST(ConvertToFloat32Test, F32IsCopied) {
  const std::vector<float> in = {1.5f, -2.25f, 0.0f, 1e-20f};
  const auto bytes = Bytes(in);
  std::vector<float> out(in.size());
  ConvertToFloat32(DType::kF32, bytes, out);
  EXPECT_EQ(out, in);
}

TEST(ConvertToFloat32Test, BF16IsWidened) {
  const auto bytes = Bytes(std::vector<uint16_t>{0x3f80, 0xc040, 0x3fc0, 0x0000});
  std::vector<float> out(4);
  ConvertToFloat32(DType::kBF16, bytes, out);
  EXPECT_EQ(out, (std::vector<float>{1.0f, -3.0f, 1.5f, 0.0f}));
}

TEST(ConvertToFloat32Test, F16IsConverted) {
  const auto bytes = Bytes(std::vector<uint16_t>{0x3c00, 0xc000, 0x0001, 0x7c00});
  std::vector<float> out(4);
  ConvertToFloat32(DType::kF16, bytes, out);
  EXPECT_EQ(out, (std::vector<float>{1.0f, -2.0f, std::ldexp(1.0f, -24),
                                     std::numeric_limits<float>::infinity()}));
}

TEST(DTypeTest, ParsesSafetensorsNames) {
  EXPECT_EQ(ParseDType("F32"), DType::kF32);
  EXPECT_EQ(ParseDType("F16"), DType::kF16);
  EXPECT_EQ(ParseDType("BF16"), DType::kBF16);
  EXPECT_EQ(ParseDType("F64"), DType::kF64);
  EXPECT_EQ(ParseDType("I64"), DType::kI64);
  EXPECT_EQ(ParseDType("I32"), DType::kI32);
  EXPECT_EQ(ParseDType("I16"), DType::kI16);
  EXPECT_EQ(ParseDType("I8"), DType::kI8);
  EXPECT_EQ(ParseDType("U8"), DType::kU8);
  EXPECT_EQ(ParseDType("BOOL"), DType::kBool);
  EXPECT_EQ(ParseDType("F8_E4M3"), DType::kF8E4M3);
  EXPECT_EQ(ParseDType("F8_E5M2"), DType::kF8E5M2);
}

TEST(DTypeTest, UnknownNamesAreRejected) {
  EXPECT_EQ(ParseDType("bf16"), std::nullopt);  // names are case-sensitive
  EXPECT_EQ(ParseDType("FP32"), std::nullopt);
  EXPECT_EQ(ParseDType(""), std::nullopt);
  EXPECT_EQ(ParseDType("U16"), std::nullopt);
}

TEST(DTypeTest, NamesAndSizesAgreeWithParse) {
  for (DType d : {DType::kF32, DType::kF16, DType::kBF16, DType::kF64, DType::kI64, DType::kI32, DType::kI16,
                  DType::kI8, DType::kU8, DType::kBool, DType::kF8E4M3, DType::kF8E5M2}) {
    EXPECT_EQ(ParseDType(DTypeName(d)), d) << DTypeName(d);
  }
  EXPECT_EQ(DTypeSize(DType::kF32), 4u);
  EXPECT_EQ(DTypeSize(DType::kBF16), 2u);
  EXPECT_EQ(DTypeSize(DType::kF16), 2u);
  EXPECT_EQ(DTypeSize(DType::kI64), 8u);
  EXPECT_EQ(DTypeSize(DType::kF8E4M3), 1u);
  EXPECT_TRUE(IsFloatWeightType(DType::kBF16));
  EXPECT_TRUE(IsFloatWeightType(DType::kF16));
  EXPECT_TRUE(IsFloatWeightType(DType::kF32));
  EXPECT_FALSE(IsFloatWeightType(DType::kI32));
  EXPECT_FALSE(IsFloatWeightType(DType::kF8E4M3));
  EXPECT_FALSE(IsFloatWeightType(DType::kF64));
}

}  // namespace
}  // namespace cohort
