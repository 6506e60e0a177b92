// Times device sampling (kernels/sampling.h) over a DeepSeek-V2 vocabulary (102400) for 1 to 512
// rows: greedy (the streaming kernel), greedy with top logprobs (the general kernel), temperature
// 0.8 with top-p 0.9, top-k 50, min-p 0.05, and top-p with repetition penalties over a 2000-token
// history. Sampled rows are timed on two kinds of logits, since the work a row needs depends on
// how many tokens stay candidates: "peaked" N(0, 4) like a language model's, "flat" N(0, 1) where
// top-p 0.9 keeps most of the vocabulary.
//
// Which work split a launch takes depends on the SM count (kernels/sampling.cu, LaunchSampling): a
// row of this vocabulary needs 3 cluster blocks, so on an H200 (132 SMs) up to 64 rows below take
// the cluster split and from 128 rows on the row split; greedy-only launches use one plain block a
// row from 256 rows on.
//
// Each case is the median of 100 launches timed with CUDA events, after warm-up. "logits GB/s" is
// rows * vocab * 4 bytes over that time, and "% copy" compares it with the device-to-device copy
// bandwidth (a 1 GiB cudaMemcpyAsync, bytes read + written) measured at the start: one pass over
// the logits at copy speed would be 100%.
//
//   build/bin/sampling_bench [--case SUBSTRING] [--rows N]
//
// --case keeps the cases whose name contains SUBSTRING, --rows one row count: to profile or compare
// one case alone.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "kernels/sampling.h"
#include "tests/testing/gpu_bench.h"
#include "worker/model/cuda/device_peaks.h"

