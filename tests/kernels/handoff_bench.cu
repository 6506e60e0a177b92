// What handing a small result from every block to every block costs, as a kernel boundary and as a
// barrier inside one persistent kernel: the question behind replacing a decode step's short launches
// (docs/cuda_backend.md, "what comes next") with one launch whose blocks wait on flags in global memory.
//
// A stage: every block reads the whole 2048-float vector the previous stage wrote (L2 hits, after the
// handoff), sums it, and writes its 16 floats of the next vector. 64 stages run as
//   - 64 launches in a CUDA graph, plain or as programmatic dependents (kernels/pdl.cuh), the latter
//     also as cluster launches of 1 and 4 blocks by turns, or of 1 block asking for 0 and 100 KB
//     of shared memory by turns (as a decode step's kernels differ from one to the next), and
//   - one launch of as many blocks as SMs with a grid barrier between stages, of three kinds (below),
//     the counter kind also beside a weight stream from the same SMs at several paces (a second
//     question of the same plan: can such a launch stream weights while its stages hand on?).
// Printed: us per stage for each, and the stream's read rate; every form must leave the same vector
// (checked).
//
//   build/bin/handoff_bench
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include "kernels/mma.cuh"
#include "kernels/pdl.cuh"
#include "tests/testing/gpu_bench.h"

namespace cohort {
namespace {

using kernels::SmemAddress;
using testing::DeviceAlloc;

constexpr int kThreads = 256;
constexpr int kWidth = 2048;    // floats handed on a stage
constexpr int kPerBlock = 16;   // floats a block writes
constexpr int kStages = 64;

// The stage threads' block barrier: a named barrier of kThreads threads, so that a block may carry
// one more warp (the streamer below) that never joins it. Same as __syncthreads() otherwise.
__device__ __forceinline__ void StageSync() { asm volatile("bar.sync 1, %0;" ::"n"(kThreads) : "memory"); }

__device__ __forceinline__ float BlockSum(float v) {
  __shared__ float partial[kThreads / 32];
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  StageSync();
  float sum = 0.0f;
  for (int w = 0; w < kThreads / 32; ++w) sum += partial[w];
  StageSync();
  return sum;
}

// One stage's work for this block: next[b * 16 + i] = f(sum of prev, b, i), within kWidth.
__device__ __forceinline__ void Stage(const float* prev, float* next, int stage) {
  float v = 0.0f;
  for (int i = threadIdx.x; i < kWidth; i += kThreads) v += __ldcg(prev + i);
  const float sum = BlockSum(v);
  const int i = static_cast<int>(blockIdx.x) * kPerBlock + static_cast<int>(threadIdx.x);
  if (threadIdx.x < kPerBlock && i < kWidth) next[i] = sum * 1e-3f + static_cast<float>(i % 7 + stage);
}

__global__ void __launch_bounds__(kThreads) StageKernel(const float* prev, float* next, int stage, bool pdl) {
  if (pdl) {
    kernels::PdlWait();
    kernels::PdlLaunchDependents();
  }
  Stage(prev, next, stage);
}

// Three grid barriers (every block must be resident at once). Each starts with the block's threads
// meeting, so that the arrival published by one of them covers the whole block's writes.
enum class Barrier { kCounter, kFlags, kClusterCounter };

__device__ __forceinline__ void Arrive(unsigned* counter) {
  asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(counter) : "memory");
}

__device__ __forceinline__ void SpinUntil(const unsigned* word, unsigned target) {
  unsigned seen = 0;
  do {
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(seen) : "l"(word) : "memory");
  } while (seen < target);
}

__device__ __forceinline__ void ClusterSync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}

__device__ __forceinline__ unsigned ClusterRank() {
  unsigned rank;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
  return rank;
}

__device__ __forceinline__ unsigned ClusterBlocks() {
  unsigned n;
  asm volatile("mov.u32 %0, %%cluster_nctarank;" : "=r"(n));
  return n;
}

