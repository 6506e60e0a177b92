#include "worker/model/checkpoint.h"

#include <cstdint>
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
using testing::SourcePath;
using testing::TempDir;
using testing::TestTensor;
using testing::WriteFile;

using testing::MessageHas;

std::unique_ptr<Checkpoint> OpenOrDie(const std::string& dir) {
  auto checkpoint = Checkpoint::Open(dir);
  EXPECT_TRUE(checkpoint.ok()) << checkpoint.status();
  return checkpoint.ok() ? std::move(*checkpoint) : nullptr;
}

// A small tensor with 4 elements for hand-made checkpoints.
TestTensor Small(const std::string& name) { return {name, DType::kF32, {4}, {1, 2, 3, 4}, {}}; }

TEST(CheckpointTest, OpensSingleFileFixture) {
  auto ckpt = OpenOrDie(SourcePath("tests/fixtures/models/v3_plain"));
  ASSERT_NE(ckpt, nullptr);
  EXPECT_TRUE(ckpt->Has("model.embed_tokens.weight"));
  EXPECT_TRUE(ckpt->Has("lm_head.weight"));
  EXPECT_FALSE(ckpt->Has("model.embed_tokens"));
  auto embed = ckpt->Get("model.embed_tokens.weight", {512, 64});
  ASSERT_TRUE(embed.ok()) << embed.status();
  EXPECT_EQ((*embed)->dtype, DType::kBF16);
  EXPECT_EQ((*embed)->shape, (std::vector<int64_t>{512, 64}));
  EXPECT_EQ((*embed)->data.size(), 512u * 64u * 2u);
}

TEST(CheckpointTest, OpensShardedFixtureThroughIndex) {
  const std::string dir = SourcePath("tests/fixtures/models/v3_qlora_yarn");
  auto ckpt = OpenOrDie(dir);
  ASSERT_NE(ckpt, nullptr);
  EXPECT_EQ(ckpt->dir(), dir);
  auto embed = ckpt->Get("model.embed_tokens.weight", {512, 64});
  ASSERT_TRUE(embed.ok()) << embed.status();
  EXPECT_EQ((*embed)->dtype, DType::kBF16);
  EXPECT_EQ(*(*embed)->file, dir + "/model-00002-of-00002.safetensors");

  auto bias = ckpt->Get("model.layers.1.mlp.gate.e_score_correction_bias", {16});
  ASSERT_TRUE(bias.ok()) << bias.status();
  EXPECT_EQ((*bias)->dtype, DType::kF32);
  // Tensors from both shards are visible.
  EXPECT_TRUE(ckpt->Has("lm_head.weight"));                         // shard 1
  EXPECT_TRUE(ckpt->Has("model.layers.0.self_attn.q_b_proj.weight"));  // shard 2
  auto floats = ckpt->ReadFloat32("model.embed_tokens.weight", {512, 64});
  ASSERT_TRUE(floats.ok()) << floats.status();
  EXPECT_EQ(floats->size(), 512u * 64u);
}

TEST(CheckpointTest, WrongShapeNamesFileTensorAndBothShapes) {
  const std::string dir = SourcePath("tests/fixtures/models/v3_plain");
  auto ckpt = OpenOrDie(dir);
  ASSERT_NE(ckpt, nullptr);
  auto st = ckpt->Get("model.embed_tokens.weight", {64, 512}).status();
  EXPECT_TRUE(absl::IsInvalidArgument(st)) << st;
  EXPECT_TRUE(MessageHas(st, {dir + "/model.safetensors", "model.embed_tokens.weight", "[512, 64]", "[64, 512]"}));
  EXPECT_FALSE(ckpt->ReadFloat32("model.embed_tokens.weight", {512}).ok());
}

TEST(CheckpointTest, MissingTensorIsNotFound) {
  auto ckpt = OpenOrDie(SourcePath("tests/fixtures/models/v3_plain"));
  ASSERT_NE(ckpt, nullptr);
  auto st = ckpt->Get("model.layers.99.mlp.gate.weight", {8, 64}).status();
  EXPECT_TRUE(absl::IsNotFound(st)) << st;
  EXPECT_TRUE(MessageHas(st, {"model.layers.99.mlp.gate.weight"}));
}

TEST(CheckpointTest, NonFloatTensorIsRejectedNamingItsDtype) {
  TempDir dir;
  TestTensor ids{"model.token_ids", DType::kI32, {2}, {}, {1, 0, 0, 0, 2, 0, 0, 0}};
  WriteFile(dir.Join("model.safetensors"), SafetensorsBytes({ids, Small("model.norm.weight")}));
  auto ckpt = OpenOrDie(dir.path());
  ASSERT_NE(ckpt, nullptr);
  auto st = ckpt->Get("model.token_ids", {2}).status();
  EXPECT_TRUE(absl::IsInvalidArgument(st)) << st;
  EXPECT_TRUE(MessageHas(st, {dir.Join("model.safetensors"), "model.token_ids", "I32"}));
  EXPECT_TRUE(ckpt->Get("model.norm.weight", {4}).ok());
}

