// For GPU benchmarks (tests/kernels/*_bench.cc): programs that print numbers, where a failed CUDA
// call ends the run with the call and its error.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

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

}  // namespace cohort::testing