namespace cohort {
namespace {

using testing::DeviceAlloc;

constexpr int32_t kVocab = 102400;
constexpr int32_t kMaxRows = 512;
constexpr int kHistory = 2000;
constexpr int kWarmUp = 10;
constexpr int kIterations = 100;

template <class T>
void Upload(T* device, const std::vector<T>& host) {
  BENCH_CHECK(cudaMemcpy(device, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
}

struct Case {
  const char* name;
  float temperature;
  int32_t top_k;
  float top_p;
  float min_p;
  bool penalties;
  int32_t top_logprobs;
};

constexpr int32_t kGreedyRows[] = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512};
constexpr int32_t kSampledRows[] = {1, 4, 16, 32, 64, 128, 256, 512};

struct Filter {
  const char* case_substring = nullptr;  // every case when null
  int32_t rows = 0;                      // every row count when 0
};

int Main(const Filter& filter) {
  cudaStream_t stream;
  BENCH_CHECK(cudaStreamCreate(&stream));

  // The copy ceiling.
  const absl::StatusOr<double> copy = cuda::MeasureCopyBandwidth(0);
  if (!copy.ok()) {
    std::fprintf(stderr, "sampling_bench: %s\n", std::string(copy.status().message()).c_str());
    return 1;
  }
  const double copy_gbps = *copy / 1e9;
  std::printf("device-to-device copy: %.0f GB/s (read + write)\n", copy_gbps);
  std::printf("vocab %d; median of %d launches\n\n", kVocab, kIterations);

  std::mt19937_64 rng(1);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> peaked(static_cast<size_t>(kMaxRows) * kVocab), flat(peaked.size());
  for (size_t i = 0; i < peaked.size(); ++i) {
    flat[i] = normal(rng);
    peaked[i] = 4.0f * normal(rng);
  }
  float* d_peaked = DeviceAlloc<float>(static_cast<int64_t>(peaked.size()));
  float* d_flat = DeviceAlloc<float>(static_cast<int64_t>(flat.size()));
  Upload(d_peaked, peaked);
  Upload(d_flat, flat);

  std::vector<SamplingPenaltyToken> history;
  for (int r = 0; r < kMaxRows; ++r) {
    std::vector<int32_t> tokens(kVocab);
    for (int32_t t = 0; t < kVocab; ++t) tokens[t] = t;
    std::shuffle(tokens.begin(), tokens.end(), rng);
    for (int i = 0; i < kHistory; ++i) history.push_back({tokens[i], static_cast<int32_t>(i % 3), 1});
  }
  SamplingPenaltyToken* d_history = DeviceAlloc<SamplingPenaltyToken>(static_cast<int64_t>(history.size()));
  Upload(d_history, history);
  SamplingRowParams* d_params = DeviceAlloc<SamplingRowParams>(kMaxRows);
  SamplingRowResult* d_results = DeviceAlloc<SamplingRowResult>(kMaxRows);
  SamplingTopLogprob* d_top = DeviceAlloc<SamplingTopLogprob>(static_cast<int64_t>(kMaxRows) * kSamplingMaxTopLogprobs);

  const Case cases[] = {
      {"greedy", 0.0f, 0, 1.0f, 0.0f, false, 0},
      {"greedy, top logprobs 5", 0.0f, 0, 1.0f, 0.0f, false, 5},
      {"T 0.8, top-p 0.9", 0.8f, 0, 0.9f, 0.0f, false, 0},
      {"top-k 50", 1.0f, 50, 1.0f, 0.0f, false, 0},
      {"min-p 0.05", 1.0f, 0, 1.0f, 0.05f, false, 0},
      {"T 0.8, top-p 0.9, penalties", 0.8f, 0, 0.9f, 0.0f, true, 0},
  };
  std::printf("%-30s %-7s %5s %10s %12s %7s\n", "case", "logits", "rows", "us/step", "logits GB/s", "% copy");
  for (const Case& c : cases) {
    if (filter.case_substring != nullptr && std::strstr(c.name, filter.case_substring) == nullptr) continue;
    const bool greedy_only = c.temperature == 0.0f && c.top_logprobs == 0;
    const std::span<const int32_t> row_counts =
        greedy_only ? std::span<const int32_t>(kGreedyRows) : std::span<const int32_t>(kSampledRows);
    for (int flat_logits = 0; flat_logits < (c.temperature == 0.0f ? 1 : 2); ++flat_logits) {
      for (int32_t rows : row_counts) {
        if (filter.rows != 0 && rows != filter.rows) continue;
        std::vector<SamplingRowParams> params(rows);
        std::uniform_real_distribution<double> uniform(0.0, 1.0);
        for (int32_t r = 0; r < rows; ++r) {
          SamplingRowParams& p = params[r];
          p.uniform = uniform(rng);
          p.temperature = c.temperature;
          p.top_k = c.top_k;
          p.top_p = c.top_p;
          p.min_p = c.min_p;
          p.top_logprobs = c.top_logprobs;
          p.top_offset = r * c.top_logprobs;
          if (c.penalties) {
            p.repetition_penalty = 1.1f;
            p.presence_penalty = 0.2f;
            p.frequency_penalty = 0.1f;
            p.penalty_begin = r * kHistory;
            p.penalty_end = (r + 1) * kHistory;
          }
        }
        Upload(d_params, params);
        SamplingArgs args;
        args.logits = flat_logits ? d_flat : d_peaked;
        args.row_stride = kVocab;
        args.rows = rows;
        args.vocab = kVocab;
        args.greedy_only = greedy_only;
        args.params = d_params;
        args.penalty_tokens = d_history;
        args.results = d_results;
        args.top = d_top;
        const double us = testing::MedianMicros(stream, kWarmUp, kIterations,
                                                [&] { BENCH_CHECK(LaunchSampling(args, stream)); });
        const double gbps = static_cast<double>(rows) * kVocab * sizeof(float) / us / 1e3;
        std::printf("%-30s %-7s %5d %10.1f %12.0f %6.0f%%\n", c.name,
                    c.temperature == 0.0f ? "-" : (flat_logits ? "flat" : "peaked"), rows, us, gbps,
                    100.0 * gbps / copy_gbps);
      }
    }
  }
  BENCH_CHECK(cudaStreamDestroy(stream));
  return 0;
}

}  // namespace
}  // namespace cohort

int main(int argc, char** argv) {
  cohort::Filter filter;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--case") == 0 && i + 1 < argc) {
      filter.case_substring = argv[++i];
    } else if (std::strcmp(argv[i], "--rows") == 0 && i + 1 < argc) {
      filter.rows = std::atoi(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: sampling_bench [--case SUBSTRING] [--rows N]\n");
      return 2;
    }
  }
  return cohort::Main(filter);
}
