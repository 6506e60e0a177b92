// Router overhead, measured against a worker that generates without compute (--device null):
//  1. latency a router adds: time to first token and time per output token of single streams,
//     direct to the worker vs through the router (alternating, same worker);
//  2. streamed tokens one router core sustains: many concurrent streams through the router, with
//     the router's CPU time read from /proc, so the number is tokens per router CPU-second.
//
//   build/bin/router_bench [streams=64] [tokens_per_stream=1000]
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <future>
#include <sstream>
#include <thread>
#include <unistd.h>

#include "cohort/v1/inference.grpc.pb.h"
#include "cohort/worker/v1/worker.grpc.pb.h"
#include "tests/testing/paths.h"
#include "tests/testing/server_process.h"

namespace cohort {
namespace {

using Clock = std::chrono::steady_clock;
using cohort::v1::GenerateRequest;
using cohort::v1::GenerateResponse;

GenerateRequest Request(uint32_t tokens) {
  GenerateRequest r;
  r.mutable_token_ids()->add_ids(5);
  r.mutable_sampling()->set_temperature(0);
  r.mutable_stopping()->set_max_tokens(tokens);
  r.mutable_stopping()->set_ignore_eos(true);
  return r;
}

struct StreamTiming {
  double ttft_us = 0;  // request sent to first token
  double tpot_us = 0;  // mean time per token after the first
};

// Reads one stream to its end.
template <typename Stub>
StreamTiming Stream(Stub& stub, uint32_t tokens, int64_t* received) {
  grpc::ClientContext ctx;
  const auto start = Clock::now();
  auto reader = stub.Generate(&ctx, Request(tokens));
  GenerateResponse response;
  Clock::time_point first{}, last{};
  int64_t n = 0;
  while (reader->Read(&response)) {
    if (!response.has_chunk()) continue;
    last = Clock::now();
    if (n == 0) first = last;
    n += response.chunk().token_ids_size();
  }
  *received += n;
  grpc::Status status = reader->Finish();
  if (!status.ok()) std::fprintf(stderr, "stream failed: %s\n", status.error_message().c_str());
  StreamTiming t;
  t.ttft_us = std::chrono::duration<double, std::micro>(first - start).count();
  if (n > 1) t.tpot_us = std::chrono::duration<double, std::micro>(last - first).count() / static_cast<double>(n - 1);
  return t;
}

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(p * v.size()))];
}

// User plus system CPU seconds of every thread of `pid`.
double CpuSeconds(int pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string stat((std::istreambuf_iterator<char>(in)), {});
  std::istringstream fields(stat.substr(stat.rfind(')') + 2));
  std::string field;
  double ticks = 0;
  for (int i = 3; fields >> field; ++i) {
    if (i == 14 || i == 15) ticks += std::stod(field);  // utime, stime
  }
  return ticks / static_cast<double>(sysconf(_SC_CLK_TCK));
}

int Run(int streams, uint32_t tokens) {
  const std::string model = testing::SourcePath("tests/fixtures/models/v2_group_limited");
  auto worker = testing::WorkerProcess::Start(
      model, {"--device", "null", "--max-running", "1024", "--max-batch-tokens", "16384", "--log-level", "warn"});
  if (!worker) return 1;
  auto router = testing::RouterProcess::Start({worker->address()}, {"--log-level", "warn"});
  if (!router) return 1;
  auto direct = cohort::worker::v1::Worker::NewStub(worker->Channel());
  auto routed = cohort::v1::Inference::NewStub(router->Channel());
  // Until the router has the worker's first load report, it has nowhere to send requests.
  for (int i = 0; i < 200; ++i) {
    int64_t n = 0;
    Stream(*routed, 2, &n);
    if (n == 2) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }

  int64_t ignored = 0;
  std::vector<double> ttft[2], tpot[2];  // [direct, routed]
  for (int i = 0; i < 40; ++i) {  // alternate, so drift on a shared machine hits both alike
    for (int via_router = 0; via_router < 2; ++via_router) {
      StreamTiming t = via_router ? Stream(*routed, 100, &ignored) : Stream(*direct, 100, &ignored);
      ttft[via_router].push_back(t.ttft_us);
      tpot[via_router].push_back(t.tpot_us);
    }
  }
  std::printf("router_bench: 40 single streams of 100 tokens each way, worker --device null\n");
  std::printf("  %-8s %14s %14s %14s %14s\n", "", "TTFT p50 us", "TTFT p99 us", "TPOT p50 us", "TPOT p99 us");
  const char* names[2] = {"direct", "routed"};
  for (int k = 0; k < 2; ++k) {
    std::printf("  %-8s %14.1f %14.1f %14.1f %14.1f\n", names[k], Percentile(ttft[k], 0.5), Percentile(ttft[k], 0.99),
                Percentile(tpot[k], 0.5), Percentile(tpot[k], 0.99));
  }
  std::printf("  added by the router: TTFT p50 %.1f us, p99 %.1f us; per token p50 %.2f us, p99 %.2f us\n",
              Percentile(ttft[1], 0.5) - Percentile(ttft[0], 0.5), Percentile(ttft[1], 0.99) - Percentile(ttft[0], 0.99),
              Percentile(tpot[1], 0.5) - Percentile(tpot[0], 0.5), Percentile(tpot[1], 0.99) - Percentile(tpot[0], 0.99));

  const double cpu_before = CpuSeconds(router->pid());
  const auto start = Clock::now();
  std::vector<std::future<int64_t>> calls;
  for (int s = 0; s < streams; ++s) {
    calls.push_back(std::async(std::launch::async, [&] {
      int64_t n = 0;
      Stream(*routed, tokens, &n);
      return n;
    }));
  }
  int64_t total = 0;
  for (auto& c : calls) total += c.get();
  const double wall = std::chrono::duration<double>(Clock::now() - start).count();
  const double cpu = CpuSeconds(router->pid()) - cpu_before;
  std::printf("router_bench: %d concurrent streams x %u tokens through the router\n", streams, tokens);
  std::printf("  %lld tokens in %.2f s wall: %.0f tokens/s (machine-bound: client, worker and router share %ld cores)\n",
              static_cast<long long>(total), wall, total / wall, sysconf(_SC_NPROCESSORS_ONLN));
  std::printf("  router CPU %.2f s: %.0f streamed tokens per router CPU-second (one core's worth)\n", cpu,
              cpu > 0 ? total / cpu : 0.0);
  return total == static_cast<int64_t>(streams) * tokens ? 0 : 1;
}

}  // namespace
}  // namespace cohort

int main(int argc, char** argv) {
  const int streams = argc > 1 ? std::atoi(argv[1]) : 64;
  const uint32_t tokens = argc > 2 ? static_cast<uint32_t>(std::atoi(argv[2])) : 1000;
  return cohort::Run(streams, tokens);
}
