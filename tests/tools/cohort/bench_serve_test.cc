// `cohort bench serve` as a user runs it: against real cohort-router and cohort-worker processes on
// 127.0.0.1 (null-device workers for speed, a CPU worker with the demo model for real tokens), over
// the public gRPC API, the worker's own service and the HTTP front; and its exit codes.
#include <fstream>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/paths.h"
#include "tests/testing/server_process.h"
#include "tests/testing/subprocess.h"

namespace cohort {
namespace {

using nlohmann::json;
using testing::ProcessResult;
using testing::ServerProcess;

class BenchServeTest : public ::testing::Test {
 protected:
  // One null-device worker (room for 1024 streams) and a router with an HTTP front, for every test.
  static void SetUpTestSuite() {
    worker_ = testing::WorkerProcess::Start(
                  testing::SourcePath("tests/fixtures/models/v3_plain"),
                  {"--device", "null", "--max-running", "1024", "--max-batch-tokens", "16384", "--kv-cache-bytes",
                   "400000000", "--metrics-port", "-1", "--log-level", "warn"})
                  .release();
    if (worker_ == nullptr) return;
    router_ = testing::RouterProcess::Start({worker_->address()}, {"--metrics-port", "-1", "--log-level", "warn"}).release();
  }
  static void TearDownTestSuite() {
    delete router_;
    delete worker_;
    router_ = worker_ = nullptr;
  }
  void SetUp() override {
    ASSERT_NE(worker_, nullptr);
    ASSERT_NE(router_, nullptr);
  }

  // Runs `cohort bench serve` with `args` plus --output; the parsed JSON when it wrote one.
  ProcessResult Bench(std::vector<std::string> args, json* results = nullptr, int timeout_s = 60) {
    std::vector<std::string> argv = {testing::BinaryPath("cohort"), "bench", "serve"};
    argv.insert(argv.end(), args.begin(), args.end());
    const std::string output = dir_.Join("results.json");
    std::remove(output.c_str());
    argv.insert(argv.end(), {"--output", output});
    ProcessResult result = testing::RunProcess(argv, timeout_s);
    if (results != nullptr) {
      std::ifstream in(output);
      *results = in ? json::parse(in, nullptr, /*allow_exceptions=*/false) : json();
    }
    return result;
  }

  static std::string Router() { return router_->address(); }

