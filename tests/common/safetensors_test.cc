#include "common/safetensors.h"

#include <cstring>
#include <initializer_list>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tests/testing/status.h"
#include "tests/testing/paths.h"
#include "tests/testing/safetensors_writer.h"

namespace cohort {
namespace {

using testing::SafetensorsBytes;
using testing::TempDir;
using testing::TestTensor;
using testing::WriteFile;

using testing::MessageHas;

std::span<const std::byte> AsBytes(const std::string& s) {
  return {reinterpret_cast<const std::byte*>(s.data()), s.size()};
}

// Parses an in-memory file named "mem.safetensors" and returns the status.
absl::Status ParseStatus(const std::string& bytes) {
  return SafetensorsFile::Parse("mem.safetensors", AsBytes(bytes)).status();
}

std::vector<TestTensor> SampleTensors() {
  return {
      {"model.embed_tokens.weight", DType::kBF16, {3, 2}, {1, 2, 3, 4, 5, -6}, {}},
      {"model.norm.weight", DType::kF32, {4}, {0.5f, 1.5f, -2.0f, 8.0f}, {}},
      {"lm_head.weight", DType::kF16, {2, 1}, {0.25f, -1.0f}, {}},
  };
}

TEST(SafetensorsTest, OpensValidFile) {
  TempDir dir;
  const std::string path = dir.Join("model.safetensors");
  WriteFile(path, SafetensorsBytes(SampleTensors()));

  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->path(), path);
  EXPECT_EQ((*file)->tensors().size(), 3u);
  EXPECT_EQ((*file)->Find("missing"), nullptr);

  const TensorView* embed = (*file)->Find("model.embed_tokens.weight");
  ASSERT_NE(embed, nullptr);
  EXPECT_EQ(embed->name, "model.embed_tokens.weight");
  EXPECT_EQ(embed->dtype, DType::kBF16);
  EXPECT_EQ(embed->shape, (std::vector<int64_t>{3, 2}));
  EXPECT_EQ(embed->num_elements(), 6);
  ASSERT_EQ(embed->data.size(), 12u);
  ASSERT_NE(embed->file, nullptr);
  EXPECT_EQ(*embed->file, path);
  uint16_t first, last;
  std::memcpy(&first, embed->data.data(), 2);
  std::memcpy(&last, embed->data.data() + 10, 2);
  EXPECT_EQ(BF16ToFloat(first), 1.0f);
  EXPECT_EQ(BF16ToFloat(last), -6.0f);

  const TensorView* norm = (*file)->Find("model.norm.weight");
  ASSERT_NE(norm, nullptr);
  EXPECT_EQ(norm->dtype, DType::kF32);
  EXPECT_EQ(norm->shape, (std::vector<int64_t>{4}));
  ASSERT_EQ(norm->data.size(), 16u);
  float values[4];
  std::memcpy(values, norm->data.data(), 16);
  EXPECT_EQ(values[0], 0.5f);
  EXPECT_EQ(values[3], 8.0f);

  const TensorView* head = (*file)->Find("lm_head.weight");
  ASSERT_NE(head, nullptr);
  EXPECT_EQ(head->dtype, DType::kF16);
  uint16_t h;
  std::memcpy(&h, head->data.data() + 2, 2);
  EXPECT_EQ(F16ToFloat(h), -1.0f);
}

TEST(SafetensorsTest, ReadsStringMetadata) {
  const std::string bytes = SafetensorsBytes(
      R"({"__metadata__": {"format": "pt", "source": "unit test", "count": 3},)"
      R"( "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})",
      std::string(4, '\0'));
  auto file = SafetensorsFile::Parse("mem.safetensors", AsBytes(bytes));
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->metadata().at("format"), "pt");
  EXPECT_EQ((*file)->metadata().at("source"), "unit test");
  EXPECT_EQ((*file)->metadata().count("count"), 0u);  // only string values are kept
  EXPECT_EQ((*file)->tensors().count("__metadata__"), 0u);
  EXPECT_NE((*file)->Find("w"), nullptr);
}

TEST(SafetensorsTest, EmptyHeaderObjectIsAValidEmptyFile) {
  auto file = SafetensorsFile::Parse("mem.safetensors", AsBytes(SafetensorsBytes("{}", "")));
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_TRUE((*file)->tensors().empty());
}

