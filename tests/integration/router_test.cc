// cohort-router in front of real cohort-worker processes, spoken to over gRPC on 127.0.0.1.
#include <grpcpp/grpcpp.h>
#include <signal.h>

#include <fstream>
#include <future>
#include <random>
#include <thread>

#include "cohort/v1/inference.grpc.pb.h"
#include "cohort/worker/v1/worker.grpc.pb.h"
#include "gtest/gtest.h"
#include "tests/testing/generate_client.h"
#include "tests/testing/http_scrape.h"
#include "tests/testing/paths.h"
#include "tests/testing/server_process.h"

namespace cohort {
namespace {

using cohort::v1::GenerateRequest;
using cohort::v1::GenerateResponse;
using cohort::v1::Inference;
using testing::Greedy;
using testing::RouterProcess;
using testing::StreamResult;
using testing::ServerProcess;
using testing::WorkerProcess;

const char* kModel = "tests/fixtures/models/v2_group_limited";  // the longest context: slow enough to kill mid-run

// One stream through the router, read to its end within `timeout_s`.
StreamResult Generate(Inference::Stub& stub, const GenerateRequest& request, int timeout_s = 60,
                      std::atomic<int>* first_token = nullptr) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(timeout_s));
  auto reader = stub.Generate(&ctx, request);
  return testing::ReadStream(*reader, first_token);
}

std::vector<int32_t> RandomPrompt(std::mt19937& rng, int length) {
  std::vector<int32_t> prompt(length);
  for (auto& t : prompt) t = 2 + static_cast<int32_t>(rng() % 500);
  return prompt;
}

// Requests the worker has finished, from its /metrics.
double Finished(const ServerProcess& worker, const std::string& ip = "127.0.0.1") {
  return testing::MetricValue(testing::HttpGet(ip, worker.metrics_port(), "/metrics"),
                              "cohort_worker_requests_finished_total");
}

// Waits until the router reports `count` workers up (its own /metrics), so tests do not race the
// load-report subscriptions.
bool WaitForWorkersUp(const ServerProcess& router, int count, int timeout_ms = 10000) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  while (std::chrono::steady_clock::now() < deadline) {
    const std::string text = testing::HttpGet("127.0.0.1", router.metrics_port(), "/metrics");
    int up = 0;
    for (size_t pos = 0; (pos = text.find("\ncohort_router_worker_up{", pos)) != std::string::npos; ++pos) {
      if (text.compare(text.find('}', pos) + 1, 2, " 1") == 0) ++up;
    }
    if (up >= count) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return false;
}

class RouterTest : public ::testing::Test {
 protected:
  void StartWorkersAndRouter(int workers, const std::vector<std::string>& router_args = {}) {
    std::vector<std::string> addresses;
    for (int i = 0; i < workers; ++i) {
      workers_.push_back(WorkerProcess::Start(testing::SourcePath(kModel), {"--kv-block-size", "8"}));
      ASSERT_NE(workers_.back(), nullptr);
      addresses.push_back(workers_.back()->address());
    }
    router_ = RouterProcess::Start(addresses, router_args);
    ASSERT_NE(router_, nullptr);
    ASSERT_TRUE(WaitForWorkersUp(*router_, workers)) << router_->Log();
    stub_ = Inference::NewStub(router_->Channel());
  }
  std::vector<std::unique_ptr<ServerProcess>> workers_;
  std::unique_ptr<ServerProcess> router_;
  std::unique_ptr<Inference::Stub> stub_;
};

TEST_F(RouterTest, RequestsSpreadOverWorkersByLoad) {
  StartWorkersAndRouter(2);
  std::mt19937 rng(3);
  std::vector<std::future<StreamResult>> calls;
  for (int i = 0; i < 16; ++i) {
    calls.push_back(std::async(std::launch::async, [this, p = RandomPrompt(rng, 20)] {
      return Generate(*stub_, Greedy(p, 40));
    }));
  }
  for (auto& c : calls) EXPECT_TRUE(c.get().status.ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(200));  // worker counters follow their next report
  const double a = Finished(*workers_[0]), b = Finished(*workers_[1]);
  EXPECT_EQ(a + b, 16);
  EXPECT_GE(std::min(a, b), 3) << "16 concurrent requests should not pile onto one worker: " << a << " vs " << b;
}

