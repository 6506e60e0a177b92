// cohort-worker as a client sees it: a real process on 127.0.0.1, spoken to over gRPC.
#include <grpcpp/grpcpp.h>
#include <signal.h>

#include <atomic>
#include <future>
#include <random>
#include <thread>

#include "cohort/worker/v1/worker.grpc.pb.h"
#include "gtest/gtest.h"
#include "tests/testing/fixtures.h"
#include "tests/testing/generate_client.h"
#include "tests/testing/http_scrape.h"
#include "tests/testing/paths.h"
#include "tests/testing/server_process.h"
#include "tests/testing/subprocess.h"

namespace cohort {
namespace {

using cohort::v1::GenerateRequest;
using cohort::v1::GenerateResponse;
using cohort::worker::v1::LoadReport;
using cohort::worker::v1::Worker;
using testing::Greedy;
using testing::StreamResult;
using testing::WorkerProcess;

// One stream on the worker, read to its end.
testing::StreamResult Generate(Worker::Stub& stub, const GenerateRequest& request,
                               grpc::ClientContext* context = nullptr) {
  grpc::ClientContext own;
  auto reader = stub.Generate(context != nullptr ? context : &own, request);
  return testing::ReadStream(*reader);
}

// Reads load reports until `done(report)` or `timeout_ms`; returns whether it was satisfied.
bool WaitForLoad(Worker::Stub& stub, const std::function<bool(const LoadReport&)>& done, int timeout_ms = 5000) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(timeout_ms));
  auto reader = stub.StreamLoad(&ctx, {});
  LoadReport report;
  while (reader->Read(&report)) {
    if (done(report)) {
      ctx.TryCancel();
      reader->Finish();
      return true;
    }
  }
  reader->Finish();
  return false;
}

std::vector<int32_t> RandomPrompt(std::mt19937& rng, int vocab) {
  std::vector<int32_t> prompt(3 + rng() % 30);
  for (auto& t : prompt) t = 2 + static_cast<int32_t>(rng() % (vocab - 2));
  return prompt;
}

TEST(WorkerTest, ConcurrentStreamsGiveTheSameGreedyTokensAsSequentialOnes) {
  const testing::Fixture fixture = testing::LoadFixture("v2_lite_like");
  auto worker = WorkerProcess::Start(fixture.model_dir, {"--max-batch-tokens", "64", "--kv-block-size", "8"});
  ASSERT_NE(worker, nullptr);
  auto stub = Worker::NewStub(worker->Channel());

  std::mt19937 rng(5);
  std::vector<std::vector<int32_t>> prompts;
  for (const auto& c : fixture.cases) prompts.push_back(c.prompt);
  while (prompts.size() < 32) prompts.push_back(RandomPrompt(rng, 512));

  std::vector<std::vector<int32_t>> sequential;
  for (const auto& p : prompts) {
    StreamResult r = Generate(*stub, Greedy(p, 10));
    ASSERT_TRUE(r.status.ok()) << r.status.error_message();
    EXPECT_EQ(r.final.finish_reason(), cohort::v1::FINISH_REASON_LENGTH);
    EXPECT_EQ(r.final.usage().completion_tokens(), 10u);
    sequential.push_back(r.tokens);
  }
  for (size_t c = 0; c < fixture.cases.size(); ++c) {
    EXPECT_EQ(sequential[c], fixture.cases[c].generated) << "transformers' greedy tokens, case " << c;
  }

  std::vector<std::future<StreamResult>> concurrent;
  for (const auto& p : prompts) {
    concurrent.push_back(std::async(std::launch::async, [&stub, p] { return Generate(*stub, Greedy(p, 10)); }));
  }
  for (size_t i = 0; i < prompts.size(); ++i) {
    StreamResult r = concurrent[i].get();
    ASSERT_TRUE(r.status.ok()) << r.status.error_message();
    EXPECT_EQ(r.tokens, sequential[i]) << "stream " << i;
  }
}

