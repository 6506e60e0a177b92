// The numbers `cohort bench serve` reports, from hand-made request records (no server): lengths as
// asked, percentiles, the measured window, goodput; and the workloads it sends.
#include <fstream>

#include "gtest/gtest.h"
#include "tests/testing/paths.h"
#include "tools/cohort/bench_serve_stats.h"
#include "tools/cohort/bench_serve_workload.h"

namespace cohort::bench {
namespace {

using std::chrono::milliseconds;

TEST(LengthSpecTest, ParsesEveryFormAndDrawsWithinItsBounds) {
  std::mt19937_64 rng(1);
  absl::StatusOr<LengthSpec> fixed = LengthSpec::Parse("--input-len", "128");
  ASSERT_TRUE(fixed.ok()) << fixed.status();
  EXPECT_EQ(fixed->Draw(rng), 128);

  absl::StatusOr<LengthSpec> uniform = LengthSpec::Parse("--input-len", "uniform:10:20");
  ASSERT_TRUE(uniform.ok()) << uniform.status();
  absl::StatusOr<LengthSpec> normal = LengthSpec::Parse("--input-len", "normal:100:10");
  ASSERT_TRUE(normal.ok()) << normal.status();
  absl::StatusOr<LengthSpec> exponential = LengthSpec::Parse("--output-len", "exponential:50:400");
  ASSERT_TRUE(exponential.ok()) << exponential.status();
  EXPECT_EQ(normal->min(), 70);
  EXPECT_EQ(normal->max(), 130);
  double uniform_sum = 0, exponential_sum = 0;
  bool saw_min = false, saw_max = false;
  for (int i = 0; i < 4000; ++i) {
    const int64_t u = uniform->Draw(rng);
    ASSERT_GE(u, 10);
    ASSERT_LE(u, 20);
    saw_min |= u == 10;
    saw_max |= u == 20;
    uniform_sum += static_cast<double>(u);
    const int64_t n = normal->Draw(rng);
    ASSERT_GE(n, 70);
    ASSERT_LE(n, 130);
    const int64_t e = exponential->Draw(rng);
    ASSERT_GE(e, 1);
    ASSERT_LE(e, 400);
    exponential_sum += static_cast<double>(e);
  }
  EXPECT_TRUE(saw_min && saw_max);  // both bounds inclusive
  EXPECT_NEAR(uniform_sum / 4000, 15, 0.5);
  EXPECT_NEAR(exponential_sum / 4000, 50, 4);
}

TEST(LengthSpecTest, RejectsWhatIsNotALengthNamingTheFlag) {
  for (const char* bad : {"", "0", "-3", "abc", "uniform:5", "uniform:9:3", "uniform:0:4", "normal:0:3",
                          "normal:10:-1", "poisson:3:4", "uniform:a:b", "exponential:10:0"}) {
    absl::StatusOr<LengthSpec> spec = LengthSpec::Parse("--output-len", bad);
    ASSERT_FALSE(spec.ok()) << bad;
    EXPECT_TRUE(absl::IsInvalidArgument(spec.status()));
    EXPECT_NE(spec.status().message().find("--output-len"), std::string::npos) << spec.status();
  }
}

TEST(WorkloadTest, RandomPromptsShareTheirPrefixAndStayInTheVocabulary) {
  WorkloadOptions options;
  options.input_len = LengthSpec::Fixed(5);
  options.output_len = LengthSpec::Fixed(7);
  options.shared_prefix_len = 16;
  options.num_prefixes = 2;
  options.vocab_size = 50;
  options.seed = 3;
  auto workload = Workload::Create(options);
  ASSERT_TRUE(workload.ok()) << workload.status();
  std::vector<BenchRequest> requests;
  for (int i = 0; i < 6; ++i) requests.push_back((*workload)->Next());
  for (const BenchRequest& r : requests) {
    ASSERT_EQ(r.prompt_tokens(), 21);
    EXPECT_EQ(r.max_tokens, 7);
    for (uint32_t id : r.prompt_ids) EXPECT_LT(id, 50u);
  }
  auto prefix = [](const BenchRequest& r) { return std::vector<uint32_t>(r.prompt_ids.begin(), r.prompt_ids.begin() + 16); };
  EXPECT_EQ(prefix(requests[0]), prefix(requests[2]));  // the two prefixes take turns
  EXPECT_EQ(prefix(requests[1]), prefix(requests[5]));
  EXPECT_NE(prefix(requests[0]), prefix(requests[1]));
  EXPECT_NE(requests[0].prompt_ids, requests[2].prompt_ids);  // each its own question
  EXPECT_EQ((*workload)->MaxTotalTokens(), 28);
}

TEST(WorkloadTest, PromptsFileGivesTextAndIdsInOrderAndNamesTheBadLine) {
  testing::TempDir dir;
  const std::string path = dir.Join("prompts.jsonl");
  std::ofstream(path) << "{\"prompt\": \"Hello there\", \"output_len\": 3}\n\n{\"prompt_token_ids\": [4, 5, 6]}\n";
  auto workload = Workload::Create({.output_len = LengthSpec::Fixed(9), .prompts_file = path});
  ASSERT_TRUE(workload.ok()) << workload.status();
  BenchRequest first = (*workload)->Next();
  EXPECT_EQ(first.prompt_text, "Hello there");
  EXPECT_EQ(first.max_tokens, 3);
  BenchRequest second = (*workload)->Next();
  EXPECT_EQ(second.prompt_ids, (std::vector<uint32_t>{4, 5, 6}));
  EXPECT_EQ(second.max_tokens, 9);
  EXPECT_EQ((*workload)->Next().prompt_text, "Hello there");  // cycles
  EXPECT_EQ((*workload)->MaxTotalTokens(), -1);              // text: unknown until tokenized

  std::ofstream(path) << "{\"prompt\": [1, 2]}\n{\"prompt\": [1, -2]}\n";
  auto bad = Workload::Create({.prompts_file = path});
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("line 2"), std::string::npos) << bad.status();
  EXPECT_FALSE(Workload::Create({.prompts_file = dir.Join("missing.jsonl")}).ok());
  EXPECT_FALSE(Workload::Create(WorkloadOptions()).ok());  // random ids need the vocabulary size
}

TEST(SummarizeTest, PercentilesInterpolateBetweenRanks) {
  std::vector<double> values;
  for (int i = 100; i >= 1; --i) values.push_back(i);
  const Distribution d = Summarize(values);
  EXPECT_EQ(d.count, 100);
  EXPECT_DOUBLE_EQ(d.min, 1);
  EXPECT_DOUBLE_EQ(d.max, 100);
  EXPECT_DOUBLE_EQ(d.mean, 50.5);
  EXPECT_DOUBLE_EQ(d.p50, 50.5);
  EXPECT_NEAR(d.p90, 90.1, 1e-9);
  EXPECT_NEAR(d.p99, 99.01, 1e-9);
  EXPECT_EQ(Summarize({}).count, 0);
}

// A request sent at `sent_ms` whose tokens arrived one by one at the given times, ending 1 ms after.
std::unique_ptr<RequestRecord> Record(Clock::time_point t0, RequestRecord::Phase phase, int sent_ms,
                                      std::vector<int> token_ms) {
  auto r = std::make_unique<RequestRecord>();
  r->phase = phase;
  r->prompt_tokens = 10;
  r->max_tokens = static_cast<int64_t>(token_ms.size());
  r->sent = t0 + milliseconds(sent_ms);
  for (int ms : token_ms) r->arrivals.push_back({t0 + milliseconds(ms), 1});
  r->output_tokens = static_cast<int64_t>(token_ms.size());
  r->done = t0 + milliseconds(token_ms.back() + 1);
  return r;
}

TEST(SummarizeTest, ThroughputCountsEveryTokenInTheMeasuredWindowAndLatencyOnlyMeasuredRequests) {
  const Clock::time_point t0 = Clock::now();
  LoadResult result;
  result.plan = {.mode = LoadPlan::Mode::kClosed, .concurrency = 2, .warmup_requests = 1, .num_requests = 2};
  using P = RequestRecord::Phase;
  result.records.push_back(Record(t0, P::kWarmup, 0, {40, 60, 80, 100, 120}));  // 3 tokens fall in the window
  result.records.push_back(Record(t0, P::kMeasured, 79, {100, 110, 120, 130}));
  result.records.push_back(Record(t0, P::kMeasured, 121, {150, 170, 190}));
  result.records.push_back(Record(t0, P::kCooldown, 131, {160}));
  result.window_start = t0 + milliseconds(79);
  result.window_end = t0 + milliseconds(191);

  const RunSummary s = Summarize(result, {.ttft_ms = 25, .tpot_ms = 0});
  EXPECT_EQ(s.measured, 2);
  EXPECT_EQ(s.completed, 2);
  EXPECT_EQ(s.output_tokens, 7);
  EXPECT_NEAR(s.window_s, 0.112, 1e-9);
  // Tokens in [79, 191] ms: 3 of the warm-up's, 4 + 3 measured, 1 cool-down; completions: all 4.
  EXPECT_NEAR(s.output_throughput, 11 / 0.112, 1e-6);
  EXPECT_NEAR(s.request_throughput, 4 / 0.112, 1e-6);
  EXPECT_DOUBLE_EQ(s.ttft_ms.min, 21);  // 100 - 79
  EXPECT_DOUBLE_EQ(s.ttft_ms.max, 29);  // 150 - 121
  EXPECT_DOUBLE_EQ(s.tpot_ms.min, 10);  // (130 - 100) / 3
  EXPECT_DOUBLE_EQ(s.tpot_ms.max, 20);
  EXPECT_EQ(s.itl_ms.count, 5);
  EXPECT_DOUBLE_EQ(s.e2e_ms.max, 70);  // 191 - 121
  // Only the first measured request met TTFT <= 25 ms: half the throughput is goodput.
  EXPECT_EQ(s.slo_met, 1);
  EXPECT_NEAR(s.goodput, s.request_throughput / 2, 1e-9);
  const nlohmann::ordered_json json = ToJson(s);
  EXPECT_EQ(json["requests"].size(), 2u);
  EXPECT_EQ(json["concurrency"], 2);
  EXPECT_TRUE(json["request_rate"].is_null());
}

TEST(SummarizeTest, FailedRequestsCountAgainstGoodputAndKeepTheirError) {
  const Clock::time_point t0 = Clock::now();
  LoadResult result;
  result.plan = {.mode = LoadPlan::Mode::kOpen, .rate = 4, .num_requests = 2};
  result.records.push_back(Record(t0, RequestRecord::Phase::kMeasured, 0, {10, 20}));
  result.records.push_back(Record(t0, RequestRecord::Phase::kMeasured, 5, {12}));
  result.records.back()->status = absl::UnavailableError("worker gone");
  result.window_start = t0;
  result.window_end = t0 + milliseconds(21);
  const RunSummary s = Summarize(result, {});
  EXPECT_EQ(s.completed, 1);
  EXPECT_EQ(s.failed, 1);
  ASSERT_EQ(s.errors.size(), 1u);
  EXPECT_NE(s.errors[0].find("worker gone"), std::string::npos);
  EXPECT_NEAR(s.goodput, s.request_throughput / 2, 1e-9);
  EXPECT_LE(s.goodput, s.request_throughput);
  const std::string table = FormatTable({s}, {});
  EXPECT_NE(table.find("rate 4/s"), std::string::npos) << table;
  EXPECT_NE(table.find("worker gone"), std::string::npos) << table;
}

}  // namespace
}  // namespace cohort::bench
