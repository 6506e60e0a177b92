// Host cost of the per-request Sampler where the CUDA backend samples on the device: the engine
// thread calls BeginDeviceSample / EndDeviceSample once per token of every running request, and a
// request's first call used to size the CPU sampler's vocabulary-wide scratch (1.6 MB at DeepSeek's
// 102400). Prints microseconds per request for its first device-sampled token (sampler built from
// the prompt, as a new request's), for later tokens, and for the sampler's destruction, against one
// CPU Sample() over the same vocabulary (what the CPU backend pays per token) in the same process,
// and one greedy Sample() of a null backend's row (what --device null pays per token).
//
//   build/bin/sampler_bench [requests=256] [prompt=1000] [vocab=102400]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <vector>

#include "worker/sampling/sampler.h"

namespace cohort {
namespace {

using Clock = std::chrono::steady_clock;

double MicrosSince(Clock::time_point start) {
  return std::chrono::duration<double, std::micro>(Clock::now() - start).count();
}

int Run(int requests, int prompt_len, int vocab) {
  std::mt19937 rng(1);
  SamplingConfig config;
  config.temperature = 0.8f;
  config.top_p = 0.9f;
  config.repetition_penalty = 1.1f;  // the penalty inputs are kept up to date
  std::vector<std::vector<int32_t>> prompts(requests);
  for (auto& p : prompts) {
    p.resize(prompt_len);
    for (auto& t : p) t = static_cast<int32_t>(rng() % vocab);
  }

  // Requests come and go in a server, so its heap is warm: the first round of requests only warms
  // this process's, the second is timed.
  std::vector<std::unique_ptr<Sampler>> samplers;
  samplers.reserve(requests);
  double first = 0.0;
  for (int round = 0; round < 2; ++round) {
    samplers.clear();
    const Clock::time_point start = Clock::now();
    for (int r = 0; r < requests; ++r) {
      samplers.push_back(std::make_unique<Sampler>(config, r, prompts[r]));
      (void)samplers.back()->BeginDeviceSample(vocab);
      samplers.back()->EndDeviceSample(static_cast<int32_t>(rng() % vocab));
    }
    first = MicrosSince(start) / requests;
  }

  constexpr int kLaterTokens = 64;
  Clock::time_point start = Clock::now();
  for (int step = 0; step < kLaterTokens; ++step) {
    for (auto& s : samplers) {
      (void)s->BeginDeviceSample(vocab);
      s->EndDeviceSample(static_cast<int32_t>(rng() % vocab));
    }
  }
  const double later = MicrosSince(start) / (static_cast<double>(requests) * kLaterTokens);

  start = Clock::now();
  samplers.clear();
  const double destroyed = MicrosSince(start) / requests;

  // The CPU backend's cost per token, for scale: one Sample() over a row of logits.
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::vector<float> logits(vocab);
  for (float& l : logits) l = normal(rng);
  Sampler cpu(config, 0, prompts[0]);
  (void)cpu.Sample(logits);  // sizes its scratch
  constexpr int kCpuTokens = 20;
  start = Clock::now();
  for (int i = 0; i < kCpuTokens; ++i) (void)cpu.Sample(logits);
  const double cpu_sample = MicrosSince(start) / kCpuTokens;

  // The null backend's rows (worker/model/null_engine.h): -1e4 everywhere but one 0, sampled greedily,
  // whose cost the null backend's overhead benchmarks carry for every token of every stream.
  std::vector<float> null_row(vocab, -1e4f);
  null_row[vocab / 2] = 0.0f;
  SamplingConfig greedy;
  greedy.temperature = 0.0f;
  Sampler null_sampler(greedy, 0, prompts[0]);
  (void)null_sampler.Sample(null_row);
  start = Clock::now();
  for (int i = 0; i < kCpuTokens; ++i) (void)null_sampler.Sample(null_row);
  const double null_sample = MicrosSince(start) / kCpuTokens;

  std::printf("%d requests, prompts of %d tokens, vocabulary %d\n", requests, prompt_len, vocab);
  std::printf("  first device-sampled token (new sampler)  %9.2f us a request  (%.3fx one CPU Sample)\n", first,
              first / cpu_sample);
  std::printf("  later device-sampled tokens                %9.2f us a token\n", later);
  std::printf("  destruction                                %9.2f us a request\n", destroyed);
  std::printf("  CPU Sample(), top-p 0.9                    %9.2f us a token\n", cpu_sample);
  std::printf("  CPU Sample(), greedy, a null backend's row %9.2f us a token\n", null_sample);
  return 0;
}

}  // namespace
}  // namespace cohort

int main(int argc, char** argv) {
  const int requests = argc > 1 ? std::atoi(argv[1]) : 256;
  const int prompt = argc > 2 ? std::atoi(argv[2]) : 1000;
  const int vocab = argc > 3 ? std::atoi(argv[3]) : 102400;
  if (requests < 1 || prompt < 0 || vocab < 1) {
    std::fprintf(stderr, "usage: sampler_bench [requests >= 1] [prompt >= 0] [vocab >= 1]\n");
    return 2;
  }
  return cohort::Run(requests, prompt, vocab);
}