// A KV cache far smaller than the concurrent streams need: requests are preempted and recomputed,
// and every stream must still get exactly the tokens it gets alone.
TEST(WorkerTest, PreemptedStreamsStillGetTheirExactTokens) {
  const std::string model = testing::SourcePath("tests/fixtures/models/v2_lite_like");
  // v2_lite_like caches 3 layers x 40 floats per token: 3840 bytes per block of 8 tokens. 40 blocks
  // hold 320 tokens; 24 streams of up to 45 tokens need about 1000.
  auto worker = WorkerProcess::Start(model, {"--kv-block-size", "8", "--kv-cache-bytes", "153600",
                                             "--max-batch-tokens", "128"});
  ASSERT_NE(worker, nullptr);
  auto stub = Worker::NewStub(worker->Channel());
  std::mt19937 rng(9);
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < 24; ++i) prompts.push_back(RandomPrompt(rng, 512));
  std::vector<std::vector<int32_t>> alone;
  for (const auto& p : prompts) {
    StreamResult r = Generate(*stub, Greedy(p, 12));
    ASSERT_TRUE(r.status.ok()) << r.status.error_message();
    alone.push_back(r.tokens);
  }
  std::vector<std::future<StreamResult>> together;
  for (const auto& p : prompts) {
    together.push_back(std::async(std::launch::async, [&stub, p] { return Generate(*stub, Greedy(p, 12)); }));
  }
  for (size_t i = 0; i < prompts.size(); ++i) {
    StreamResult r = together[i].get();
    ASSERT_TRUE(r.status.ok()) << r.status.error_message();
    EXPECT_EQ(r.tokens, alone[i]) << "stream " << i;
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // metrics follow the next load report
  EXPECT_GT(testing::MetricValue(testing::HttpGet("127.0.0.1", worker->metrics_port(), "/metrics"), "cohort_worker_preemptions_total"), 0)
      << "the cache was meant to be too small for the batch";
}

// The demo model carries its tokenizer: text in, text out, stop strings and chat.
TEST(WorkerTest, TextPromptsStreamTextAndStopStringsNeverLeak) {
  const testing::Fixture fixture = testing::LoadFixture("demo");
  auto worker = WorkerProcess::Start(fixture.model_dir, {});
  ASSERT_NE(worker, nullptr);
  auto stub = Worker::NewStub(worker->Channel());

  GenerateRequest text;
  text.set_text("The meaning of life is");  // the fixture's first prompt, tokenized with BOS by the worker
  text.mutable_sampling()->set_temperature(0.0f);
  text.mutable_stopping()->set_max_tokens(16);
  text.mutable_stopping()->set_ignore_eos(true);
  StreamResult r = Generate(*stub, text);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.tokens, fixture.cases[0].generated) << "transformers' greedy tokens";
  EXPECT_EQ(r.final.usage().prompt_tokens(), fixture.cases[0].prompt.size());
  EXPECT_EQ(r.text, " the process of casting.\n\t\t-- Ogden Nash");

  // A stop string ends the text right before it, and nothing after it is ever sent.
  text.mutable_stopping()->add_stop("casting");
  StreamResult stopped = Generate(*stub, text);
  ASSERT_TRUE(stopped.status.ok());
  EXPECT_EQ(stopped.text, " the process of ");
  EXPECT_EQ(stopped.final.finish_reason(), cohort::v1::FINISH_REASON_STOP);

  GenerateRequest chat;
  auto* message = chat.mutable_chat()->add_messages();
  message->set_role("user");
  message->set_content("Tell me a joke");
  chat.mutable_stopping()->set_max_tokens(8);
  StreamResult reply = Generate(*stub, chat);
  ASSERT_TRUE(reply.status.ok()) << reply.status.error_message();
  EXPECT_GT(reply.final.usage().prompt_tokens(), 4u);  // BOS, user and assistant markers, the words
  EXPECT_FALSE(reply.tokens.empty());

  message->set_role("tool");
  EXPECT_EQ(Generate(*stub, chat).status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
}

