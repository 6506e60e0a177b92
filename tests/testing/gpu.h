// For tests of CUDA code: they run on a machine with a GPU and skip, saying why, where there is none
// (CI). A skipped GPU test is not a passing one: scripts/gpu_tests.sh runs them all on the device.
#pragma once

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#define COHORT_SKIP_WITHOUT_GPU()                                                   \
  do {                                                                              \
    int _devices = 0;                                                               \
    if (cudaGetDeviceCount(&_devices) != cudaSuccess || _devices == 0) {            \
      (void)cudaGetLastError();                                                     \
      GTEST_SKIP() << "no CUDA device here: run scripts/gpu_tests.sh on a GPU machine"; \
    }                                                                               \
  } while (0)

// Skips a test that spreads a model over `n` GPUs on a machine with fewer.
#define COHORT_SKIP_WITHOUT_GPUS(n)                                                              \
  do {                                                                                           \
    int _devices = 0;                                                                            \
    if (cudaGetDeviceCount(&_devices) != cudaSuccess || _devices < (n)) {                        \
      (void)cudaGetLastError();                                                                  \
      GTEST_SKIP() << "needs " << (n) << " GPUs; this machine has " << _devices                  \
                   << ": run scripts/gpu_tests.sh on a machine with " << (n);                    \
    }                                                                                            \
  } while (0)

// Fails the test with the CUDA error's name when `expr` is not cudaSuccess.
#define ASSERT_CUDA_OK(expr) ASSERT_EQ((expr), cudaSuccess) << #expr << ": " << cudaGetErrorString(cudaGetLastError())

#include <cuda_bf16.h>

#include <cstdint>
#include <cstdlib>
#include <random>
#include <vector>

#include "common/dtype.h"

namespace cohort::testing {

// A device copy of a host vector for kernel tests; freed with the object.
template <typename T>
class DeviceVector {
 public:
  explicit DeviceVector(const std::vector<T>& host) : size_(host.size()) {
    cudaMalloc(reinterpret_cast<void**>(&data_), sizeof(T) * (size_ == 0 ? 1 : size_));
    cudaMemcpy(data_, host.data(), sizeof(T) * size_, cudaMemcpyHostToDevice);
  }
  // `size` elements filled with the byte `poison` (0xff makes floats NaN), to catch unwritten outputs.
  explicit DeviceVector(size_t size, unsigned char poison = 0xff) : size_(size) {
    cudaMalloc(reinterpret_cast<void**>(&data_), sizeof(T) * (size_ == 0 ? 1 : size_));
    cudaMemset(data_, poison, sizeof(T) * size_);
  }
  DeviceVector(const DeviceVector&) = delete;
  DeviceVector& operator=(const DeviceVector&) = delete;
  ~DeviceVector() { cudaFree(data_); }

  T* get() { return data_; }
  std::vector<T> ToHost() const {
    std::vector<T> host(size_);
    cudaDeviceSynchronize();
    cudaMemcpy(host.data(), data_, sizeof(T) * size_, cudaMemcpyDeviceToHost);
    return host;
  }

 private:
  T* data_ = nullptr;
  size_t size_ = 0;
};

// Fresh random inputs for every run: the seed comes from the test's random device.
inline std::mt19937 FreshRng() { return std::mt19937(std::random_device{}()); }

// A new 64-bit seed every run, for tests that report theirs; COHORT_TEST_SEED=<seed> replays a
// failing run's.
inline uint64_t FreshSeed() {
  if (const char* replay = std::getenv("COHORT_TEST_SEED"); replay != nullptr && *replay != '\0') {
    return std::strtoull(replay, nullptr, 10);
  }
  std::random_device device;
  return (static_cast<uint64_t>(device()) << 32) ^ device();
}

// `n` values uniform in [-scale, scale), as bf16 bits (host side of a bf16 device buffer).
inline std::vector<uint16_t> RandomBf16(size_t n, std::mt19937& rng, float scale = 1.0f) {
  std::uniform_real_distribution<float> u(-scale, scale);
  std::vector<uint16_t> v(n);
  for (auto& x : v) x = FloatToBF16(u(rng));
  return v;
}

// A device buffer of bf16 bits as the kernels' element type.
inline __nv_bfloat16* Bf16(DeviceVector<uint16_t>& v) { return reinterpret_cast<__nv_bfloat16*>(v.get()); }

}  // namespace cohort::testing
