// `cohort bench step` as a user runs it, on the CPU backend with a fixture checkpoint (the GPU table
// itself is measured on the GPU machine; docs/cuda_backend.md): the numbers of a decode row agree
// with each other, --long-context adds rows with one long sequence and --spread-contexts rows of
// contexts spread out, --baseline prints the speed-up over another implementation's step at the
// same shape, and a baseline file that cannot be used stops the run with one line before anything
// is timed.
#include <algorithm>
#include <fstream>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/paths.h"
#include "tests/testing/subprocess.h"

namespace cohort {
namespace {

using nlohmann::json;
using testing::ProcessResult;

constexpr double kCopyGbs = 10;

class BenchStepTest : public ::testing::Test {
 protected:
  // Runs `cohort bench step` on the 3-layer fixture at context 16 with `args` added; the parsed
  // --output JSON when it wrote one.
  ProcessResult Bench(std::vector<std::string> args, json* results = nullptr) {
    std::vector<std::string> argv = {testing::BinaryPath("cohort"), "bench", "step", "--device", "cpu",
                                     "--model", testing::SourcePath("tests/fixtures/models/v3_plain"),
                                     "--copy-bandwidth-gbs", std::to_string(kCopyGbs), "--contexts", "16",
                                     "--prefill=", "--iterations", "2", "--warmup", "0", "--threads", "1"};
    argv.insert(argv.end(), args.begin(), args.end());
    const std::string output = dir_.Join("results.json");
    std::remove(output.c_str());
    argv.insert(argv.end(), {"--output", output});
    ProcessResult result = testing::RunProcess(argv, 120);
    if (results != nullptr) {
      std::ifstream in(output);
      *results = in ? json::parse(in, nullptr, /*allow_exceptions=*/false) : json();
    }
    return result;
  }

  std::string WriteFile(const std::string& name, const std::string& text) {
    const std::string path = dir_.Join(name);
    std::ofstream(path) << text;
    return path;
  }

