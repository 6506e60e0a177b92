// How long one dependent load takes while other blocks stream from HBM beside it: the question
// behind every attempt to hide a decode step's weight reads behind its latency-bound launches (the
// router product, the route, the norms; docs/cuda_backend.md). Those launches are chains of
// dependent loads, mostly L2 hits; if bulk traffic lengthens each hit, overlapping the two loses
// what it hoped to win.
//
// A single thread follows a random pointer chain (each load's address is the previous load's value,
// ld.global.cg: L2, not L1) through 4 MB (L2 hits after a warm-up pass) or from a random entry of
// a chain through 2 GiB (HBM misses), while a second kernel on another stream reads a 4 GiB buffer
// with 16-byte streaming (evict-first) loads from a given number of blocks until the chase is done.
// Printed: the stream's bandwidth during the chase and the chase's time per load, for 0 to 4
// blocks per SM of background.
//
// A second table asks the same of instruction fetch. A decode step is a chain of short kernels, and
// each one's block usually lands on an SM whose instruction cache holds other kernels' code, so it
// fetches its own from L2 (or HBM) as it runs. One warp runs straight-line code of a given size
// twice, right after every SM ran 256 KB of other code: the first pass fetches it, the second finds
// it cached. Printed: both passes, with the code in L2 or only in HBM (L2 flushed), idle or beside
// the stream at saturation.
//
//   build/bin/memory_latency_bench
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

#include "tests/testing/gpu_bench.h"

