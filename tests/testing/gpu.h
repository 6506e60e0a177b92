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

// Fails the test with the CUDA error's name when `expr` is not cudaSuccess.
#define ASSERT_CUDA_OK(expr) ASSERT_EQ((expr), cudaSuccess) << #expr << ": " << cudaGetErrorString(cudaGetLastError())