TEST_F(RouterTest, SharedPrefixLandsOnTheWorkerThatCachedIt) {
  StartWorkersAndRouter(2);
  std::mt19937 rng(4);
  const std::vector<int32_t> system = RandomPrompt(rng, 32);  // four full blocks of 8
  std::vector<int32_t> first = system;
  first.push_back(7);
  ASSERT_TRUE(Generate(*stub_, Greedy(first, 2)).status.ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // the cache events reach the router
  for (int i = 0; i < 6; ++i) {
    std::vector<int32_t> prompt = system;
    prompt.push_back(100 + i);
    StreamResult r = Generate(*stub_, Greedy(prompt, 2));
    ASSERT_TRUE(r.status.ok()) << r.status.error_message();
    // Cached prompt tokens are only possible on the worker that computed the prefix.
    EXPECT_EQ(r.final.usage().cached_prompt_tokens(), 32u) << "request " << i;
  }
}

TEST_F(RouterTest, KilledWorkerLosesNoUnstreamedRequestAndEndsStreamedOnes) {
  StartWorkersAndRouter(2, {"--max-retries", "2"});
  std::mt19937 rng(5);
  std::atomic<int> streaming{0};
  std::vector<std::future<StreamResult>> long_calls;
  for (int i = 0; i < 8; ++i) {
    long_calls.push_back(std::async(std::launch::async, [&, p = RandomPrompt(rng, 10)] {
      return Generate(*stub_, Greedy(p, 900), 60, &streaming);
    }));
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (streaming.load() < 8 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  ASSERT_EQ(streaming.load(), 8);
  workers_[0]->Signal(SIGKILL);
  // Requests sent right after the kill may still be routed to the dead worker: they must be retried.
  std::vector<std::future<StreamResult>> new_calls;
  for (int i = 0; i < 6; ++i) {
    new_calls.push_back(std::async(std::launch::async, [&, p = RandomPrompt(rng, 10)] {
      return Generate(*stub_, Greedy(p, 5));
    }));
  }
  for (auto& c : new_calls) {
    StreamResult r = c.get();
    EXPECT_TRUE(r.status.ok()) << r.status.error_message();
    EXPECT_EQ(r.tokens.size(), 5u);
  }
  int completed = 0, broken = 0;
  for (auto& c : long_calls) {
    StreamResult r = c.get();  // none may hang: each ends within its 60 s deadline at the latest
    if (r.status.ok()) {
      ++completed;
      EXPECT_EQ(r.tokens.size(), 900u);
    } else {
      ++broken;
      EXPECT_EQ(r.status.error_code(), grpc::StatusCode::UNAVAILABLE) << r.status.error_message();
      EXPECT_NE(r.status.error_message().find("after streaming"), std::string::npos) << r.status.error_message();
    }
  }
  EXPECT_GT(broken, 0) << "some streams were on the killed worker";
  EXPECT_GT(completed, 0) << "the other worker's streams finish";
}

TEST_F(RouterTest, RestartedRouterServesWithNoOtherAction) {
  StartWorkersAndRouter(1);
  ASSERT_TRUE(Generate(*stub_, Greedy({1, 2, 3}, 3)).status.ok());
  router_->Signal(SIGKILL);
  router_->Wait(5);
  router_ = RouterProcess::Start({workers_[0]->address()}, {});
  ASSERT_NE(router_, nullptr);
  ASSERT_TRUE(WaitForWorkersUp(*router_, 1));
  auto stub = Inference::NewStub(router_->Channel());
  StreamResult r = Generate(*stub, Greedy({1, 2, 3}, 3));
  EXPECT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.tokens.size(), 3u);
}

TEST_F(RouterTest, ClientCancellationAndDeadlineReachTheWorker) {
  StartWorkersAndRouter(1);
  auto worker = cohort::worker::v1::Worker::NewStub(workers_[0]->Channel());
  // Idle within 100 ms: far sooner than the 1000-token requests below would end by themselves.
  auto worker_idle = [&] {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(100));
    auto reader = worker->StreamLoad(&ctx, {});
    cohort::worker::v1::LoadReport report;
    while (reader->Read(&report)) {
      if (report.running_requests() == 0 && report.waiting_requests() == 0) {
        ctx.TryCancel();
        reader->Finish();
        return true;
      }
    }
    reader->Finish();
    return false;
  };

  grpc::ClientContext ctx;
  auto reader = stub_->Generate(&ctx, Greedy({1, 2, 3}, 1000));
  GenerateResponse response;
  ASSERT_TRUE(reader->Read(&response));
  ctx.TryCancel();
  while (reader->Read(&response)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_TRUE(worker_idle()) << "the worker still runs a request its client cancelled";

  grpc::ClientContext short_ctx;
  short_ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(100));
  auto late = stub_->Generate(&short_ctx, Greedy({1, 2, 3}, 1000));
  while (late->Read(&response)) {
  }
  EXPECT_EQ(late->Finish().error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_TRUE(worker_idle()) << "the worker still runs a request whose deadline passed";
}

TEST_F(RouterTest, UnknownModelIsNotFoundAndBadFieldsPassThrough) {
  StartWorkersAndRouter(1);
  GenerateRequest unknown = Greedy({1, 2}, 2);
  unknown.set_model("no-such-model");
  EXPECT_EQ(Generate(*stub_, unknown).status.error_code(), grpc::StatusCode::NOT_FOUND);
  GenerateRequest bad = Greedy({1, 2}, 2);
  bad.mutable_sampling()->set_top_p(2.0f);
  StreamResult r = Generate(*stub_, bad);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(r.status.error_message().find("top_p"), std::string::npos);
}

TEST(RouterQueueTest, FullWorkersAreWaitedForThenResourceExhausted) {
  // One slot, one queue place: a long request runs, a second waits; a third is refused by the
  // worker and held by the router until there is room, or refused after --queue-timeout-ms.
  auto worker = WorkerProcess::Start(testing::SourcePath(kModel), {"--max-running", "1", "--max-queue", "1"});
  ASSERT_NE(worker, nullptr);
  auto patient = RouterProcess::Start({worker->address()}, {"--queue-timeout-ms", "20000"});
  auto impatient = RouterProcess::Start({worker->address()}, {"--queue-timeout-ms", "100"});
  ASSERT_NE(patient, nullptr);
  ASSERT_NE(impatient, nullptr);
  ASSERT_TRUE(WaitForWorkersUp(*patient, 1));
  ASSERT_TRUE(WaitForWorkersUp(*impatient, 1));
  auto stub = Inference::NewStub(patient->Channel());
  std::atomic<int> streaming{0};
  auto running = std::async(std::launch::async, [&] { return Generate(*stub, Greedy({1, 2, 3}, 600), 60, &streaming); });
  while (streaming.load() == 0) std::this_thread::sleep_for(std::chrono::milliseconds(2));
  auto waiting = std::async(std::launch::async, [&] { return Generate(*stub, Greedy({4, 5, 6}, 600)); });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));  // let the second reach the worker's queue

  const auto start = std::chrono::steady_clock::now();
  StreamResult refused = Generate(*Inference::NewStub(impatient->Channel()), Greedy({7, 8}, 2));
  const auto waited = std::chrono::steady_clock::now() - start;
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << refused.status.error_message();
  EXPECT_GE(waited, std::chrono::milliseconds(100));

  StreamResult served = Generate(*stub, Greedy({7, 8}, 2));  // waits for room, then runs
  EXPECT_TRUE(served.status.ok()) << served.status.error_message();
  EXPECT_TRUE(running.get().status.ok());
  EXPECT_TRUE(waiting.get().status.ok());
}

