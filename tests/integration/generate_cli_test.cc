// `cohort generate` as a user runs it: a real process, its stdout, its files and its exit code.
#include <cmath>
#include <cstring>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/fixtures.h"
#include "tests/testing/paths.h"
#include "tests/testing/safetensors_writer.h"
#include "tests/testing/subprocess.h"

namespace cohort {
namespace {

using testing::BinaryPath;
using testing::RunProcess;

std::string Join(const std::vector<int32_t>& ids) {
  std::string out;
  for (int32_t id : ids) out += (out.empty() ? "" : ",") + std::to_string(id);
  return out;
}

TEST(GenerateCliTest, PrintsGreedyTokensAndWritesTheirLogits) {
  const testing::Fixture f = testing::LoadFixture("v2_group_limited");
  testing::TempDir dir;
  const auto& c = f.cases[1];
  auto r = RunProcess({BinaryPath("cohort"), "generate", "--model", f.model_dir, "--prompt-ids", Join(c.prompt),
                       "--max-tokens", std::to_string(c.generated.size()), "--temperature", "0", "--ignore-eos",
                       "--logits-out", dir.Join("logits.f32")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto out = nlohmann::json::parse(r.out);
  EXPECT_EQ(out["token_ids"].get<std::vector<int32_t>>(), c.generated);

  const std::string raw = testing::ReadFile(dir.Join("logits.f32"));
  ASSERT_EQ(raw.size(), c.generated.size() * f.vocab_size * sizeof(float));
  std::vector<float> logits(raw.size() / sizeof(float));
  std::memcpy(logits.data(), raw.data(), raw.size());
  for (size_t step = 0; step < c.generated.size(); ++step) {
    const float* ref = f.LogitsRow(1, step);
    for (int64_t v = 0; v < f.vocab_size; ++v) {
      // 1e-3 of the logits' scale (their magnitude stays under 30 in the fixtures).
      ASSERT_NEAR(logits[step * f.vocab_size + v], ref[v], 1e-3 * 30) << "step " << step << " token " << v;
    }
  }
}

TEST(GenerateCliTest, SameSeedSameSample) {
  const std::string model = testing::SourcePath("tests/fixtures/models/v3_plain");
  auto run = [&](const char* seed) {
    return RunProcess({BinaryPath("cohort"), "generate", "--model", model, "--prompt-ids", "5,6,7", "--max-tokens",
                       "12", "--temperature", "1.5", "--seed", seed, "--ignore-eos"});
  };
  auto a = run("11"), b = run("11"), c = run("12");
  ASSERT_EQ(a.exit_code, 0) << a.err;
  EXPECT_EQ(a.out, b.out);
  EXPECT_NE(a.out, c.out);  // 12 tokens at temperature 1.5 from 512: a collision is vanishingly rare
}

TEST(GenerateCliTest, MissingModelIsOneClearLine) {
  auto r = RunProcess({BinaryPath("cohort"), "generate", "--model", "/nonexistent/model", "--prompt-ids", "1"});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_TRUE(r.out.empty());
  EXPECT_NE(r.err.find("/nonexistent/model/config.json"), std::string::npos) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
}

TEST(GenerateCliTest, BadFlagsExitWithUsageError) {
  auto unknown = RunProcess({BinaryPath("cohort"), "generate", "--modle", "x"});
  EXPECT_EQ(unknown.exit_code, 2);
  EXPECT_NE(unknown.err.find("--modle"), std::string::npos) << unknown.err;

  auto missing = RunProcess({BinaryPath("cohort"), "generate", "--prompt-ids", "1"});
  EXPECT_EQ(missing.exit_code, 2);
  EXPECT_NE(missing.err.find("--model"), std::string::npos) << missing.err;

  const std::string model = testing::SourcePath("tests/fixtures/models/v3_plain");
  auto bad_id = RunProcess({BinaryPath("cohort"), "generate", "--model", model, "--prompt-ids", "1,x"});
  EXPECT_EQ(bad_id.exit_code, 2);
  EXPECT_NE(bad_id.err.find("'x'"), std::string::npos) << bad_id.err;

  auto out_of_vocab = RunProcess({BinaryPath("cohort"), "generate", "--model", model, "--prompt-ids", "1,99999"});
  EXPECT_EQ(out_of_vocab.exit_code, 2);
  EXPECT_NE(out_of_vocab.err.find("99999"), std::string::npos) << out_of_vocab.err;

  auto too_long = RunProcess({BinaryPath("cohort"), "generate", "--model", model, "--prompt-ids", "1", "--max-tokens",
                              "100000"});
  EXPECT_EQ(too_long.exit_code, 2);
  EXPECT_NE(too_long.err.find("context"), std::string::npos) << too_long.err;
}

TEST(GenerateCliTest, HelpListsTheFlags) {
  auto r = RunProcess({BinaryPath("cohort"), "generate", "--help"});
  EXPECT_EQ(r.exit_code, 0);
  for (const char* flag : {"--model", "--prompt-ids", "--max-tokens", "--temperature", "--logits-out", "--device"}) {
    EXPECT_NE(r.out.find(flag), std::string::npos) << flag;
  }
  auto top = RunProcess({BinaryPath("cohort")});
  EXPECT_EQ(top.exit_code, 2);
  EXPECT_NE(top.err.find("generate"), std::string::npos);
}

}  // namespace
}  // namespace cohort