  static ServerProcess* worker_;
  static ServerProcess* router_;
  testing::TempDir dir_;
};

ServerProcess* BenchServeTest::worker_ = nullptr;
ServerProcess* BenchServeTest::router_ = nullptr;

// Every number a run reports is consistent: the requests asked for, all completed with exactly
// max_tokens tokens, ordered percentiles, goodput within throughput.
void ExpectConsistentRun(const json& run, int64_t num_requests) {
  SCOPED_TRACE(run["name"].get<std::string>());
  EXPECT_EQ(run["num_requests"], num_requests);
  EXPECT_EQ(run["completed"], num_requests) << run["errors"];
  EXPECT_EQ(run["failed"], 0);
  ASSERT_EQ(run["requests"].size(), static_cast<size_t>(num_requests));
  int64_t output_tokens = 0;
  for (const json& r : run["requests"]) {
    EXPECT_TRUE(r["ok"].get<bool>()) << r;
    EXPECT_EQ(r["output_tokens"], r["max_tokens"]) << r;
    EXPECT_GT(r["prompt_tokens"].get<int64_t>(), 0) << r;
    EXPECT_LE(r["ttft_ms"].get<double>(), r["e2e_ms"].get<double>()) << r;
    output_tokens += r["output_tokens"].get<int64_t>();
  }
  EXPECT_EQ(run["total_output_tokens"], output_tokens);
  for (const char* metric : {"ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"}) {
    const json& d = run[metric];
    EXPECT_GT(d["count"].get<int64_t>(), 0) << metric;
    EXPECT_LE(d["min"].get<double>(), d["p50"].get<double>()) << metric;
    EXPECT_LE(d["p50"].get<double>(), d["p90"].get<double>()) << metric;
    EXPECT_LE(d["p90"].get<double>(), d["p99"].get<double>()) << metric;
    EXPECT_LE(d["p99"].get<double>(), d["max"].get<double>()) << metric;
  }
  EXPECT_GT(run["duration_s"].get<double>(), 0);
  EXPECT_GT(run["request_throughput"].get<double>(), 0);
  EXPECT_GT(run["output_throughput"].get<double>(), 0);
  EXPECT_LE(run["goodput"].get<double>(), run["request_throughput"].get<double>());
}

TEST_F(BenchServeTest, ClosedLoopsThroughTheRouterMeasureWhatWasAskedFor) {
  json results;
  const ProcessResult r = Bench({"--target", Router(), "--concurrency", "1,4", "--num-requests", "12", "--input-len",
                                 "uniform:4:16", "--output-len", "normal:9:2", "--label", "sweep"},
                                &results);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  ASSERT_TRUE(results.is_object()) << r.out;
  EXPECT_EQ(results["tool"], "cohort bench serve");
  EXPECT_EQ(results["label"], "sweep");
  EXPECT_EQ(results["model"]["name"], "v3_plain");
  EXPECT_EQ(results["model"]["vocab_size"], 512);
  ASSERT_EQ(results["runs"].size(), 2u);
  EXPECT_EQ(results["runs"][0]["concurrency"], 1);
  EXPECT_EQ(results["runs"][1]["concurrency"], 4);
  EXPECT_EQ(results["runs"][1]["warmup_requests"], 4);  // one per user by default
  for (const json& run : results["runs"]) ExpectConsistentRun(run, 12);
  EXPECT_NE(r.out.find("concurrency 4"), std::string::npos) << r.out;  // the table
  EXPECT_NE(r.out.find("TTFT ms"), std::string::npos) << r.out;
}

TEST_F(BenchServeTest, OpenLoopSendsAtThePoissonRateStraightToTheWorker) {
  json results;
  const ProcessResult r = Bench({"--target", worker_->address(), "--api", "worker", "--request-rate", "100",
                                 "--num-requests", "20", "--input-len", "8", "--output-len", "6"},
                                &results);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  ASSERT_EQ(results["runs"].size(), 1u);
  const json& run = results["runs"][0];
  EXPECT_EQ(run["mode"], "open");
  EXPECT_EQ(run["request_rate"], 100.0);
  EXPECT_TRUE(run["concurrency"].is_null());
  ExpectConsistentRun(run, 20);
  // 20 arrivals at 100/s take about 0.2 s; far less would mean they were not paced.
  EXPECT_GT(run["duration_s"].get<double>(), 0.05);
  EXPECT_LT(run["request_throughput"].get<double>(), 400);
}

TEST_F(BenchServeTest, DrivesHundredsOfConcurrentStreamsFromOneProcess) {
  json results;
  const ProcessResult r = Bench({"--target", worker_->address(), "--api", "worker", "--concurrency", "600",
                                 "--num-requests", "600", "--warmup-requests", "0", "--input-len", "4",
                                 "--output-len", "4"},
                                &results);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  ExpectConsistentRun(results["runs"][0], 600);
}

TEST_F(BenchServeTest, SharedPrefixRequestsAreServedFromThePrefixCache) {
  json results;
  const ProcessResult r = Bench({"--target", Router(), "--concurrency", "2", "--num-requests", "8",
                                 "--shared-prefix-len", "64", "--input-len", "5", "--output-len", "3"},
                                &results);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const json& run = results["runs"][0];
  ExpectConsistentRun(run, 8);
  for (const json& request : run["requests"]) {
    EXPECT_EQ(request["prompt_tokens"], 69);
    EXPECT_GE(request["cached_prompt_tokens"].get<int64_t>(), 48) << request;  // the warm-up cached the prefix
  }
  EXPECT_EQ(results["workload"]["shared_prefix_len"], 64);
}

TEST_F(BenchServeTest, HttpFrontGivesTheSameCounts) {
  json results;
  const ProcessResult r =
      Bench({"--target", "127.0.0.1:" + std::to_string(router_->http_port()), "--api", "http", "--vocab-size", "512",
             "--concurrency", "3", "--num-requests", "9", "--input-len", "6", "--output-len", "7"},
            &results);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(results["api"], "http");
  EXPECT_EQ(results["model"]["name"], "v3_plain");
  ExpectConsistentRun(results["runs"][0], 9);
  for (const json& request : results["runs"][0]["requests"]) EXPECT_EQ(request["prompt_tokens"], 6);
}

TEST_F(BenchServeTest, GoodputCountsOnlyRequestsWithinTheLatencyBound) {
  json results;
  ProcessResult r = Bench({"--target", Router(), "--num-requests", "5", "--input-len", "4", "--output-len", "3",
                           "--slo-ttft-ms", "0.0001"},
                          &results);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(results["runs"][0]["slo_met"], 0);  // nothing answers within 100 ns
  EXPECT_EQ(results["runs"][0]["goodput"], 0.0);
  r = Bench({"--target", Router(), "--num-requests", "5", "--input-len", "4", "--output-len", "3", "--slo-ttft-ms",
             "60000", "--slo-tpot-ms", "60000"},
            &results);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(results["runs"][0]["slo_met"], 5);
  EXPECT_DOUBLE_EQ(results["runs"][0]["goodput"].get<double>(), results["runs"][0]["request_throughput"].get<double>());
}

TEST_F(BenchServeTest, StaticBatchingWorkerServesEveryRequest) {
  auto worker = testing::WorkerProcess::Start(testing::SourcePath("tests/fixtures/models/v3_plain"),
                                              {"--device", "null", "--scheduler", "static", "--metrics-port", "-1"});
  ASSERT_NE(worker, nullptr);
  json results;
  const ProcessResult r = Bench({"--target", worker->address(), "--api", "worker", "--concurrency", "4",
                                 "--num-requests", "16", "--input-len", "uniform:2:20", "--output-len",
                                 "uniform:1:12"},
                                &results);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  ExpectConsistentRun(results["runs"][0], 16);
}

TEST(BenchServeRealModelTest, DemoModelOnACpuWorkerWithTextAndTokenPrompts) {
  auto worker = testing::WorkerProcess::Start(testing::SourcePath("models/cohort-demo"),
                                              {"--metrics-port", "-1", "--kv-cache-bytes", "64000000"});
  ASSERT_NE(worker, nullptr);
  auto router = testing::RouterProcess::Start({worker->address()}, {"--metrics-port", "-1"});
  ASSERT_NE(router, nullptr);
  testing::TempDir dir;
  const std::string prompts = dir.Join("prompts.jsonl");
  std::ofstream(prompts) << "{\"prompt\": \"The meaning of life is\", \"output_len\": 5}\n"
                            "{\"prompt\": [10, 20, 30, 40]}\n";
  const std::string output = dir.Join("results.json");
  const ProcessResult r = testing::RunProcess(
      {testing::BinaryPath("cohort"), "bench", "serve", "--target", router->address(), "--concurrency", "2",
       "--num-requests", "6", "--prompts-file", prompts, "--output-len", "4", "--output", output},
      120);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  std::ifstream in(output);
  const json results = json::parse(in);
  EXPECT_EQ(results["model"]["name"], "cohort-demo");
  const json& run = results["runs"][0];
  ExpectConsistentRun(run, 6);
  int from_file = 0;  // the text prompt's output_len; the ids prompt takes --output-len
  for (const json& request : run["requests"]) from_file += request["max_tokens"] == 5;
  EXPECT_EQ(from_file, 3) << run["requests"];
}

TEST(BenchServeErrorsTest, BadFlagsExitWith2AndOneLine) {
  const std::string cohort = testing::BinaryPath("cohort");
  const std::vector<std::vector<std::string>> cases = {
      {"--target", "127.0.0.1:1", "--concurrency", "0"},
      {"--target", "127.0.0.1:1", "--concurrency", "1,x"},
      {"--target", "127.0.0.1:1", "--request-rate", "-2"},
      {"--target", "127.0.0.1:1", "--input-len", "uniform:9:3"},
      {"--target", "127.0.0.1:1", "--output-len", "zipf:3:4"},
      {"--target", "127.0.0.1:1", "--api", "carrier-pigeon"},
      {"--target", "127.0.0.1:1", "--num-requests", "0"},
      {"--target", "127.0.0.1:1", "--api", "http"},  // no vocabulary size for random prompts
      {"--target", "nocolon"},
      {"--target", "127.0.0.1:1", "--no-such-flag"},
      {"--target", "127.0.0.1:1", "stray"},
      {},  // no --target
  };
  for (const auto& args : cases) {
    std::vector<std::string> argv = {cohort, "bench", "serve"};
    argv.insert(argv.end(), args.begin(), args.end());
    const ProcessResult r = testing::RunProcess(argv, 30);
    std::string joined;
    for (const auto& a : args) joined += a + " ";
    EXPECT_EQ(r.exit_code, 2) << joined << r.err;
    EXPECT_EQ(r.err.rfind("cohort bench serve: ", 0), 0u) << joined << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << joined << r.err;
  }
  EXPECT_EQ(testing::RunProcess({cohort, "bench", "walk"}).exit_code, 2);
  EXPECT_EQ(testing::RunProcess({cohort, "bench", "serve", "--help"}).exit_code, 0);
}

TEST(BenchServeErrorsTest, UnreachableServerExitsWith1AndOneLine) {
  for (const char* api : {"grpc", "worker", "http"}) {
    const ProcessResult r =
        testing::RunProcess({testing::BinaryPath("cohort"), "bench", "serve", "--target", "127.0.0.1:1", "--api", api,
                             "--vocab-size", "100", "--connect-timeout-s", "0.5"},
                            30);
    EXPECT_EQ(r.exit_code, 1) << api << ": " << r.err;
    EXPECT_NE(r.err.find("127.0.0.1:1"), std::string::npos) << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  }
}

TEST_F(BenchServeTest, RequestsLongerThanTheModelsContextAreRefusedBeforeSending) {
  const ProcessResult r = Bench({"--target", Router(), "--input-len", "500", "--output-len", "100"});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find("context of 512"), std::string::npos) << r.err;
}

// A worker asked as a router (the default --api), or a router asked as a worker: one line that
// names the other API, not gRPC's bare UNIMPLEMENTED.
TEST_F(BenchServeTest, TheWrongApiForTheTargetNamesTheRightOne) {
  const ProcessResult as_router = Bench({"--target", worker_->address(), "--num-requests", "1"});
  EXPECT_EQ(as_router.exit_code, 1) << as_router.err;
  EXPECT_NE(as_router.err.find("for a worker directly, pass --api worker"), std::string::npos) << as_router.err;
  EXPECT_EQ(std::count(as_router.err.begin(), as_router.err.end(), '\n'), 1) << as_router.err;

  const ProcessResult as_worker = Bench({"--target", Router(), "--api", "worker", "--num-requests", "1"});
  EXPECT_EQ(as_worker.exit_code, 1) << as_worker.err;
  EXPECT_NE(as_worker.err.find("for a router, leave out --api worker"), std::string::npos) << as_worker.err;
}

}  // namespace
}  // namespace cohort