TEST(RouterDnsTest, WorkerAddedToTheNameLaterIsPickedUp) {
  // Two loopback addresses stand for two pods behind one headless Service name, resolved through
  // a hosts-format file (the router's test resolver) instead of the system's DNS.
  auto a = WorkerProcess::Start(testing::SourcePath(kModel), {"--host", "127.0.0.2"});
  ASSERT_NE(a, nullptr);
  const int port = a->grpc_port();
  auto b = WorkerProcess::Start(testing::SourcePath(kModel), {"--host", "127.0.0.3", "--port", std::to_string(port)});
  ASSERT_NE(b, nullptr);
  testing::TempDir dir;
  const std::string hosts = dir.Join("hosts");
  std::ofstream(hosts) << "127.0.0.2 workers.cohort.test\n";
  auto router = RouterProcess::Start({}, {"--workers-dns", "workers.cohort.test:" + std::to_string(port),
                                          "--hosts-file", hosts, "--dns-interval-ms", "100", "--policy",
                                          "round_robin"});
  ASSERT_NE(router, nullptr);
  ASSERT_TRUE(WaitForWorkersUp(*router, 1));
  auto stub = Inference::NewStub(router->Channel());
  ASSERT_TRUE(Generate(*stub, Greedy({1, 2, 3}, 2)).status.ok());

  std::ofstream(hosts, std::ios::app) << "127.0.0.3 workers.cohort.test\n";
  ASSERT_TRUE(WaitForWorkersUp(*router, 2)) << router->Log();
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(Generate(*stub, Greedy({1, 2, 3}, 2)).status.ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  EXPECT_GE(Finished(*b, "127.0.0.3"), 2) << "round robin over two workers sends the new one half";
}

}  // namespace
}  // namespace cohort