TEST(SafetensorsTest, MissingFileIsNotFound) {
  TempDir dir;
  const std::string path = dir.Join("nope.safetensors");
  auto st = SafetensorsFile::Open(path).status();
  EXPECT_TRUE(absl::IsNotFound(st)) << st;
  EXPECT_TRUE(MessageHas(st, {path}));
}

TEST(SafetensorsTest, FileShorterThanEightBytes) {
  auto st = ParseStatus("abc");
  EXPECT_TRUE(absl::IsInvalidArgument(st)) << st;
  EXPECT_TRUE(MessageHas(st, {"mem.safetensors", "3 bytes"}));

  TempDir dir;
  const std::string path = dir.Join("empty.safetensors");
  WriteFile(path, "");
  st = SafetensorsFile::Open(path).status();
  EXPECT_TRUE(absl::IsInvalidArgument(st)) << st;
  EXPECT_TRUE(MessageHas(st, {path, "0 bytes"}));
}

TEST(SafetensorsTest, HeaderLengthLargerThanFile) {
  std::string bytes = SafetensorsBytes("{}", "");
  bytes[0] = static_cast<char>(200);  // claims a 200-byte header in a 10-byte file
  auto st = ParseStatus(bytes);
  EXPECT_TRUE(absl::IsInvalidArgument(st)) << st;
  EXPECT_TRUE(MessageHas(st, {"mem.safetensors", "header length 200"}));

  std::string huge(8, '\xff');  // 2^64 - 1: must not wrap around
  st = ParseStatus(huge + "{}");
  EXPECT_TRUE(absl::IsInvalidArgument(st)) << st;
  EXPECT_TRUE(MessageHas(st, {"mem.safetensors", "header length"}));
}

TEST(SafetensorsTest, HeaderNotJson) {
  auto st = ParseStatus(SafetensorsBytes("{not json", ""));
  EXPECT_TRUE(absl::IsInvalidArgument(st)) << st;
  EXPECT_TRUE(MessageHas(st, {"mem.safetensors", "JSON"}));
}

TEST(SafetensorsTest, HeaderJsonNotAnObject) {
  auto st = ParseStatus(SafetensorsBytes("[1, 2, 3]", ""));
  EXPECT_TRUE(absl::IsInvalidArgument(st)) << st;
  EXPECT_TRUE(MessageHas(st, {"mem.safetensors", "not a JSON object"}));
}

TEST(SafetensorsTest, UnknownDtypeNamesTensorAndDtype) {
  auto st = ParseStatus(SafetensorsBytes(R"({"w": {"dtype": "Q4_K", "shape": [2], "data_offsets": [0, 2]}})",
                                         std::string(2, '\0')));
  EXPECT_TRUE(absl::IsInvalidArgument(st)) << st;
  EXPECT_TRUE(MessageHas(st, {"mem.safetensors", "'w'", "Q4_K"}));
}

TEST(SafetensorsTest, MissingFieldsNameTheTensor) {
  auto st = ParseStatus(SafetensorsBytes(R"({"w": {"shape": [1], "data_offsets": [0, 4]}})", std::string(4, 0)));
  EXPECT_TRUE(absl::IsInvalidArgument(st)) << st;
  EXPECT_TRUE(MessageHas(st, {"mem.safetensors", "'w'", "dtype"}));
  st = ParseStatus(SafetensorsBytes(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0]}})",
                                    std::string(4, 0)));
  EXPECT_TRUE(absl::IsInvalidArgument(st)) << st;
  EXPECT_TRUE(MessageHas(st, {"mem.safetensors", "'w'", "data_offsets"}));
}

TEST(SafetensorsTest, TruncatedFileNamesTheTensor) {
  TempDir dir;
  const std::string path = dir.Join("model.safetensors");
  const std::string whole = SafetensorsBytes(SampleTensors());
  WriteFile(path, whole);
  ASSERT_TRUE(SafetensorsFile::Open(path).ok());

  // lm_head.weight is written last; cutting the file short leaves it past the end of the data.
  WriteFile(path, whole.substr(0, whole.size() - 3));
  auto st = SafetensorsFile::Open(path).status();
  EXPECT_TRUE(absl::IsInvalidArgument(st)) << st;
  EXPECT_TRUE(MessageHas(st, {path, "'lm_head.weight'", "truncated"}));
}