  testing::TempDir dir_;
};

TEST_F(BenchStepTest, DecodeRowsAgreeWithTheirOwnNumbers) {
  json results;
  const ProcessResult r = Bench({"--batch-sizes", "1,3"}, &results);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(results["num_layers"], 3);
  ASSERT_EQ(results["decode"].size(), 2u) << results;
  EXPECT_FALSE(results.contains("baseline"));
  for (const json& row : results["decode"]) {
    const double seconds = row["step_ms"].get<double>() / 1e3;
    ASSERT_GT(seconds, 0);
    EXPECT_EQ(row["context"], 16);
    EXPECT_NEAR(row["tokens_per_s"].get<double>(), row["batch"].get<double>() / seconds, 1e-6 / seconds) << row;
    const double bytes = row["weight_bytes"].get<double>() + row["kv_bytes"].get<double>();
    EXPECT_NEAR(row["achieved_gb_per_s"].get<double>(), bytes / seconds / 1e9, 1e-9 * bytes / seconds) << row;
    EXPECT_NEAR(row["roofline_ms"].get<double>(), bytes / (kCopyGbs * 1e9) * 1e3, 1e-9) << row;
    EXPECT_NEAR(row["roofline_fraction"].get<double>(), row["roofline_ms"].get<double>() / row["step_ms"].get<double>(),
                1e-9)
        << row;
    EXPECT_GT(row["routed_expert_reads"].get<int>(), 0) << row;
  }
  // A batch of three reads at least the experts one token reads.
  EXPECT_GE(results["decode"][1]["routed_expert_reads"], results["decode"][0]["routed_expert_reads"]);
  EXPECT_NE(r.out.find("% roof"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("prefill"), std::string::npos) << "no prefill shapes, no prefill table:\n" << r.out;
}

// --long-context times each shape again with the batch's first sequence that long: those rows come
// after the uniform ones, say so, and read the longer sequence's extra cache rows (the same bytes at
// every batch size, since only the first sequence changed).
TEST_F(BenchStepTest, LongContextRowsReadOneLongSequence) {
  json results;
  const ProcessResult r = Bench({"--batch-sizes", "1,3", "--long-context", "48"}, &results);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  ASSERT_EQ(results["decode"].size(), 4u) << results;
  std::vector<double> extra_kv;
  for (int i = 0; i < 2; ++i) {
    const json& uniform = results["decode"][i];
    const json& mixed = results["decode"][i + 2];
    EXPECT_FALSE(uniform.contains("long_context")) << uniform;
    EXPECT_EQ(mixed["long_context"], 48) << mixed;
    EXPECT_EQ(mixed["context"], 16);
    EXPECT_EQ(mixed["batch"], uniform["batch"]);
    extra_kv.push_back(mixed["kv_bytes"].get<double>() - uniform["kv_bytes"].get<double>());
  }
  EXPECT_GT(extra_kv[0], 0);
  EXPECT_DOUBLE_EQ(extra_kv[0], extra_kv[1]);
  EXPECT_NE(r.out.find("the first sequence of each batch at 48 tokens"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("   16+48      3 "), std::string::npos) << r.out;

  const ProcessResult bad = Bench({"--batch-sizes", "1", "--long-context", "-5"});
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_NE(bad.err.find("--long-context must be 0 or positive, got -5"), std::string::npos) << bad.err;
}

// --spread-contexts times each shape again with its contexts spread evenly around the context (a
// batch of four at 16 tokens: 4, 12, 20 and 28): the same cache bytes as the equal batch, in rows
// that say so.
TEST_F(BenchStepTest, SpreadContextRowsReadTheSameTokensSpreadOut) {
  json results;
  const ProcessResult r = Bench({"--batch-sizes", "1,4", "--spread-contexts"}, &results);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  ASSERT_EQ(results["decode"].size(), 4u) << results;
  for (int i = 0; i < 2; ++i) {
    const json& uniform = results["decode"][i];
    const json& spread = results["decode"][i + 2];
    EXPECT_FALSE(uniform.contains("spread")) << uniform;
    EXPECT_EQ(spread["spread"], true) << spread;
    EXPECT_EQ(spread["context"], 16);
    EXPECT_EQ(spread["batch"], uniform["batch"]);
    EXPECT_DOUBLE_EQ(spread["kv_bytes"].get<double>(), uniform["kv_bytes"].get<double>()) << spread;
  }
  EXPECT_NE(r.out.find("contexts spread evenly"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("     ~16      4 "), std::string::npos) << r.out;
}

TEST_F(BenchStepTest, BaselineSpeedupIsTheRatioOfStepTimesAtTheSameShape) {
  const std::string baseline = WriteFile(
      "baseline.json",
      R"({"transformers": "5.17.0", "torch": "2.11.0", "layers": 3, "decode": [
          {"batch": 1, "context": 16, "step_ms": 40.0, "tokens_per_s": 25.0},
          {"batch": 2, "context": 16, "step_ms": 50.0},
          {"batch": 8, "context": 16, "step_ms": 60.0},
          {"batch": 1, "context": 1024, "step_ms": 70.0}]})");
  json results;
  const ProcessResult r = Bench({"--batch-sizes", "1,2", "--baseline", baseline}, &results);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const json& compared = results["baseline"];
  EXPECT_EQ(compared["name"], "transformers 5.17.0");
  EXPECT_EQ(compared["layers"], 3);
  ASSERT_EQ(compared["decode"].size(), 4u) << compared;
  for (int i = 0; i < 2; ++i) {
    const json& ours = results["decode"][i];
    const json& row = compared["decode"][i];
    EXPECT_EQ(row["batch"], ours["batch"]);
    EXPECT_EQ(row["step_ms"], ours["step_ms"]);
    EXPECT_DOUBLE_EQ(row["speedup"].get<double>(),
                     row["baseline_step_ms"].get<double>() / ours["step_ms"].get<double>());
  }
  EXPECT_EQ(compared["decode"][0]["baseline_step_ms"], 40.0);
  // Shapes this run did not time keep the baseline's number and get no ratio.
  for (int i = 2; i < 4; ++i) EXPECT_FALSE(compared["decode"][i].contains("speedup")) << compared["decode"][i];
  EXPECT_NE(r.out.find("transformers 5.17.0 (" + baseline + ")"), std::string::npos) << r.out;
  char line[128];
  std::snprintf(line, sizeof(line), "%8d %6d %12.3f %9.3f %8.1fx", 16, 1, 40.0,
                results["decode"][0]["step_ms"].get<double>(), compared["decode"][0]["speedup"].get<double>());
  EXPECT_NE(r.out.find(line), std::string::npos) << line << "\n" << r.out;
  EXPECT_NE(r.out.find("    1024      1       70.000  not timed here"), std::string::npos) << r.out;
}

TEST_F(BenchStepTest, UnusableBaselineStopsWithOneLineBeforeTiming) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"", "cannot be read"},  // no such file
      {"not json", "is not a JSON object"},
      {"[1, 2]", "is not a JSON object"},
      {R"({"layers": 3})", "has no \"decode\" list"},
      {R"({"decode": []})", "has no \"decode\" list"},
      {R"({"decode": [{"batch": 1, "context": 16, "step_ms": 0}]})", "decode[0] needs"},
      {R"({"decode": [{"batch": 1, "context": 16, "step_ms": 3}, {"batch": "2", "context": 16, "step_ms": 3}]})",
       "decode[1] needs"},
      {R"({"layers": 0, "decode": [{"batch": 1, "context": 16, "step_ms": 3}]})",
       "\"layers\" is not a positive integer"},
      {R"({"layers": 27, "decode": [{"batch": 1, "context": 16, "step_ms": 3}]})",
       "timed 27 layers, this model runs 3 (--num-layers)"},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    const auto& [text, message] = cases[i];
    const std::string name = "baseline" + std::to_string(i) + ".json";
    const std::string path = text.empty() ? dir_.Join(name) : WriteFile(name, text);
    const ProcessResult r = Bench({"--batch-sizes", "1", "--baseline", path});
    EXPECT_EQ(r.exit_code, 2) << text << "\n" << r.err;
    EXPECT_EQ(r.err.rfind("cohort bench step: --baseline " + path + ": " + message, 0), 0u) << text << "\n" << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    EXPECT_EQ(r.out, "") << "nothing is timed: " << text;
  }
}

}  // namespace
}  // namespace cohort
