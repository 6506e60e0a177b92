// For GPU benchmarks (tests/kernels/*_bench.cc): programs that print numbers, where a failed CUDA
// call ends the run with the call and its error.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "worker/model/cuda/device_peaks.h"

#define BENCH_CHECK(expr)                                                                                 \
  do {                                                                                                    \
    const cudaError_t bench_error = (expr);                                                               \
    if (bench_error != cudaSuccess) {                                                                     \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(bench_error)); \
      std::exit(1);                                                                                       \
    }                                                                                                     \
  } while (0)

namespace cohort::testing {

// `count` uninitialised elements (at least one) on the device; the benchmark frees them at exit.
template <class T>
T* DeviceAlloc(int64_t count) {
  void* p = nullptr;
  BENCH_CHECK(cudaMalloc(&p, std::max<int64_t>(count, 1) * sizeof(T)));
  return static_cast<T*>(p);
}

// The device a benchmark runs on, a stream on it, and its copy bandwidth measured now (GB/s, bytes
// read + written): the ceiling the benchmark's numbers are compared with. The first lines of the
// output say all three; a failed measurement ends the run.
struct BenchDevice {
  int device = 0;
  cudaDeviceProp prop{};
  cudaStream_t stream = nullptr;
  double copy_gbs = 0;
};

inline BenchDevice OpenBenchDevice(const char* program) {
  BenchDevice d;
  BENCH_CHECK(cudaGetDevice(&d.device));
  BENCH_CHECK(cudaGetDeviceProperties(&d.prop, d.device));
  std::printf("device: %s, %d SMs, L2 %.0f MB\n", d.prop.name, d.prop.multiProcessorCount, d.prop.l2CacheSize / 1e6);
  BENCH_CHECK(cudaStreamCreateWithFlags(&d.stream, cudaStreamNonBlocking));
  const auto copy = cuda::MeasureCopyBandwidth(d.device);
  if (!copy.ok()) {
    std::fprintf(stderr, "%s: %s\n", program, std::string(copy.status().message()).c_str());
    std::exit(1);
  }
  d.copy_gbs = *copy / 1e9;
  std::printf("device-to-device copy (1 GiB, read + write): %.0f GB/s\n", d.copy_gbs);
  return d;
}

// Median over `reps` runs of `work` on `stream` (after `warmups` untimed ones), in microseconds,
// each run between two events.
inline double MedianMicros(cudaStream_t stream, int warmups, int reps, const std::function<void()>& work) {
  cudaEvent_t start, stop;
  BENCH_CHECK(cudaEventCreate(&start));
  BENCH_CHECK(cudaEventCreate(&stop));
  for (int i = 0; i < warmups; ++i) work();
  std::vector<float> ms(reps);
  for (float& m : ms) {
    BENCH_CHECK(cudaEventRecord(start, stream));
    work();
    BENCH_CHECK(cudaEventRecord(stop, stream));
    BENCH_CHECK(cudaEventSynchronize(stop));
    BENCH_CHECK(cudaEventElapsedTime(&m, start, stop));
  }
  BENCH_CHECK(cudaEventDestroy(start));
  BENCH_CHECK(cudaEventDestroy(stop));
  std::nth_element(ms.begin(), ms.begin() + reps / 2, ms.end());
  return 1e3 * ms[reps / 2];
}

// Captures what `record` enqueues on `stream` into an executable graph.
inline cudaGraphExec_t CaptureGraph(cudaStream_t stream, const std::function<void()>& record) {
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  BENCH_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  record();
  BENCH_CHECK(cudaStreamEndCapture(stream, &graph));
  BENCH_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  BENCH_CHECK(cudaGraphDestroy(graph));
  return exec;
}

}  // namespace cohort::testing
