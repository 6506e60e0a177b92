// What a user sees when a checkpoint or a request is wrong: one clear error naming the file and
// tensor (or the field), never a crash.
#include <filesystem>
#include <string>

#include "common/safetensors.h"
#include "gtest/gtest.h"
#include "tests/testing/paths.h"
#include "tests/testing/safetensors_writer.h"
#include "worker/model/engine.h"

namespace cohort {
namespace {

using testing::TempDir;

const char* kSource = "tests/fixtures/models/v3_plain";

std::string Message(const absl::Status& st) { return std::string(st.message()); }

// Copies the v3_plain fixture into `dir`, letting `edit` change its tensors before they are written.
template <typename Edit>
void CopyFixture(const TempDir& dir, Edit edit) {
  namespace fs = std::filesystem;
  fs::copy_file(testing::SourcePath(kSource) + "/config.json", dir.Join("config.json"));
  auto file = SafetensorsFile::Open(testing::SourcePath(kSource) + "/model.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  std::vector<testing::TestTensor> tensors;
  for (const auto& [name, view] : (*file)->tensors()) {
    testing::TestTensor t{name, view.dtype, view.shape, {}, {}};
    const auto* p = reinterpret_cast<const uint8_t*>(view.data.data());
    t.raw.assign(p, p + view.data.size());
    tensors.push_back(std::move(t));
  }
  edit(tensors);
  testing::WriteFile(dir.Join("model.safetensors"), testing::SafetensorsBytes(tensors));
}

absl::Status Load(const TempDir& dir) {
  EngineOptions options;
  options.model_dir = dir.path();
  options.num_kv_blocks = 4;
  return CreateEngine(options).status();
}

TEST(EngineLoadErrorsTest, UnchangedCopyLoads) {
  TempDir dir;
  CopyFixture(dir, [](auto&) {});
  EXPECT_TRUE(Load(dir).ok()) << Load(dir);
}

TEST(EngineLoadErrorsTest, MissingTensorIsNamed) {
  TempDir dir;
  CopyFixture(dir, [](auto& tensors) {
    std::erase_if(tensors, [](const auto& t) { return t.name == "model.layers.1.mlp.experts.3.up_proj.weight"; });
  });
  absl::Status st = Load(dir);
  EXPECT_TRUE(absl::IsNotFound(st)) << st;
  EXPECT_NE(Message(st).find("model.layers.1.mlp.experts.3.up_proj.weight"), std::string::npos) << st;
}

TEST(EngineLoadErrorsTest, WrongShapeNamesFileTensorAndShapes) {
  TempDir dir;
  CopyFixture(dir, [](auto& tensors) {
    for (auto& t : tensors) {
      if (t.name == "model.layers.0.self_attn.kv_a_proj_with_mqa.weight") std::swap(t.shape[0], t.shape[1]);
    }
  });
  absl::Status st = Load(dir);
  EXPECT_TRUE(absl::IsInvalidArgument(st)) << st;
  EXPECT_NE(Message(st).find("model.safetensors"), std::string::npos) << st;
  EXPECT_NE(Message(st).find("model.layers.0.self_attn.kv_a_proj_with_mqa.weight"), std::string::npos) << st;
  EXPECT_NE(Message(st).find("[64, 40]"), std::string::npos) << st;  // found
  EXPECT_NE(Message(st).find("[40, 64]"), std::string::npos) << st;  // kv_lora_rank 32 + rope 8, hidden 64
}

TEST(EngineLoadErrorsTest, WrongDtypeIsNamed) {
  TempDir dir;
  CopyFixture(dir, [](auto& tensors) {
    for (auto& t : tensors) {
      if (t.name == "model.norm.weight") t.dtype = DType::kI16;  // same size as bf16
    }
  });
  absl::Status st = Load(dir);
  EXPECT_TRUE(absl::IsInvalidArgument(st)) << st;
  EXPECT_NE(Message(st).find("model.norm.weight"), std::string::npos) << st;
  EXPECT_NE(Message(st).find("I16"), std::string::npos) << st;
}

TEST(EngineLoadErrorsTest, TruncatedFileNamesTheTensorCut) {
  TempDir dir;
  CopyFixture(dir, [](auto&) {});
  std::string bytes = testing::ReadFile(dir.Join("model.safetensors"));
  testing::WriteFile(dir.Join("model.safetensors"), bytes.substr(0, bytes.size() - 100));
  absl::Status st = Load(dir);
  EXPECT_TRUE(absl::IsInvalidArgument(st)) << st;
  EXPECT_NE(Message(st).find("truncated"), std::string::npos) << st;
  EXPECT_NE(Message(st).find("model.safetensors"), std::string::npos) << st;
}

TEST(EngineLoadErrorsTest, UnknownArchitectureIsRefused) {
  TempDir dir;
  CopyFixture(dir, [](auto&) {});
  std::string config = testing::ReadFile(dir.Join("config.json"));
  config.replace(config.find("DeepseekV3ForCausalLM"), 21, "LlamaForCausalLM");
  testing::WriteFile(dir.Join("config.json"), config);
  absl::Status st = Load(dir);
  EXPECT_TRUE(absl::IsInvalidArgument(st)) << st;
  EXPECT_NE(Message(st).find("LlamaForCausalLM"), std::string::npos) << st;
  EXPECT_NE(Message(st).find("config.json"), std::string::npos) << st;
}

TEST(EngineLoadErrorsTest, UnknownDeviceIsRefused) {
  EngineOptions options;
  options.model_dir = testing::SourcePath(kSource);
  options.device = "tpu";
  absl::Status st = CreateEngine(options).status();
  EXPECT_FALSE(st.ok());
  EXPECT_NE(Message(st).find("tpu"), std::string::npos) << st;
}

class EngineForwardErrorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    EngineOptions options;
    options.model_dir = testing::SourcePath(kSource);
    options.kv_block_size = 4;
    options.num_kv_blocks = 8;
    auto engine = CreateEngine(options);
    ASSERT_TRUE(engine.ok()) << engine.status();
    engine_ = std::move(engine).value();
    logits_.resize(engine_->config().vocab_size);
  }
  absl::Status Step(std::vector<int32_t> tokens, int64_t start, std::vector<int32_t> table) {
    tokens_ = std::move(tokens);
    table_ = std::move(table);
    SequenceStep step{tokens_, start, table_, true};
    return engine_->Forward({&step, 1}, logits_);
  }
  std::unique_ptr<Engine> engine_;
  std::vector<float> logits_;
  std::vector<int32_t> tokens_, table_;
};

TEST_F(EngineForwardErrorsTest, TokenOutsideVocabulary) {
  absl::Status st = Step({3, 512}, 0, {0});
  EXPECT_TRUE(absl::IsInvalidArgument(st)) << st;
  EXPECT_NE(Message(st).find("512"), std::string::npos) << st;
}

TEST_F(EngineForwardErrorsTest, BlockTableTooShort) {
  absl::Status st = Step({1, 2, 3, 4, 5}, 0, {0});  // 5 positions need 2 blocks of 4
  EXPECT_TRUE(absl::IsInvalidArgument(st)) << st;
  EXPECT_NE(Message(st).find("block table"), std::string::npos) << st;
}

TEST_F(EngineForwardErrorsTest, BlockThatDoesNotExist) {
  absl::Status st = Step({1}, 0, {8});
  EXPECT_TRUE(absl::IsInvalidArgument(st)) << st;
}

TEST_F(EngineForwardErrorsTest, PositionPastContext) {
  absl::Status st = Step({1}, engine_->config().max_position_embeddings, {0});
  EXPECT_TRUE(absl::IsInvalidArgument(st)) << st;
  EXPECT_NE(Message(st).find("context"), std::string::npos) << st;
}

// Every backend checks a batch with ValidateBatch. A cache split into pools (one per GPU of an
// expert-parallel engine) refuses a sequence whose blocks come from two of them, and only that.
TEST(ValidateBatchTest, RefusesASequenceAcrossTwoPools) {
  ModelConfig config;
  config.vocab_size = 100;
  config.max_position_embeddings = 1024;
  const KvCacheGeometry geometry{.block_size_tokens = 4, .num_blocks = 8, .bytes_per_token = 1, .num_pools = 2};
  const std::vector<int32_t> tokens(6, 1);
  const std::vector<int32_t> across = {3, 4}, within = {4, 7};  // pools: blocks 0-3, 4-7
  SequenceStep step{tokens, 0, across, false};
  const absl::Status refused = ValidateBatch(config, geometry, {&step, 1}, 0);
  EXPECT_TRUE(absl::IsInvalidArgument(refused)) << refused;
  EXPECT_NE(Message(refused).find("blocks 3 and 4 are in different pools"), std::string::npos) << refused;
  step.block_table = within;
  EXPECT_TRUE(ValidateBatch(config, geometry, {&step, 1}, 0).ok());
}

TEST_F(EngineForwardErrorsTest, ValidStepStillWorksAfterErrors) {
  EXPECT_FALSE(Step({600}, 0, {0}).ok());
  EXPECT_TRUE(Step({1, 2, 3}, 0, {0}).ok());
}

}  // namespace
}  // namespace cohort
