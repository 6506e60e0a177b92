// `cohort-worker --scheduler static` as a client sees it: a short request sent while a long one runs
// waits for the long one's batch to end, where continuous batching answers it at once.
#include <grpcpp/grpcpp.h>

#include <atomic>
#include <future>
#include <thread>

#include "cohort/worker/v1/worker.grpc.pb.h"
#include "gtest/gtest.h"
#include "tests/testing/generate_client.h"
#include "tests/testing/paths.h"
#include "tests/testing/server_process.h"
#include "tests/testing/subprocess.h"

namespace cohort {
namespace {

using Clock = std::chrono::steady_clock;
using cohort::worker::v1::Worker;

struct Latencies {
  double long_s = 0;   // the long request, sent to done
  double short_s = 0;  // the short one, sent to done
};

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// A 400-token request; once its first token arrived, a 1-token request. Compared as latencies (not
// as the order the streams end in, which delivery may blur by a step).
Latencies LongThenShort(const std::string& scheduler) {
  auto worker = testing::WorkerProcess::Start(testing::SourcePath("tests/fixtures/models/v3_plain"),
                                              {"--scheduler", scheduler, "--metrics-port", "-1"});
  EXPECT_NE(worker, nullptr);
  if (worker == nullptr) return {};
  auto stub = Worker::NewStub(worker->Channel());
  std::atomic<int> first_token{0};
  Latencies latencies;
  std::future<void> long_request = std::async(std::launch::async, [&] {
    grpc::ClientContext context;
    const auto sent = Clock::now();
    auto reader = stub->Generate(&context, testing::Greedy({5, 6, 7, 8}, 400));
    const testing::StreamResult r = testing::ReadStream(*reader, &first_token);
    latencies.long_s = Seconds(Clock::now() - sent);
    EXPECT_TRUE(r.status.ok()) << r.status.error_message();
    EXPECT_EQ(r.tokens.size(), 400u);
  });
  while (first_token.load() == 0) std::this_thread::sleep_for(std::chrono::microseconds(200));
  grpc::ClientContext context;
  const auto sent = Clock::now();
  auto reader = stub->Generate(&context, testing::Greedy({9, 10, 11}, 1));
  const testing::StreamResult r = testing::ReadStream(*reader);
  latencies.short_s = Seconds(Clock::now() - sent);
  EXPECT_TRUE(r.status.ok()) << r.status.error_message();
  long_request.get();
  return latencies;
}

TEST(WorkerStaticBatchingTest, LateShortRequestWaitsForTheRunningBatchUnderStaticOnly) {
  // Continuous: the short request joins the next step and is done within a few of them.
  const Latencies continuous = LongThenShort("continuous");
  EXPECT_LT(continuous.short_s, continuous.long_s / 4) << continuous.short_s << " s vs " << continuous.long_s << " s";
  // Static: it waits for the other 399 steps of the running batch.
  const Latencies static_batching = LongThenShort("static");
  EXPECT_GT(static_batching.short_s, static_batching.long_s / 2)
      << static_batching.short_s << " s vs " << static_batching.long_s << " s";
}

TEST(WorkerStaticBatchingTest, UnknownSchedulerIsABadFlag) {
  const testing::ProcessResult r = testing::RunProcess(
      {testing::BinaryPath("cohort-worker"), "--model", testing::SourcePath("tests/fixtures/models/v3_plain"),
       "--scheduler", "fifo"});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("--scheduler: 'fifo' is neither continuous nor static"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace cohort