TEST(SafetensorsTest, ByteCountMustMatchShapeAndDtype) {
  // [2, 3] of BF16 needs 12 bytes; the offsets give 10.
  auto st = ParseStatus(SafetensorsBytes(R"({"w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 10]}})",
                                         std::string(12, '\0')));
  EXPECT_TRUE(absl::IsInvalidArgument(st)) << st;
  EXPECT_TRUE(MessageHas(st, {"mem.safetensors", "'w'", "10 bytes", "[2, 3]", "BF16", "12"}));
}

TEST(SafetensorsTest, EndBeforeBegin) {
  auto st = ParseStatus(SafetensorsBytes(R"({"w": {"dtype": "U8", "shape": [0], "data_offsets": [4, 2]}})",
                                         std::string(8, '\0')));
  EXPECT_TRUE(absl::IsInvalidArgument(st)) << st;
  EXPECT_TRUE(MessageHas(st, {"mem.safetensors", "'w'", "[4, 2]"}));
}

TEST(SafetensorsTest, OverlappingTensorsAreNamed) {
  auto st = ParseStatus(SafetensorsBytes(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},)"
                                         R"( "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
                                         std::string(12, '\0')));
  EXPECT_TRUE(absl::IsInvalidArgument(st)) << st;
  EXPECT_TRUE(MessageHas(st, {"mem.safetensors", "'a'", "'b'", "overlap"}));
}

TEST(SafetensorsTest, AdjacentTensorsDoNotOverlap) {
  auto file = SafetensorsFile::Parse(
      "mem.safetensors", AsBytes(SafetensorsBytes(R"({"b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},)"
                                                  R"( "a": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}})",
                                                  std::string(12, '\0'))));
  EXPECT_TRUE(file.ok()) << file.status();
}

TEST(SafetensorsTest, ShapeEntriesMustBeNonNegativeIntegers) {
  for (const char* shape : {"[-1]", "[2.5]", "[\"4\"]", "[2, -2]"}) {
    const std::string header =
        std::string(R"({"w": {"dtype": "U8", "shape": )") + shape + R"(, "data_offsets": [0, 4]}})";
    auto st = ParseStatus(SafetensorsBytes(header, std::string(4, '\0')));
    EXPECT_TRUE(absl::IsInvalidArgument(st)) << shape << ": " << st;
    EXPECT_TRUE(MessageHas(st, {"mem.safetensors", "'w'", "shape entries must be non-negative integers"}))
        << shape;
  }
}

TEST(SafetensorsTest, NegativeOffsetsAreRejected) {
  auto st = ParseStatus(SafetensorsBytes(R"({"w": {"dtype": "U8", "shape": [1], "data_offsets": [-1, 0]}})",
                                         std::string(4, '\0')));
  EXPECT_TRUE(absl::IsInvalidArgument(st)) << st;
  EXPECT_TRUE(MessageHas(st, {"mem.safetensors", "'w'", "data_offsets must be non-negative integers"}));
}

// A shape whose byte count would overflow 64 bits must not wrap around to match a small data range.
TEST(SafetensorsTest, HugeShapeWhoseByteCountOverflowsIsRejected) {
  auto st = ParseStatus(SafetensorsBytes(
      R"({"w": {"dtype": "F32", "shape": [4611686018427387904], "data_offsets": [0, 0]}})", ""));
  EXPECT_TRUE(absl::IsInvalidArgument(st)) << st;
  EXPECT_TRUE(MessageHas(st, {"mem.safetensors", "'w'"}));
}

// The official writer can place an empty tensor at the offset where a non-empty one starts.
TEST(SafetensorsTest, EmptyTensorSharingAnOffsetDoesNotOverlap) {
  auto st = ParseStatus(SafetensorsBytes(R"({"a": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]},)"
                                         R"( "z": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}})",
                                         std::string(4, '\0')));
  EXPECT_TRUE(st.ok()) << st;
}

}  // namespace
}  // namespace cohort
