// The null backend (--device null): predictable logits without weights, and the CPU engine's
// validation and cache capacity.
#include "worker/model/null_engine.h"

#include <algorithm>
#include <filesystem>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tests/testing/paths.h"
#include "worker/model/engine.h"

namespace cohort {
namespace {

const char* kModel = "tests/fixtures/models/v3_plain";  // vocab 512

EngineOptions NullOptions(const std::string& model_dir) {
  EngineOptions options;
  options.model_dir = model_dir;
  options.device = "null";
  options.kv_block_size = 4;
  options.num_kv_blocks = 8;
  return options;
}

std::unique_ptr<Engine> MustCreate(const EngineOptions& options) {
  auto engine = CreateEngine(options);
  EXPECT_TRUE(engine.ok()) << engine.status();
  return engine.ok() ? std::move(engine).value() : nullptr;
}

int32_t Argmax(std::span<const float> row) {
  return static_cast<int32_t>(std::max_element(row.begin(), row.end()) - row.begin());
}

TEST(NullEngineTest, GreedyDecodingCountsUpInABatchOfTwo) {
  auto engine = MustCreate(NullOptions(testing::SourcePath(kModel)));
  ASSERT_NE(engine, nullptr);
  const int64_t vocab = engine->config().vocab_size;
  ASSERT_EQ(vocab, 512);

  // The second sequence wraps around the end of the vocabulary.
  std::vector<std::vector<int32_t>> tokens = {{1, 2, 3}, {509, 510}};
  const std::vector<std::vector<int32_t>> tables = {{0, 1}, {2, 3}};
  std::vector<int64_t> computed = {0, 0};
  std::vector<float> logits(2 * vocab);
  for (int step = 0; step < 5; ++step) {
    std::vector<SequenceStep> batch;
    for (size_t s = 0; s < 2; ++s) {
      batch.push_back({std::span<const int32_t>(tokens[s]).subspan(computed[s]), computed[s], tables[s], true});
    }
    ASSERT_TRUE(engine->Forward(batch, logits).ok()) << "step " << step;
    for (size_t s = 0; s < 2; ++s) {
      computed[s] = static_cast<int64_t>(tokens[s].size());
      tokens[s].push_back(Argmax(std::span<const float>(logits).subspan(s * vocab, vocab)));
    }
  }
  EXPECT_EQ(tokens[0], (std::vector<int32_t>{1, 2, 3, 4, 5, 6, 7, 8}));
  EXPECT_EQ(tokens[1], (std::vector<int32_t>{509, 510, 511, 0, 1, 2, 3}));
}

TEST(NullEngineTest, RowsOnlyForSequencesThatAskForLogits) {
  auto engine = MustCreate(NullOptions(testing::SourcePath(kModel)));
  ASSERT_NE(engine, nullptr);
  const int64_t vocab = engine->config().vocab_size;
  const std::vector<int32_t> chunk = {7, 8, 9}, decode = {41}, table_a = {0}, table_b = {1};
  const std::vector<SequenceStep> batch = {{chunk, 0, table_a, /*compute_logits=*/false},
                                           {decode, 0, table_b, /*compute_logits=*/true}};
  std::vector<float> logits(vocab);  // one row is enough
  ASSERT_TRUE(engine->Forward(batch, logits).ok());
  EXPECT_EQ(Argmax(logits), 42);
  EXPECT_EQ(logits[42], 0.0f);
  EXPECT_EQ(std::count(logits.begin(), logits.end(), -1e4f), vocab - 1);
}

TEST(NullEngineTest, NeedsNoWeights) {
  testing::TempDir dir;
  std::filesystem::copy_file(testing::SourcePath(kModel) + "/config.json", dir.Join("config.json"));
  EXPECT_TRUE(CreateEngine(NullOptions(dir.path())).ok());

  EngineOptions cpu = NullOptions(dir.path());
  cpu.device = "cpu";
  EXPECT_FALSE(CreateEngine(cpu).ok());  // the same folder is no checkpoint for the CPU engine
}

TEST(NullEngineTest, KvGeometryIsTheCpuEngines) {
  EngineOptions options = NullOptions(testing::SourcePath(kModel));
  options.num_kv_blocks = 0;  // sized from kv_cache_bytes
  options.kv_cache_bytes = int64_t{1} << 20;
  auto null_engine = MustCreate(options);
  options.device = "cpu";
  auto cpu_engine = MustCreate(options);
  ASSERT_NE(null_engine, nullptr);
  ASSERT_NE(cpu_engine, nullptr);
  EXPECT_GT(null_engine->kv_geometry().num_blocks, 0);
  EXPECT_EQ(null_engine->kv_geometry().num_blocks, cpu_engine->kv_geometry().num_blocks);
  EXPECT_EQ(null_engine->kv_geometry().block_size_tokens, cpu_engine->kv_geometry().block_size_tokens);
  EXPECT_EQ(null_engine->kv_geometry().bytes_per_token, cpu_engine->kv_geometry().bytes_per_token);
}

TEST(NullEngineTest, TokenOutsideVocabularyIsRefusedLikeTheCpuEngine) {
  EngineOptions options = NullOptions(testing::SourcePath(kModel));
  auto null_engine = MustCreate(options);
  options.device = "cpu";
  auto cpu_engine = MustCreate(options);
  ASSERT_NE(null_engine, nullptr);
  ASSERT_NE(cpu_engine, nullptr);

  const std::vector<int32_t> tokens = {3, 512}, table = {0};
  const SequenceStep step{tokens, 0, table, true};
  std::vector<float> logits(null_engine->config().vocab_size);
  const absl::Status st = null_engine->Forward({&step, 1}, logits);
  EXPECT_TRUE(absl::IsInvalidArgument(st)) << st;
  EXPECT_NE(std::string(st.message()).find("token id 512 is outside the vocabulary [0, 512)"), std::string::npos)
      << st;
  EXPECT_EQ(st, cpu_engine->Forward({&step, 1}, logits));
}

TEST(NullEngineTest, UnknownDeviceErrorMentionsNull) {
  EngineOptions options = NullOptions(testing::SourcePath(kModel));
  options.device = "tpu";
  const absl::Status st = CreateEngine(options).status();
  EXPECT_FALSE(st.ok());
  EXPECT_NE(std::string(st.message()).find("tpu"), std::string::npos) << st;
  EXPECT_NE(std::string(st.message()).find("null"), std::string::npos) << st;
}

}  // namespace
}  // namespace cohort