// kCounter: thread 0 of every block adds one to a counter and waits for it to reach the stage's
// count. kFlags: thread 0 stores the stage into its block's own word; thread i waits for block i's
// (no atomics, every waiter on a different word). kClusterCounter: the cluster meets first
// (hardware barrier), one block of it adds to the counter and waits, then the cluster meets again.
template <Barrier kBarrier>
__device__ __forceinline__ void GridBarrier(unsigned* words, unsigned stage) {
  if constexpr (kBarrier == Barrier::kCounter) {
    StageSync();
    if (threadIdx.x == 0) {
      Arrive(words);
      SpinUntil(words, stage * gridDim.x);
    }
    StageSync();
  } else if constexpr (kBarrier == Barrier::kFlags) {
    StageSync();
    if (threadIdx.x == 0) {
      asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(words + blockIdx.x), "r"(stage) : "memory");
    }
    if (threadIdx.x < gridDim.x) SpinUntil(words + threadIdx.x, stage);
    StageSync();
  } else {
    ClusterSync();
    if (ClusterRank() == 0 && threadIdx.x == 0) {
      Arrive(words);
      SpinUntil(words, stage * (gridDim.x / ClusterBlocks()));
    }
    ClusterSync();
  }
}

template <Barrier kBarrier>
__global__ void __launch_bounds__(kThreads) PersistentKernel(float* buffers, unsigned* words) {
  for (int s = 0; s < kStages; ++s) {
    Stage(buffers + (s % 2) * kWidth, buffers + ((s + 1) % 2) * kWidth, s);
    GridBarrier<kBarrier>(words, s + 1);
  }
}

// The counter form with one more warp a block, whose first lane streams the block's slice of a
// buffer far larger than L2 into a ring of `depth` shared-memory slots of kChunk bytes through the
// bulk-copy unit (cp.async.bulk, completion on an mbarrier a slot), keeping `depth` copies in
// flight until the chain's last stage: the weight stream a persistent decode layer would run on the
// same SMs as its latency-bound stages. `depth` paces it; 0 leaves the warp idle. The bytes that
// landed go into `streamed`.
constexpr int kChunk = 16 << 10;
constexpr int kMaxDepth = 12;

__device__ __forceinline__ void BulkLoad(void* to, const void* from, uint64_t* landed) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(SmemAddress(landed)), "n"(kChunk)
               : "memory");
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                   SmemAddress(to)),
               "l"(from), "n"(kChunk), "r"(SmemAddress(landed))
               : "memory");
}

__device__ __forceinline__ void WaitLanded(uint64_t* landed, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT%=;\n"
      "}\n" ::"r"(SmemAddress(landed)),
      "r"(parity)
      : "memory");
}

__device__ void StreamUntil(const volatile int* chain_done, const char* slice, int64_t chunks, int depth,
                            unsigned long long* streamed) {
  extern __shared__ __align__(128) unsigned char ring[];
  __shared__ __align__(8) uint64_t landed[kMaxDepth];
  for (int s = 0; s < depth; ++s) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(SmemAddress(&landed[s])) : "memory");
  }
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  int64_t issued = 0;
  int64_t arrived = 0;
  for (; issued < depth; ++issued) BulkLoad(ring + issued * kChunk, slice + (issued % chunks) * kChunk, &landed[issued]);
  for (;;) {
    const int slot = static_cast<int>(arrived % depth);
    WaitLanded(&landed[slot], static_cast<uint32_t>((arrived / depth) & 1));
    ++arrived;
    if (*chain_done) break;
    BulkLoad(ring + slot * kChunk, slice + (issued % chunks) * kChunk, &landed[slot]);
    ++issued;
  }
  for (; arrived < issued; ++arrived) {
    WaitLanded(&landed[arrived % depth], static_cast<uint32_t>((arrived / depth) & 1));
  }
  atomicAdd(streamed, static_cast<unsigned long long>(arrived) * kChunk);
}

__global__ void __launch_bounds__(kThreads + 32)
    PersistentStreamKernel(float* buffers, unsigned* words, const char* weights, int64_t slice_chunks, int depth,
                           unsigned long long* streamed) {
  __shared__ volatile int chain_done;
  if (threadIdx.x == 0) chain_done = 0;
  __syncthreads();
  if (threadIdx.x >= kThreads) {
    if (threadIdx.x == kThreads && depth > 0) {
      StreamUntil(&chain_done, weights + blockIdx.x * slice_chunks * kChunk, slice_chunks, depth, streamed);
    }
    return;
  }
  for (int s = 0; s < kStages; ++s) {
    Stage(buffers + (s % 2) * kWidth, buffers + ((s + 1) % 2) * kWidth, s);
    GridBarrier<Barrier::kCounter>(words, s + 1);
  }
  if (threadIdx.x == 0) chain_done = 1;
}