TEST(CheckpointTest, FolderWithoutWeightsIsNotFound) {
  TempDir dir;
  WriteFile(dir.Join("config.json"), "{}");
  auto st = Checkpoint::Open(dir.path()).status();
  EXPECT_TRUE(absl::IsNotFound(st)) << st;
  EXPECT_TRUE(MessageHas(st, {dir.path(), "model.safetensors"}));
}

TEST(CheckpointTest, IndexPointingAtMissingShardNamesThatFile) {
  TempDir dir;
  WriteFile(dir.Join("model-00001-of-00002.safetensors"), SafetensorsBytes({Small("a")}));
  WriteFile(dir.Join("model.safetensors.index.json"),
            R"({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})");
  auto st = Checkpoint::Open(dir.path()).status();
  EXPECT_TRUE(absl::IsNotFound(st)) << st;
  EXPECT_TRUE(MessageHas(st, {dir.Join("model-00002-of-00002.safetensors")}));
}

TEST(CheckpointTest, IndexNamingTensorItsShardLacks) {
  TempDir dir;
  WriteFile(dir.Join("shard.safetensors"), SafetensorsBytes({Small("a")}));
  WriteFile(dir.Join("model.safetensors.index.json"),
            R"({"weight_map": {"a": "shard.safetensors", "ghost.weight": "shard.safetensors"}})");
  auto st = Checkpoint::Open(dir.path()).status();
  EXPECT_TRUE(absl::IsInvalidArgument(st)) << st;
  EXPECT_TRUE(MessageHas(st, {"ghost.weight", dir.Join("shard.safetensors")}));
}

TEST(CheckpointTest, IndexMayNotReachOutsideTheFolder) {
  TempDir dir;
  WriteFile(dir.Join("x.safetensors"), SafetensorsBytes({Small("a")}));
  WriteFile(dir.Join("model.safetensors.index.json"), R"({"weight_map": {"a": "../x.safetensors"}})");
  auto st = Checkpoint::Open(dir.path()).status();
  EXPECT_TRUE(absl::IsInvalidArgument(st)) << st;
  EXPECT_TRUE(MessageHas(st, {"../x.safetensors", "'a'"}));
}

TEST(CheckpointTest, IndexWithoutWeightMapIsRejected) {
  TempDir dir;
  WriteFile(dir.Join("model.safetensors.index.json"), R"({"metadata": {}})");
  auto st = Checkpoint::Open(dir.path()).status();
  EXPECT_TRUE(absl::IsInvalidArgument(st)) << st;
  EXPECT_TRUE(MessageHas(st, {"model.safetensors.index.json", "weight_map"}));
}

TEST(CheckpointTest, CorruptWeightFileFailsToOpen) {
  TempDir dir;
  WriteFile(dir.Join("model.safetensors"), "junk");
  auto st = Checkpoint::Open(dir.path()).status();
  EXPECT_TRUE(absl::IsInvalidArgument(st)) << st;
  EXPECT_TRUE(MessageHas(st, {dir.Join("model.safetensors")}));
}

TEST(CheckpointTest, ReadFloat32UpcastsEveryFloatType) {
  TempDir dir;
  const std::vector<float> values = {1.0f, -2.5f, 0.15625f, 3.0e4f, -0.0f, 1.0f / 1024.0f};
  WriteFile(dir.Join("model.safetensors"),
            SafetensorsBytes({{"bf16", DType::kBF16, {2, 3}, values, {}},
                              {"f16", DType::kF16, {3, 2}, values, {}},
                              {"f32", DType::kF32, {6}, values, {}}}));
  auto ckpt = OpenOrDie(dir.path());
  ASSERT_NE(ckpt, nullptr);
  for (auto [name, shape] : std::vector<std::pair<std::string, std::vector<int64_t>>>{
           {"bf16", {2, 3}}, {"f16", {3, 2}}, {"f32", {6}}}) {
    auto out = ckpt->ReadFloat32(name, shape);
    ASSERT_TRUE(out.ok()) << name << ": " << out.status();
    // Every value is exactly representable in bf16 and f16 except 3.0e4 in bf16 (rounds to 29952).
    std::vector<float> expected = values;
    if (name == "bf16") expected[3] = 29952.0f;
    EXPECT_EQ(*out, expected) << name;
  }
}

TEST(CheckpointTest, ReadFloat32RoundsBF16ToNearest) {
  TempDir dir;
  // 1 + 2^-8 + 2^-9 is closer to 1 + 2^-7 than to 1 in bf16.
  WriteFile(dir.Join("model.safetensors"),
            SafetensorsBytes({{"w", DType::kBF16, {2}, {1.005859375f, -1.0f / 3.0f}, {}}}));
  auto ckpt = OpenOrDie(dir.path());
  ASSERT_NE(ckpt, nullptr);
  auto out = ckpt->ReadFloat32("w", {2});
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ((*out)[0], 1.0078125f);
  EXPECT_EQ((*out)[1], -0.333984375f);
}

}  // namespace
}  // namespace cohort
