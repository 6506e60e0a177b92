// Device memory planned once: an arena is sized by a dry run over everything the engine will
// place in it, allocated with one cudaMalloc, and handed out by bumping a pointer. Nothing is
// allocated or freed while steps run.
//
//   DeviceArena plan;                      // dry run: counts bytes only
//   Place(plan);                           // the same code that will place the real buffers
//   COHORT_ASSIGN_OR_RETURN(auto arena, DeviceArena::Allocate(plan.bytes(), "weights"));
//   Place(arena);
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

namespace cohort::cuda {

class DeviceArena {
 public:
  DeviceArena() = default;  // a dry run: Take() returns null pointers and counts bytes
  DeviceArena(const DeviceArena&) = delete;
  DeviceArena& operator=(const DeviceArena&) = delete;
  DeviceArena(DeviceArena&& other) noexcept { *this = std::move(other); }
  DeviceArena& operator=(DeviceArena&& other) noexcept {
    std::swap(base_, other.base_);
    std::swap(capacity_, other.capacity_);
    std::swap(used_, other.used_);
    return *this;
  }
  ~DeviceArena() {
    if (base_ != nullptr) cudaFree(base_);
  }

  // ResourceExhausted with the numbers when the device cannot hold `bytes`.
  static absl::StatusOr<DeviceArena> Allocate(size_t bytes, const std::string& what) {
    DeviceArena arena;
    if (bytes == 0) return arena;
    if (cudaError_t e = cudaMalloc(&arena.base_, bytes); e != cudaSuccess) {
      (void)cudaGetLastError();
      size_t free = 0, total = 0;
      cudaMemGetInfo(&free, &total);
      return absl::ResourceExhaustedError(absl::StrCat("out of GPU memory: ", what, " needs ", bytes >> 20,
                                                       " MiB, the device has ", free >> 20, " MiB free of ",
                                                       total >> 20, " MiB (", cudaGetErrorString(e), ")"));
    }
    arena.capacity_ = bytes;
    return arena;
  }

  template <typename T>
  T* Take(int64_t count) {
    constexpr size_t kAlign = 256;
    used_ = (used_ + kAlign - 1) / kAlign * kAlign;
    T* p = base_ == nullptr ? nullptr : reinterpret_cast<T*>(static_cast<char*>(base_) + used_);
    used_ += static_cast<size_t>(count) * sizeof(T);
    if (base_ != nullptr && used_ > capacity_) std::abort();  // planned and placed differently: a bug
    return p;
  }

  size_t bytes() const { return used_; }
  bool dry_run() const { return base_ == nullptr; }

 private:
  void* base_ = nullptr;
  size_t capacity_ = 0;
  size_t used_ = 0;
};

// Page-locked host memory for asynchronous copies.
template <typename T>
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  ~PinnedBuffer() {
    if (data_ != nullptr) cudaFreeHost(data_);
  }
  cudaError_t Allocate(int64_t count) {
    size_ = count;
    return cudaMallocHost(reinterpret_cast<void**>(&data_), static_cast<size_t>(count) * sizeof(T));
  }
  T* data() { return data_; }
  const T* data() const { return data_; }
  int64_t size() const { return size_; }
  T& operator[](int64_t i) { return data_[i]; }

 private:
  T* data_ = nullptr;
  int64_t size_ = 0;
};

}  // namespace cohort::cuda
