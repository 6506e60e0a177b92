// Times the prefill attention (kernels/attention.h, LaunchFlashPrefill) on DeepSeek-V2/V3 heads (128
// nope + 64 rope query values, 128 values, 16 heads as in V2-Lite) for the chunk shapes a prefill
// step runs: whole prompts of 1024 to 16384 tokens, and chunks at the end of longer contexts (chunked
// prefill). FLOPs count the causal work only (2 (nope + rope + v) per visible (query, key) pair and
// head); "% peak" is against the dense bf16 peak (--peak-tflops, 989 for an H200).
//
//   build/bin/attention_bench [--peak-tflops N]
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "kernels/attention.h"
#include "tests/testing/gpu_bench.h"

namespace cohort {
namespace {

using testing::DeviceAlloc;

constexpr int kHeads = 16, kNope = 128, kRope = 64, kV = 128, kRank = 512;
constexpr int kReps = 20;

struct Shape {
  int queries, first_position;
};

int Run(double peak_tflops) {
  const testing::BenchDevice bench = testing::OpenBenchDevice("attention_bench");
  const Shape shapes[] = {{1024, 0}, {4096, 0}, {16384, 0}, {1024, 3072}, {512, 7680}, {2048, 14336}};
  int max_keys = 0, max_queries = 0;
  for (const Shape& s : shapes) {
    max_keys = std::max(max_keys, s.first_position + s.queries);
    max_queries = std::max(max_queries, s.queries);
  }
  const int qk = kNope + kRope, width = kRank + kRope;
  __nv_bfloat16* q = DeviceAlloc<__nv_bfloat16>(int64_t{max_queries} * kHeads * qk);
  const int64_t ld = (max_keys + 7) / 8 * 8;  // keys a row of the transposed values
  __nv_bfloat16* k = DeviceAlloc<__nv_bfloat16>(int64_t{max_keys} * kHeads * kNope);
  __nv_bfloat16* v_t = DeviceAlloc<__nv_bfloat16>(int64_t{kHeads} * kV * ld);
  __nv_bfloat16* latent = DeviceAlloc<__nv_bfloat16>(int64_t{max_keys} * width);
  __nv_bfloat16* out = DeviceAlloc<__nv_bfloat16>(int64_t{max_queries} * kHeads * kV);
  // Small random-looking values (a ramp of bf16 bit patterns), never zeros: zeros can run faster.
  std::vector<uint16_t> fill(std::max({int64_t{kHeads} * kV * ld, int64_t{max_keys} * kHeads * kNope,
                                       int64_t{max_queries} * kHeads * qk, int64_t{max_keys} * width}));
  for (size_t i = 0; i < fill.size(); ++i) fill[i] = static_cast<uint16_t>(0x3c00 + (i * 2654435761u >> 20) % 0x200);
  BENCH_CHECK(cudaMemcpy(v_t, fill.data(), int64_t{kHeads} * kV * ld * 2, cudaMemcpyHostToDevice));
  BENCH_CHECK(cudaMemcpy(k, fill.data(), int64_t{max_keys} * kHeads * kNope * 2, cudaMemcpyHostToDevice));
  BENCH_CHECK(cudaMemcpy(q, fill.data(), int64_t{max_queries} * kHeads * qk * 2, cudaMemcpyHostToDevice));
  BENCH_CHECK(cudaMemcpy(latent, fill.data(), int64_t{max_keys} * width * 2, cudaMemcpyHostToDevice));

  std::printf("flash prefill attention, %d heads of %d + %d query values and %d values; peak %.0f TFLOP/s\n\n",
              kHeads, kNope, kRope, kV, peak_tflops);
  std::printf(" queries  context        us   TFLOP/s   %% peak\n");
  for (const Shape& s : shapes) {
    kernels::FlashPrefillParams p;
    p.q = q;
    p.q_row_stride = kHeads * qk;
    p.q_head_stride = qk;
    p.k = k;
    p.k_row_stride = kHeads * kNope;
    p.k_head_stride = kNope;
    p.v_t = v_t;
    p.v_t_head_stride = kV * ld;
    p.v_t_row_stride = ld;
    p.k_rope = latent + kRank;
    p.k_rope_row_stride = width;
    p.out = out;
    p.out_row_stride = kHeads * kV;
    p.out_head_stride = kV;
    p.queries = s.queries;
    p.keys = s.first_position + s.queries;
    p.first_position = s.first_position;
    p.heads = kHeads;
    p.nope = kNope;
    p.rope = kRope;
    p.v_dim = kV;
    p.softmax_scale = 0.0722f;
    const double us = testing::MedianMicros(bench.stream, 3, kReps,
                                            [&] { BENCH_CHECK(kernels::LaunchFlashPrefill(p, bench.stream)); });
    // Visible (query, key) pairs: query r sees first_position + r + 1 keys.
    const double n = s.queries, pairs = n * s.first_position + n * (n + 1) / 2;
    const double tflops = 2.0 * kHeads * pairs * (qk + kV) / (us * 1e-6) / 1e12;
    std::printf("%8d %8d %9.1f %9.1f %7.1f%%\n", s.queries, s.first_position + s.queries, us, tflops,
                100.0 * tflops / peak_tflops);
  }
  return 0;
}

}  // namespace
}  // namespace cohort

int main(int argc, char** argv) {
  double peak = 989.0;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--peak-tflops") == 0 && i + 1 < argc) {
      peak = std::atof(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: attention_bench [--peak-tflops N]\n");
      return 2;
    }
  }
  if (!(peak > 0)) {
    std::fprintf(stderr, "attention_bench: --peak-tflops must be positive\n");
    return 2;
  }
  return cohort::Run(peak);
}
