#include "worker/model/cpu/measure_peaks.h"

#include <omp.h>
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdint>

namespace cohort::cpu {
namespace {

using Clock = std::chrono::steady_clock;

constexpr int kTrials = 3;
constexpr int64_t kBandwidthBytes = int64_t{128} << 20;
constexpr int kLanes = 32;                    // independent multiply-add chains per thread
constexpr int64_t kFlopIterations = 1 << 22;  // per thread and trial: 2 * kLanes * this FLOPs

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// Keeps the compiler from dropping loops whose results are otherwise unused.
volatile float g_sink = 0;

double MeasureBandwidth() {
  const int64_t n = kBandwidthBytes / static_cast<int64_t>(sizeof(float));
  // Huge pages where the kernel allows them: faulting in 4 KiB pages can cost more than the reads.
  void* mapped = mmap(nullptr, kBandwidthBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mapped == MAP_FAILED) return 0;
  madvise(mapped, kBandwidthBytes, MADV_HUGEPAGE);
  float* data = static_cast<float*>(mapped);
  // Touched by the threads that will read it, so pages land near them.
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) data[i] = static_cast<float>(i & 7);
  double best = 0;
  for (int trial = 0; trial < kTrials; ++trial) {
    const auto start = Clock::now();
    float total = 0;
#pragma omp parallel reduction(+ : total)
    {
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
#pragma omp for schedule(static)
      for (int64_t i = 0; i < n / 8; ++i) {
        for (int k = 0; k < 8; ++k) acc[k] += data[i * 8 + k];
      }
      for (float a : acc) total += a;
    }
    const double seconds = Seconds(Clock::now() - start);
    g_sink = g_sink + total;
    best = std::max(best, static_cast<double>(kBandwidthBytes) / seconds);
  }
  munmap(mapped, kBandwidthBytes);
  return best;
}

double MeasureFlops() {
  double best = 0;
  for (int trial = 0; trial < kTrials; ++trial) {
    int threads = 1;
    float sum = 0;
    const auto start = Clock::now();
#pragma omp parallel reduction(+ : sum)
    {
#pragma omp single
      threads = omp_get_num_threads();
      float lane[kLanes];
      for (int k = 0; k < kLanes; ++k) lane[k] = static_cast<float>(k + omp_get_thread_num());
      // Converges to c / (1 - m): finite and far from denormals, and no algebra can shortcut it.
      const float m = 0.999999f, c = 1e-3f;
      for (int64_t it = 0; it < kFlopIterations; ++it) {
        for (int k = 0; k < kLanes; ++k) lane[k] = lane[k] * m + c;
      }
      for (float v : lane) sum += v;
    }
    const double seconds = Seconds(Clock::now() - start);
    g_sink = g_sink + sum;
    const double flops = 2.0 * kLanes * static_cast<double>(kFlopIterations) * threads;
    best = std::max(best, flops / seconds);
  }
  return best;
}

}  // namespace

MeasuredPeaks MeasureCpuPeaks() {
  const auto start = Clock::now();
  MeasuredPeaks measured;
  measured.threads = omp_get_max_threads();
  measured.peaks.memory_bandwidth_bytes_per_s = MeasureBandwidth();
  measured.peaks.flops_per_s = MeasureFlops();
  measured.seconds = Seconds(Clock::now() - start);
  return measured;
}

}  // namespace cohort::cpu