TEST(WorkerTest, SharedPrefixIsReportedAsCachedPromptTokens) {
  auto worker = WorkerProcess::Start(testing::SourcePath("tests/fixtures/models/v3_plain"), {"--kv-block-size", "4"});
  ASSERT_NE(worker, nullptr);
  auto stub = Worker::NewStub(worker->Channel());
  std::vector<int32_t> system(12);
  for (int i = 0; i < 12; ++i) system[i] = 100 + i;
  ASSERT_TRUE(Generate(*stub, Greedy(system, 2)).status.ok());
  std::vector<int32_t> prompt = system;
  prompt.insert(prompt.end(), {7, 8, 9});
  StreamResult r = Generate(*stub, Greedy(prompt, 2));
  ASSERT_TRUE(r.status.ok());
  EXPECT_EQ(r.final.usage().cached_prompt_tokens(), 12u);
  EXPECT_EQ(r.final.usage().prompt_tokens(), 15u);
}

TEST(WorkerTest, CancellingAStreamFreesItsBlocks) {
  auto worker = WorkerProcess::Start(testing::SourcePath("tests/fixtures/models/v3_plain"),
                                     {"--prefix-caching=false", "--kv-cache-bytes", "4000000"});
  ASSERT_NE(worker, nullptr);
  auto stub = Worker::NewStub(worker->Channel());
  uint32_t total_blocks = 0;
  ASSERT_TRUE(WaitForLoad(*stub, [&](const LoadReport& r) {
    total_blocks = r.total_kv_blocks();
    return r.free_kv_blocks() == r.total_kv_blocks();
  }));

  grpc::ClientContext ctx;
  auto reader = stub->Generate(&ctx, Greedy({5, 6, 7, 8, 9}, 480));
  GenerateResponse first;
  ASSERT_TRUE(reader->Read(&first));
  EXPECT_TRUE(WaitForLoad(*stub, [&](const LoadReport& r) { return r.running_requests() == 1 && r.free_kv_blocks() < total_blocks; }));
  ctx.TryCancel();
  GenerateResponse ignored;
  while (reader->Read(&ignored)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_TRUE(WaitForLoad(*stub, [&](const LoadReport& r) {
    return r.running_requests() == 0 && r.free_kv_blocks() == total_blocks;
  })) << "blocks were not freed after cancellation";

  // A deadline ends a request the same way.
  grpc::ClientContext short_ctx;
  short_ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(100));
  StreamResult late = Generate(*stub, Greedy({5, 6, 7}, 480), &short_ctx);
  EXPECT_EQ(late.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_TRUE(WaitForLoad(*stub, [&](const LoadReport& r) {
    return r.running_requests() == 0 && r.free_kv_blocks() == total_blocks;
  }));
}

TEST(WorkerTest, FullQueueGivesResourceExhausted) {
  // The fixture with the longest context, so that a request runs as long as a fixture can: 1000
  // tokens of this tiny model still take only a fraction of a second, and on a loaded machine the
  // first request can end before the second is queued behind it (or before a load report shows
  // the pair). An attempt whose first request ended on its own (not cancelled) proves nothing and
  // is made again; a third request accepted while the first was still running fails the test.
  auto worker = WorkerProcess::Start(testing::SourcePath("tests/fixtures/models/v2_group_limited"),
                                     {"--max-running", "1", "--max-queue", "1"});
  ASSERT_NE(worker, nullptr);
  auto stub = Worker::NewStub(worker->Channel());
  for (int attempt = 1; attempt <= 5; ++attempt) {
    SCOPED_TRACE(::testing::Message() << "attempt " << attempt);
    grpc::ClientContext running_ctx, waiting_ctx;
    // Requests not yet running count against the queue, so the second is sent once the first runs.
    auto running =
        std::async(std::launch::async, [&] { return Generate(*stub, Greedy({1, 2, 3}, 1000), &running_ctx); });
    const bool first_runs = WaitForLoad(*stub, [](const LoadReport& r) { return r.running_requests() == 1; });
    std::future<StreamResult> waiting;
    bool queued = false;
    StreamResult refused;
    if (first_runs) {
      waiting = std::async(std::launch::async,
                           [&] { return Generate(*stub, Greedy({4, 5, 6}, 1000), &waiting_ctx); });
      queued = WaitForLoad(*stub,
                           [](const LoadReport& r) { return r.running_requests() == 1 && r.waiting_requests() == 1; });
      if (queued) refused = Generate(*stub, Greedy({7, 8, 9}, 5));
    }
    running_ctx.TryCancel();
    waiting_ctx.TryCancel();
    const bool first_ended_alone = running.get().status.ok();
    if (waiting.valid()) waiting.get();
    const bool was_refused = refused.status.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED;
    if (!was_refused && first_ended_alone) continue;  // the race above: try again
    ASSERT_TRUE(first_runs) << "the first request never showed as running";
    ASSERT_TRUE(queued) << "the second request never showed as waiting behind the first";
    EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
    EXPECT_NE(refused.status.error_message().find("--max-queue"), std::string::npos)
        << refused.status.error_message();
    return;
  }
  FAIL() << "the first request ended on its own in every attempt";
}

TEST(WorkerTest, InvalidRequestsNameTheField) {
  auto worker = WorkerProcess::Start(testing::SourcePath("tests/fixtures/models/v3_plain"), {});
  ASSERT_NE(worker, nullptr);
  auto stub = Worker::NewStub(worker->Channel());
  struct Case {
    const char* what;
    std::function<void(GenerateRequest&)> edit;
    grpc::StatusCode code;
    const char* message;
  };
  const std::vector<Case> cases = {
      {"negative temperature", [](auto& r) { r.mutable_sampling()->set_temperature(-1); },
       grpc::StatusCode::INVALID_ARGUMENT, "sampling.temperature"},
      {"top_p above 1", [](auto& r) { r.mutable_sampling()->set_top_p(1.5f); }, grpc::StatusCode::INVALID_ARGUMENT,
       "sampling.top_p"},
      {"max_tokens past context", [](auto& r) { r.mutable_stopping()->set_max_tokens(100000); },
       grpc::StatusCode::INVALID_ARGUMENT, "stopping.max_tokens"},
      {"token outside vocabulary", [](auto& r) { r.mutable_token_ids()->add_ids(99999); },
       grpc::StatusCode::INVALID_ARGUMENT, "99999"},
      {"empty prompt", [](auto& r) { r.clear_token_ids(); }, grpc::StatusCode::INVALID_ARGUMENT, "prompt"},
      {"unknown model", [](auto& r) { r.set_model("gpt-17"); }, grpc::StatusCode::NOT_FOUND, "gpt-17"},
      {"text prompt without tokenizer", [](auto& r) { r.set_text("hello"); }, grpc::StatusCode::UNIMPLEMENTED,
       "tokenizer"},
  };
  for (const Case& c : cases) {
    GenerateRequest request = Greedy({1, 2, 3}, 4);
    c.edit(request);
    StreamResult r = Generate(*stub, request);
    EXPECT_EQ(r.status.error_code(), c.code) << c.what << ": " << r.status.error_message();
    EXPECT_NE(r.status.error_message().find(c.message), std::string::npos) << c.what << ": " << r.status.error_message();
  }
  // The worker is still healthy afterwards.
  EXPECT_TRUE(Generate(*stub, Greedy({1, 2, 3}, 4)).status.ok());
}

TEST(WorkerTest, SigtermDrainsRunningRequestsAndRefusesNewOnes) {
  auto worker = WorkerProcess::Start(testing::SourcePath("tests/fixtures/models/v3_plain"), {"--drain-timeout", "20"});
  ASSERT_NE(worker, nullptr);
  auto stub = Worker::NewStub(worker->Channel());
  grpc::ClientContext ctx;
  auto reader = stub->Generate(&ctx, Greedy({3, 4, 5}, 400));
  GenerateResponse response;
  ASSERT_TRUE(reader->Read(&response));
  worker->Signal(SIGTERM);
  ASSERT_TRUE(WaitForLoad(*stub, [](const LoadReport& r) {
    return r.state() == cohort::worker::v1::WORKER_STATE_DRAINING;
  }));
  StreamResult refused = Generate(*stub, Greedy({1}, 2));
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::UNAVAILABLE);

  int tokens = static_cast<int>(response.chunk().token_ids_size());
  cohort::v1::Final final;
  while (reader->Read(&response)) {
    tokens += response.chunk().token_ids_size();
    if (response.has_final()) final = response.final();
  }
  EXPECT_TRUE(reader->Finish().ok());
  EXPECT_EQ(tokens, 400);
  EXPECT_EQ(final.finish_reason(), cohort::v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(worker->Wait(20), 0) << worker->Log();
}

TEST(WorkerTest, PrometheusMetricsCountTheWork) {
  auto worker = WorkerProcess::Start(testing::SourcePath("tests/fixtures/models/v3_plain"), {});
  ASSERT_NE(worker, nullptr);
  auto stub = Worker::NewStub(worker->Channel());
  ASSERT_TRUE(Generate(*stub, Greedy({1, 2, 3, 4}, 6)).status.ok());
  ASSERT_TRUE(Generate(*stub, Greedy({1, 2, 3, 4}, 6)).status.ok());
  // Counters are updated with the next load report (at most 100 ms later).
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  const std::string text = testing::HttpGet("127.0.0.1", worker->metrics_port(), "/metrics");
  EXPECT_EQ(testing::MetricValue(text, "cohort_worker_generated_tokens_total"), 12) << text;
  EXPECT_EQ(testing::MetricValue(text, "cohort_worker_prompt_tokens_total"), 8) << text;
  EXPECT_EQ(testing::MetricValue(text, "cohort_worker_requests_finished_total"), 2) << text;
  EXPECT_EQ(testing::MetricValue(text, "cohort_worker_time_to_first_token_seconds_count"), 2) << text;
  EXPECT_GT(testing::MetricValue(text, "cohort_worker_kv_blocks_total"), 0) << text;
  EXPECT_EQ(testing::MetricValue(text, "cohort_worker_requests_running"), 0) << text;
}

// The batching-economics metrics (worker/server/metrics.h): every step's bytes, FLOPs, utilization
// and cost, with the KV bytes exactly those the request's steps attended to and wrote.
TEST(WorkerTest, EconomicsMetricsDescribeEveryStep) {
  // $3600 an hour is $1 a second: the cost counter must equal the seconds spent in steps.
  auto worker = WorkerProcess::Start(testing::SourcePath("tests/fixtures/models/v3_plain"),
                                     {"--gpu-hour-cost", "3600", "--model-name", "econ"});
  ASSERT_NE(worker, nullptr);
  auto stub = Worker::NewStub(worker->Channel());
  ASSERT_TRUE(Generate(*stub, Greedy({1, 2, 3, 4}, 6)).status.ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  const std::string text = testing::HttpGet("127.0.0.1", worker->metrics_port(), "/metrics");
  auto value = [&](const std::string& name) { return testing::MetricValue(text, name, "model=\"econ\""); };

  // One prefill step of 4 tokens, then 5 decode steps.
  ASSERT_EQ(testing::MetricValue(text, "cohort_worker_step_time_seconds_count"), 6) << text;
  for (const char* histogram : {"cohort_worker_step_weight_read_bytes", "cohort_worker_step_kv_read_bytes",
                                "cohort_worker_step_kv_write_bytes", "cohort_worker_step_flops",
                                "cohort_worker_memory_bandwidth_utilization_ratio",
                                "cohort_worker_flops_utilization_ratio"}) {
    EXPECT_EQ(value(std::string(histogram) + "_count"), 6) << histogram << "\n" << text;
    EXPECT_GT(value(std::string(histogram) + "_sum"), 0) << histogram << "\n" << text;
  }
  // v3_plain caches 3 layers x (32 + 8) float32 values per token: 480 bytes. The steps read
  // positions 0..3, then 0..4, ..., 0..8 (4 + 5 + 6 + 7 + 8 + 9 = 39 entries) and wrote 9.
  EXPECT_EQ(value("cohort_worker_step_kv_read_bytes_sum"), 39 * 480) << text;
  EXPECT_EQ(value("cohort_worker_step_kv_write_bytes_sum"), 9 * 480) << text;
  // Weights: at least the attention and dense parts once per step (float32, > 100 KB for v3_plain).
  EXPECT_GT(value("cohort_worker_step_weight_read_bytes_sum"), 6 * 100e3) << text;
  // The CPU backend measured its own peaks (not the H200 defaults).
  EXPECT_GT(value("cohort_worker_peak_memory_bandwidth_bytes_per_second"), 0) << text;
  EXPECT_LT(value("cohort_worker_peak_memory_bandwidth_bytes_per_second"), 4.8e12) << text;
  EXPECT_GT(value("cohort_worker_peak_flops_per_second"), 0) << text;
  EXPECT_LT(value("cohort_worker_peak_flops_per_second"), 989e12) << text;
  EXPECT_NE(worker->Log().find("measured this machine"), std::string::npos) << worker->Log();

  EXPECT_EQ(value("cohort_worker_device_cost_dollars_per_hour"), 3600) << text;
  const double step_seconds = testing::MetricValue(text, "cohort_worker_step_time_seconds_sum");
  EXPECT_GT(step_seconds, 0) << text;
  EXPECT_NEAR(value("cohort_worker_step_cost_dollars_total"), step_seconds, 1e-9 * step_seconds + 1e-12) << text;
}

TEST(WorkerTest, PeakFlagsReplaceTheCpuMeasurement) {
  auto worker = WorkerProcess::Start(testing::SourcePath("tests/fixtures/models/v3_plain"),
                                     {"--peak-memory-bandwidth", "50", "--peak-tflops", "0.5"});
  ASSERT_NE(worker, nullptr);
  const std::string text = testing::HttpGet("127.0.0.1", worker->metrics_port(), "/metrics");
  EXPECT_EQ(testing::MetricValue(text, "cohort_worker_peak_memory_bandwidth_bytes_per_second", "model="), 50e9)
      << text;
  EXPECT_EQ(testing::MetricValue(text, "cohort_worker_peak_flops_per_second", "model="), 0.5e12) << text;
  EXPECT_EQ(testing::MetricValue(text, "cohort_worker_device_cost_dollars_per_hour", "model="), 3) << text;
  EXPECT_EQ(worker->Log().find("measured this machine"), std::string::npos) << worker->Log();
}

// Spreading a model over GPUs needs the CUDA backend: asked of another, the worker stops at once
// with one line that says so.
TEST(WorkerTest, GpusAboveOneWithoutCudaIsOneClearLine) {
  const testing::ProcessResult r =
      testing::RunProcess({testing::BinaryPath("cohort-worker"), "--model",
                           testing::SourcePath("tests/fixtures/models/v3_plain"), "--gpus", "2", "--port", "0"});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("--gpus 2: give at least 1, and more than 1 only with --device cuda"), std::string::npos)
      << r.err;
}

// A group that spans processes is GPU work too, and a follower needs a rank: each mistake is one
// line at start-up.
TEST(WorkerTest, GroupFlagsWithoutCudaOrARankAreOneClearLine) {
  const std::string model = testing::SourcePath("tests/fixtures/models/v3_plain");
  const testing::ProcessResult leader = testing::RunProcess(
      {testing::BinaryPath("cohort-worker"), "--model", model, "--world-size", "2", "--port", "0"});
  EXPECT_NE(leader.exit_code, 0);
  EXPECT_NE(leader.err.find("--world-size 2: give at least 1, and more than 1 only with --device cuda"),
            std::string::npos)
      << leader.err;
  const testing::ProcessResult follower = testing::RunProcess(
      {testing::BinaryPath("cohort-worker"), "--model", model, "--group-leader", "127.0.0.1:1", "--port", "0"});
  EXPECT_NE(follower.exit_code, 0);
  EXPECT_NE(follower.err.find("--group-leader: a follower has --rank 1 or more (got 0)"), std::string::npos)
      << follower.err;
}

}  // namespace
}  // namespace cohort
