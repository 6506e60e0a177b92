// One worker's GPUs in two processes (cohort-worker --world-size 2 and --group-leader), as a client
// sees it: real processes, one GPU each, spoken to over gRPC. Needs a machine with two GPUs.
#include <grpcpp/grpcpp.h>
#include <unistd.h>

#include <future>
#include <string>
#include <vector>

#include "cohort/worker/v1/worker.grpc.pb.h"
#include "gtest/gtest.h"
#include "tests/testing/fixtures.h"
#include "tests/testing/generate_client.h"
#include "tests/testing/gpu.h"
#include "tests/testing/paths.h"
#include "tests/testing/server_process.h"
#include "tests/testing/subprocess.h"

namespace cohort {
namespace {

using cohort::worker::v1::Worker;

std::vector<std::vector<int32_t>> GreedyTokens(testing::ServerProcess& worker,
                                               const std::vector<std::vector<int32_t>>& prompts) {
  auto stub = Worker::NewStub(worker.Channel());
  std::vector<std::vector<int32_t>> tokens;
  for (const auto& prompt : prompts) {
    grpc::ClientContext context;
    auto reader = stub->Generate(&context, testing::Greedy(prompt, 10));
    testing::StreamResult r = testing::ReadStream(*reader);
    EXPECT_TRUE(r.status.ok()) << r.status.error_message();
    tokens.push_back(r.tokens);
  }
  return tokens;
}

// Rank 0 on GPU 0 and a follower on GPU 1 serve the same greedy tokens as one GPU alone; when
// rank 0 stops, the follower leaves too.
TEST(WorkerGroupTest, TwoProcessesServeTheOneGpuWorkersTokens) {
  COHORT_SKIP_WITHOUT_GPUS(2);
  const testing::Fixture fixture = testing::LoadFixture("v2_lite_like");
  std::vector<std::vector<int32_t>> prompts;
  for (const auto& c : fixture.cases) prompts.push_back(c.prompt);
  const std::vector<std::string> common = {"--device", "cuda", "--max-batch-tokens", "64", "--max-running", "8",
                                           "--kv-cache-bytes", "67108864", "--metrics-port", "-1"};

  std::vector<std::vector<int32_t>> alone;
  {
    std::vector<std::string> args = common;
    args.insert(args.end(), {"--gpu", "0"});
    auto one = testing::WorkerProcess::Start(fixture.model_dir, args, /*timeout_s=*/120);
    ASSERT_NE(one, nullptr);
    alone = GreedyTokens(*one, prompts);
  }

  const std::string group_port = std::to_string(41000 + getpid() % 20000);
  std::vector<std::string> follower_args = {testing::BinaryPath("cohort-worker"), "--model", fixture.model_dir,
                                            "--group-leader", "127.0.0.1:" + group_port, "--rank", "1",
                                            "--gpu", "1"};
  follower_args.insert(follower_args.end(), common.begin(), common.end());
  auto follower = std::async(std::launch::async, [&] { return testing::RunProcess(follower_args, 300); });
  std::vector<std::string> leader_args = common;
  leader_args.insert(leader_args.end(), {"--gpu", "0", "--world-size", "2", "--group-port", group_port});
  {
    auto leader = testing::WorkerProcess::Start(fixture.model_dir, leader_args, /*timeout_s=*/180);
    ASSERT_NE(leader, nullptr);
    EXPECT_EQ(GreedyTokens(*leader, prompts), alone);
  }
  const testing::ProcessResult ended = follower.get();
  EXPECT_NE(ended.err.find("group: rank 1 joining rank 0"), std::string::npos) << ended.err;
  EXPECT_NE(ended.exit_code, -1) << "the follower left when rank 0 stopped: " << ended.err;
}

}  // namespace
}  // namespace cohort