std::vector<float> Result(const float* buffers) {
  std::vector<float> host(kWidth);
  BENCH_CHECK(cudaMemcpy(host.data(), buffers + (kStages % 2) * kWidth, kWidth * sizeof(float),
                         cudaMemcpyDeviceToHost));
  return host;
}

int Main() {
  const testing::BenchDevice d = testing::OpenBenchDevice("handoff_bench");
  const int blocks = d.prop.multiProcessorCount;
  if (blocks * kPerBlock < kWidth) {
    std::fprintf(stderr, "handoff_bench: %d SMs cannot write %d floats\n", blocks, kWidth);
    return 1;
  }
  float* buffers = DeviceAlloc<float>(2 * kWidth);
  unsigned* words = DeviceAlloc<unsigned>(blocks);
  const auto reset = [&] {
    BENCH_CHECK(cudaMemsetAsync(buffers, 0, 2 * kWidth * sizeof(float), d.stream));
    BENCH_CHECK(cudaMemsetAsync(words, 0, blocks * sizeof(unsigned), d.stream));
  };
  std::vector<std::pair<std::string, cudaGraphExec_t>> forms;
  for (const bool pdl : {false, true}) {
    forms.emplace_back(pdl ? "launches with PDL" : "launches", testing::CaptureGraph(d.stream, [&] {
      reset();
      for (int s = 0; s < kStages; ++s) {
        const float* prev = buffers + (s % 2) * kWidth;
        float* next = buffers + ((s + 1) % 2) * kWidth;
        if (pdl) {
          BENCH_CHECK(kernels::LaunchPdl(StageKernel, dim3(blocks), dim3(kThreads), 0, d.stream, prev, next, s, true));
        } else {
          StageKernel<<<blocks, kThreads, 0, d.stream>>>(prev, next, s, false);
          BENCH_CHECK(cudaGetLastError());
        }
      }
    }));
  }
  // PDL launches that differ from one stage to the next the way a decode step's kernels do. Every
  // launch of these two chains carries the cluster attribute: clusters of 1 and `cluster_size`
  // blocks by turns, the odd stages asking for `odd_smem` of shared memory (unused).
  constexpr size_t kLargeSmem = 100 << 10;
  BENCH_CHECK(cudaFuncSetAttribute(StageKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kLargeSmem));
  const auto mixed = [&](int cluster_size, size_t odd_smem) {
    return testing::CaptureGraph(d.stream, [&] {
      reset();
      for (int s = 0; s < kStages; ++s) {
        const float* prev = buffers + (s % 2) * kWidth;
        float* next = buffers + ((s + 1) % 2) * kWidth;
        cudaLaunchAttribute attributes[2] = {};
        attributes[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        attributes[0].val.programmaticStreamSerializationAllowed = 1;
        attributes[1].id = cudaLaunchAttributeClusterDimension;
        attributes[1].val.clusterDim = {static_cast<unsigned>(s % 2 == 1 ? cluster_size : 1), 1, 1};
        cudaLaunchConfig_t config{};
        config.gridDim = dim3(blocks);
        config.blockDim = dim3(kThreads);
        config.dynamicSmemBytes = s % 2 == 1 ? odd_smem : 0;
        config.stream = d.stream;
        config.attrs = attributes;
        config.numAttrs = 2;
        BENCH_CHECK(cudaLaunchKernelEx(&config, StageKernel, prev, next, s, true));
      }
    });
  };
  if (blocks % 4 == 0) forms.emplace_back("PDL clusters of 1 and 4 blocks", mixed(4, 0));
  forms.emplace_back("PDL clusters, 0 and 100 KB smem", mixed(1, kLargeSmem));
  forms.emplace_back("one launch, counter", testing::CaptureGraph(d.stream, [&] {
    reset();
    PersistentKernel<Barrier::kCounter><<<blocks, kThreads, 0, d.stream>>>(buffers, words);
    BENCH_CHECK(cudaGetLastError());
  }));
  forms.emplace_back("one launch, a flag a block", testing::CaptureGraph(d.stream, [&] {
    reset();
    PersistentKernel<Barrier::kFlags><<<blocks, kThreads, 0, d.stream>>>(buffers, words);
    BENCH_CHECK(cudaGetLastError());
  }));
  // Clusters of two, where every one of them fits on the device at once.
  cudaLaunchAttribute cluster{};
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim = {2, 1, 1};
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(blocks);
  config.blockDim = dim3(kThreads);
  config.stream = d.stream;
  config.attrs = &cluster;
  config.numAttrs = 1;
  int clusters = 0;
  BENCH_CHECK(cudaOccupancyMaxActiveClusters(&clusters, PersistentKernel<Barrier::kClusterCounter>, &config));
  if (blocks % 2 == 0 && clusters >= blocks / 2) {
    forms.emplace_back("one launch, clusters of 2", testing::CaptureGraph(d.stream, [&] {
      reset();
      BENCH_CHECK(cudaLaunchKernelEx(&config, PersistentKernel<Barrier::kClusterCounter>, buffers, words));
    }));
  } else {
    std::printf("(clusters of 2: %d fit at once, %d needed; not run)\n", clusters, blocks / 2);
  }
  // The counter form beside a weight stream from the same SMs, paced by the copies in flight.
  constexpr int64_t kStreamBytes = int64_t{2} << 30;
  const int64_t slice_chunks = kStreamBytes / blocks / kChunk;
  const char* weights = DeviceAlloc<char>(kStreamBytes);  // what the stream reads (never written)
  unsigned long long* streamed = DeviceAlloc<unsigned long long>(1);
  BENCH_CHECK(cudaFuncSetAttribute(PersistentStreamKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   kMaxDepth * kChunk));
  const std::vector<int> depths = {0, 1, 2, 3, 4, 6, 8, 12};
  const size_t stream_forms = forms.size();
  for (const int depth : depths) {
    forms.emplace_back("one launch, counter, stream " + std::to_string(depth * kChunk >> 10) + " KB/SM",
                       testing::CaptureGraph(d.stream, [&] {
                         reset();
                         BENCH_CHECK(cudaMemsetAsync(streamed, 0, sizeof(unsigned long long), d.stream));
                         PersistentStreamKernel<<<blocks, kThreads + 32, depth * kChunk, d.stream>>>(
                             buffers, words, weights, slice_chunks, depth, streamed);
                         BENCH_CHECK(cudaGetLastError());
                       }));
  }

  // The two memsets alone, to take out of every form.
  const cudaGraphExec_t empty = testing::CaptureGraph(d.stream, reset);

  std::printf("\n%d stages; a stage: %d blocks each read %d floats and write %d (graph replays, median of 200)\n\n",
              kStages, blocks, kWidth, kPerBlock);
  const double base = testing::MedianMicros(d.stream, 20, 200, [&] { BENCH_CHECK(cudaGraphLaunch(empty, d.stream)); });
  std::vector<float> reference;
  bool same = true;
  for (size_t f = 0; f < forms.size(); ++f) {
    const cudaGraphExec_t exec = forms[f].second;
    const double us = testing::MedianMicros(d.stream, 20, 200, [&] { BENCH_CHECK(cudaGraphLaunch(exec, d.stream)); });
    BENCH_CHECK(cudaStreamSynchronize(d.stream));
    const std::vector<float> result = Result(buffers);
    if (reference.empty()) reference = result;
    same = same && result == reference;
    std::printf("%-40s %8.2f us a stage", forms[f].first.c_str(), (us - base) / kStages);
    if (f >= stream_forms) {
      // The last replay's bytes over the median replay's time: the stream's rate beside the chain.
      unsigned long long bytes = 0;
      BENCH_CHECK(cudaMemcpy(&bytes, streamed, sizeof(bytes), cudaMemcpyDeviceToHost));
      const double gbs = bytes / ((us - base) * 1e3);
      std::printf(", stream %6.0f GB/s (%3.0f%% of copy)", gbs, 100.0 * gbs / d.copy_gbs);
    }
    std::printf("\n");
  }
  if (!same) {
    std::fprintf(stderr, "handoff_bench: the forms left different vectors\n");
    return 1;
  }
  return 0;
}

}  // namespace
}  // namespace cohort

int main() { return cohort::Main(); }