namespace cohort {
namespace {

using testing::DeviceAlloc;

constexpr int kStreamThreads = 256;
constexpr int64_t kStreamBytes = int64_t{4} << 30;
constexpr int64_t kL2ChainBytes = int64_t{4} << 20;
constexpr int64_t kHbmChainBytes = int64_t{2} << 30;
constexpr int64_t kLine = 128;  // one chain entry per cache line
constexpr int kChaseSteps = 20000;
constexpr uint64_t kSettleNs = 20000;  // the stream's ramp, before the chase starts its clock
constexpr uint64_t kGiveUpNs = 2000000000;  // neither kernel waits for the other longer than this

// Flags between the two kernels, in device memory.
struct Flags {
  int stream_started;
  int chase_done;
  unsigned long long stream_bytes;
  unsigned long long stream_ns;
  unsigned long long sink;
};

__device__ __forceinline__ uint64_t GlobalNs() {
  uint64_t t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ int LoadFlag(const int* p) {
  int v;
  asm volatile("ld.relaxed.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}

// Reads `buffer` in 16-byte pieces over and over until the chase is done (or kGiveUpNs pass); every
// thread adds the bytes it read to flags->stream_bytes, and block 0 reports the time.
__global__ void __launch_bounds__(kStreamThreads) StreamKernel(const uint4* buffer, int64_t pieces, Flags* flags) {
  const uint64_t start = GlobalNs();
  if (blockIdx.x == 0 && threadIdx.x == 0) atomicExch(&flags->stream_started, 1);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kStreamThreads;
  uint32_t acc = 0;
  int64_t read = 0;
  int64_t i = static_cast<int64_t>(blockIdx.x) * kStreamThreads + threadIdx.x;
  while (GlobalNs() - start < kGiveUpNs) {
#pragma unroll 4
    for (int u = 0; u < 16; ++u) {
      const uint4 v = __ldcs(buffer + i);  // streamed: evict-first in L2
      acc ^= v.x ^ v.y ^ v.z ^ v.w;
      i += stride;
      if (i >= pieces) i -= pieces;
    }
    read += 16;
    if (LoadFlag(&flags->chase_done)) break;
  }
  if (acc == 0x9e3779b9u) atomicAdd(&flags->sink, 1ull);  // keeps the loads
  atomicAdd(&flags->stream_bytes, static_cast<unsigned long long>(read) * 16);
  if (blockIdx.x == 0 && threadIdx.x == 0) atomicMax(&flags->stream_ns, GlobalNs() - start);
}

// Waits for the stream (when there is one) and its ramp. False: the stream never started (the
// stream is then told to stop).
__device__ bool AwaitStream(bool with_stream, Flags* flags) {
  if (with_stream) {
    const uint64_t give_up = GlobalNs() + kGiveUpNs;
    while (LoadFlag(&flags->stream_started) == 0) {
      if (GlobalNs() > give_up) {
        atomicExch(&flags->chase_done, 1);
        return false;
      }
    }
  }
  const uint64_t settle = GlobalNs() + kSettleNs;
  while (GlobalNs() < settle) {
  }
  return true;
}

// One thread: waits for the stream, then follows the chain from entry `first` for kChaseSteps loads;
// ns_per_load gets the mean time of one (-1: the stream never started).
__global__ void ChaseKernel(const uint32_t* chain, uint32_t first, bool with_stream, Flags* flags,
                            double* ns_per_load) {
  if (!AwaitStream(with_stream, flags)) {
    *ns_per_load = -1;
    return;
  }
  uint32_t next = first;
  const uint64_t begin = GlobalNs();
  for (int s = 0; s < kChaseSteps; ++s) next = __ldcg(chain + next);
  const uint64_t end = GlobalNs();
  *ns_per_load = static_cast<double>(end - begin) / kChaseSteps;
  flags->sink = next;  // keeps the chase
  __threadfence();
  atomicExch(&flags->chase_done, 1);
}

// ---------------------------------------------------------------------------- instruction fetch

// kInstructions fused multiply-adds in a row (16 bytes of SASS each) over eight independent
// accumulators, so that a warp whose code is cached issues about one a cycle.
template <int kInstructions>
__device__ __forceinline__ void StraightLine(float (&acc)[8], float x, float y) {
#pragma unroll
  for (int i = 0; i < kInstructions; ++i) {
    asm volatile("fma.rn.f32 %0, %0, %1, %2;" : "+f"(acc[i % 8]) : "f"(x), "f"(y));
  }
}

// One warp: waits for the stream, then runs the same straight-line code twice (the pass loop is not
// unrolled, so the code exists once); pass_ns[0..1] get each pass's time.
template <int kInstructions>
__global__ void CodeKernel(const float* in, bool with_stream, Flags* flags, uint64_t* pass_ns) {
  if (!AwaitStream(with_stream, flags)) {
    pass_ns[0] = pass_ns[1] = 0;
    return;
  }
  float acc[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) acc[i] = in[i];
  const float x = in[8];
  const float y = in[9];
#pragma unroll 1
  for (int pass = 0; pass < 2; ++pass) {
    const uint64_t begin = GlobalNs();
    StraightLine<kInstructions>(acc, x, y);
    const uint64_t end = GlobalNs();
    if (threadIdx.x == 0) pass_ns[pass] = end - begin;
  }
  float sum = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) sum += acc[i];
  if (sum == 1234.5f) atomicAdd(&flags->sink, 1ull);  // keeps the code
  __threadfence();
  atomicExch(&flags->chase_done, 1);
}

// Other code, run before a measurement in 4 one-warp blocks an SM, which the block scheduler spreads
// over every SM: 256 KB, more than an SM's instruction caches hold.
constexpr int kEvictInstructions = 16384;

// Reads `pieces` 16-byte pieces of `buffer` with ordinary loads, evicting (among the rest) every
// kernel's code from L2.
__global__ void FlushL2Kernel(const uint4* buffer, int64_t pieces, Flags* flags) {
  uint32_t acc = 0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < pieces;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint4 v = buffer[i];
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x9e3779b9u) atomicAdd(&flags->sink, 1ull);
}

struct CodePoint {
  double cold_us = 0;  // the first pass, medians over kCodeRepeats
  double warm_us = 0;
};

constexpr int kCodeRepeats = 5;

// A chain through `bytes`: entry i (one per 128-byte line, as a uint32 index) holds the next entry's
// index, in a random cycle over every line.
uint32_t* MakeChain(int64_t bytes, std::mt19937_64& rng) {
  const int64_t lines = bytes / kLine;
  const int64_t per_line = kLine / sizeof(uint32_t);
  std::vector<uint32_t> order(lines);
  std::iota(order.begin(), order.end(), 0u);
  std::shuffle(order.begin() + 1, order.end(), rng);
  std::vector<uint32_t> host(lines * per_line, 0);
  for (int64_t i = 0; i < lines; ++i) {
    host[order[i] * per_line] = static_cast<uint32_t>(order[(i + 1) % lines] * per_line);
  }
  uint32_t* device = DeviceAlloc<uint32_t>(lines * per_line);
  BENCH_CHECK(cudaMemcpy(device, host.data(), host.size() * sizeof(uint32_t), cudaMemcpyHostToDevice));
  return device;
}

struct Point {
  double stream_gbs = 0;
  double ns_per_load = 0;
};

Point Measure(const uint32_t* chain, uint32_t first, const uint4* buffer, int stream_blocks,
              cudaStream_t chase_stream, cudaStream_t background_stream, Flags* flags, double* ns) {
  BENCH_CHECK(cudaMemset(flags, 0, sizeof(Flags)));
  BENCH_CHECK(cudaDeviceSynchronize());
  // The chase first, so its block is resident before the stream's blocks fill the SMs.
  ChaseKernel<<<1, 1, 0, chase_stream>>>(chain, first, stream_blocks > 0, flags, ns);
  BENCH_CHECK(cudaGetLastError());
  if (stream_blocks > 0) {
    StreamKernel<<<stream_blocks, kStreamThreads, 0, background_stream>>>(buffer, kStreamBytes / 16, flags);
    BENCH_CHECK(cudaGetLastError());
  }
  BENCH_CHECK(cudaDeviceSynchronize());
  Flags host;
  BENCH_CHECK(cudaMemcpy(&host, flags, sizeof(Flags), cudaMemcpyDeviceToHost));
  Point p;
  BENCH_CHECK(cudaMemcpy(&p.ns_per_load, ns, sizeof(double), cudaMemcpyDeviceToHost));
  if (stream_blocks > 0 && host.stream_ns > 0) p.stream_gbs = static_cast<double>(host.stream_bytes) / host.stream_ns;
  return p;
}

// One code size under one condition, kCodeRepeats times: the code kernel's code is fetched into L2 by
// a run of its own (in_l2) or L2 is flushed after the eviction code ran, and the code kernel then runs
// beside `stream_blocks` streaming blocks (none: idle).
template <int kInstructions>
CodePoint MeasureCode(bool in_l2, int stream_blocks, int sms, const float* in, const uint4* buffer,
                      cudaStream_t code_stream, cudaStream_t background_stream, Flags* flags, uint64_t* pass_ns) {
  std::vector<double> cold, warm;
  for (int r = 0; r < kCodeRepeats; ++r) {
    if (in_l2) CodeKernel<kInstructions><<<1, 32, 0, code_stream>>>(in, false, flags, pass_ns);
    CodeKernel<kEvictInstructions><<<4 * sms, 32, 0, code_stream>>>(in, false, flags, pass_ns + 2);
    if (!in_l2) FlushL2Kernel<<<4 * sms, 256, 0, code_stream>>>(buffer, (int64_t{512} << 20) / 16, flags);
    BENCH_CHECK(cudaGetLastError());
    BENCH_CHECK(cudaDeviceSynchronize());
    BENCH_CHECK(cudaMemset(flags, 0, sizeof(Flags)));
    CodeKernel<kInstructions><<<1, 32, 0, code_stream>>>(in, stream_blocks > 0, flags, pass_ns);
    BENCH_CHECK(cudaGetLastError());
    if (stream_blocks > 0) {
      StreamKernel<<<stream_blocks, kStreamThreads, 0, background_stream>>>(buffer, kStreamBytes / 16, flags);
      BENCH_CHECK(cudaGetLastError());
    }
    BENCH_CHECK(cudaDeviceSynchronize());
    uint64_t ns[2];
    BENCH_CHECK(cudaMemcpy(ns, pass_ns, sizeof(ns), cudaMemcpyDeviceToHost));
    cold.push_back(ns[0] / 1e3);
    warm.push_back(ns[1] / 1e3);
  }
  std::sort(cold.begin(), cold.end());
  std::sort(warm.begin(), warm.end());
  return {cold[kCodeRepeats / 2], warm[kCodeRepeats / 2]};
}

template <int kInstructions>
void PrintCodeRow(int sms, const float* in, const uint4* buffer, cudaStream_t code_stream,
                  cudaStream_t background_stream, Flags* flags, uint64_t* pass_ns) {
  const int saturating = 4 * sms;  // the chase table's last row
  std::printf("%8d KB", kInstructions * 16 / 1024);
  for (const bool in_l2 : {true, false}) {
    for (const int blocks : {0, saturating}) {
      const CodePoint p =
          MeasureCode<kInstructions>(in_l2, blocks, sms, in, buffer, code_stream, background_stream, flags, pass_ns);
      std::printf("   %6.2f / %5.2f", p.cold_us, p.warm_us);
    }
  }
  std::printf("\n");
  std::fflush(stdout);
}

int Main() {
  const testing::BenchDevice d = testing::OpenBenchDevice("memory_latency_bench");
  std::mt19937_64 rng(7);
  const uint32_t* l2_chain = MakeChain(kL2ChainBytes, rng);
  const uint32_t* hbm_chain = MakeChain(kHbmChainBytes, rng);
  uint4* buffer = DeviceAlloc<uint4>(kStreamBytes / 16);
  BENCH_CHECK(cudaMemset(buffer, 1, kStreamBytes));
  Flags* flags = DeviceAlloc<Flags>(1);
  double* ns = DeviceAlloc<double>(1);
  cudaStream_t chase_stream, background_stream;
  BENCH_CHECK(cudaStreamCreateWithFlags(&chase_stream, cudaStreamNonBlocking));
  BENCH_CHECK(cudaStreamCreateWithFlags(&background_stream, cudaStreamNonBlocking));
  const int sms = d.prop.multiProcessorCount;
  // Both kernels loaded now: with lazy loading, the stream's first launch would wait for an idle
  // device while the chase spins waiting for it.
  cudaFuncAttributes attributes;
  BENCH_CHECK(cudaFuncGetAttributes(&attributes, ChaseKernel));
  BENCH_CHECK(cudaFuncGetAttributes(&attributes, StreamKernel));

  std::printf("\none dependent load (a single thread's pointer chase, ld.global.cg), %d loads a point,\n"
              "while StreamKernel reads a 4 GiB buffer (16-byte streaming loads) from the given blocks\n"
              "(copy bandwidth counts bytes read and written; a stream that only reads can exceed it):\n\n",
              kChaseSteps);
  std::printf("%14s %12s %14s %14s %14s\n", "stream blocks", "stream GB/s", "of copy BW", "L2 hit ns",
              "HBM miss ns");
  std::fflush(stdout);
  // Each HBM chase starts at a random entry of its 16 Mi-line cycle, so no point finds the lines of an
  // earlier one in L2.
  std::uniform_int_distribution<uint32_t> hbm_line(0, kHbmChainBytes / kLine - 1);
  constexpr uint32_t kPerLine = kLine / sizeof(uint32_t);
  for (const int per_sm_eighths : {0, 1, 2, 4, 8, 12, 16, 24, 32}) {  // blocks per SM, in eighths
    const int blocks = sms * per_sm_eighths / 8;
    Measure(l2_chain, 0, buffer, 0, chase_stream, background_stream, flags, ns);  // the 4 MB chain into L2
    const Point l2 = Measure(l2_chain, 0, buffer, blocks, chase_stream, background_stream, flags, ns);
    const Point hbm =
        Measure(hbm_chain, hbm_line(rng) * kPerLine, buffer, blocks, chase_stream, background_stream, flags, ns);
    const double gbs = (l2.stream_gbs + hbm.stream_gbs) / 2;
    std::printf("%14d %12.0f %13.0f%% %14.0f %14.0f\n", blocks, gbs, 100.0 * gbs / d.copy_gbs, l2.ns_per_load,
                hbm.ns_per_load);
    std::fflush(stdout);
  }

  float* in = DeviceAlloc<float>(10);
  const std::vector<float> host_in = {0.5f, 0.25f, 0.125f, 1.0f, 2.0f, -1.0f, 0.75f, 0.0625f, 0.999f, 1e-3f};
  BENCH_CHECK(cudaMemcpy(in, host_in.data(), host_in.size() * sizeof(float), cudaMemcpyHostToDevice));
  uint64_t* pass_ns = DeviceAlloc<uint64_t>(4);
  std::printf("\none warp running straight-line code (fused multiply-adds, 16 bytes each) twice, right after\n"
              "every SM ran %d KB of other code; us of the first pass / the second (cached), medians of %d;\n"
              "the code in L2, or only in HBM (L2 flushed); idle, or beside StreamKernel on %d blocks:\n\n",
              kEvictInstructions * 16 / 1024, kCodeRepeats, 4 * sms);
  std::printf("%11s %16s %16s %16s %16s\n", "code", "L2, idle", "L2, stream", "HBM, idle", "HBM, stream");
  PrintCodeRow<256>(sms, in, buffer, chase_stream, background_stream, flags, pass_ns);
  PrintCodeRow<1024>(sms, in, buffer, chase_stream, background_stream, flags, pass_ns);
  PrintCodeRow<2048>(sms, in, buffer, chase_stream, background_stream, flags, pass_ns);
  PrintCodeRow<4096>(sms, in, buffer, chase_stream, background_stream, flags, pass_ns);
  return 0;
}

}  // namespace
}  // namespace cohort

int main() { return cohort::Main(); }
