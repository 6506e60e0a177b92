// Launch set-up that depends only on the kernel and the device, done once per (kernel, device).
// Raising a kernel's shared-memory limit and asking for its occupancy cost microseconds each, and a
// step that is not a replayed graph (prefill, mixed steps) launches a few hundred kernels. A launcher
// keeps one LaunchSetUp per kernel as a function-local static and calls Get on every launch; after
// the first launch on a device that is an atomic load. A failed set-up is not remembered: the next
// launch tries again and reports the error again.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstddef>
#include <cstdint>

namespace cohort::kernels {

inline constexpr int kMaxCachedDevices = 64;  // devices past this are set up on every launch

// The current device's SM count, looked up once per device.
inline cudaError_t CurrentDeviceSms(int* sms) {
  int device = 0;
  if (const cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) return e;
  static std::atomic<int> cached[kMaxCachedDevices] = {};  // 0: not yet
  const bool cacheable = device >= 0 && device < kMaxCachedDevices;
  if (cacheable && (*sms = cached[device].load(std::memory_order_relaxed)) > 0) return cudaSuccess;
  if (const cudaError_t e = cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, device); e != cudaSuccess) {
    return e;
  }
  if (cacheable) cached[device].store(*sms, std::memory_order_relaxed);
  return cudaSuccess;
}

struct LaunchInfo {
  int sms = 0;            // of the current device
  int blocks_per_sm = 0;  // the kernel's resident blocks per SM at the threads and shared memory asked for
};

class LaunchSetUp {
 public:
  // Raises `kernel`'s dynamic shared-memory limit to `smem_bytes` on the current device and fills
  // `info` for blocks of `threads` threads. One kernel, threads and smem_bytes per LaunchSetUp.
  template <class Kernel>
  cudaError_t Get(Kernel kernel, int threads, size_t smem_bytes, LaunchInfo* info) {
    int device = 0;
    if (const cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) return e;
    const bool cacheable = device >= 0 && device < kMaxCachedDevices;
    if (cacheable) {
      const uint64_t packed = cached_[device].load(std::memory_order_acquire);
      if (packed != 0) {
        info->sms = static_cast<int>(packed >> 32);
        info->blocks_per_sm = static_cast<int>(packed & 0xffffffffu);
        return cudaSuccess;
      }
    }
    LaunchInfo fresh;
    cudaError_t e = CurrentDeviceSms(&fresh.sms);
    if (e == cudaSuccess) {
      e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes));
    }
    if (e == cudaSuccess) {
      e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&fresh.blocks_per_sm, kernel, threads, smem_bytes);
    }
    if (e != cudaSuccess) return e;
    if (cacheable) {
      cached_[device].store(static_cast<uint64_t>(fresh.sms) << 32 | static_cast<uint32_t>(fresh.blocks_per_sm),
                            std::memory_order_release);
    }
    *info = fresh;
    return cudaSuccess;
  }

 private:
  std::atomic<uint64_t> cached_[kMaxCachedDevices] = {};  // sms << 32 | blocks_per_sm; 0: not yet
};

}  // namespace cohort::kernels
