// Times the expert GEMMs of one DeepSeek-V2-Lite MoE layer (kernels/moe.h), routed and shared experts
// together as the engine runs them: the gate_up grouped GEMM ending in SiLU-and-mul (silu_mul) + the
// down grouped GEMM, for T = 1, 2, 4, ..., 512 decode tokens, the token counts around
// MoeDefaultTileRows's switch-overs, and prefills up to 4096 tokens, at each tile size (the default one
// starred). It first measures the device-to-device copy bandwidth (a 1 GiB cudaMemcpyAsync, bytes read
// + written): the ceiling a decode step can approach.
//
// "unfused us" times the same layer the way it ran before silu_mul (gate_up GEMM to [R, 2I], then
// LaunchMoeSiluMul, then down) and "gain" is unfused us / us per layer.
//
// Routing is the gate on random logits; each token also has a row for each of the 2 shared experts.
// Each graph replays kLayers layers with distinct weights (the whole expert set of a layer is 66 x
// 17.3 MB), so no layer finds its weights in L2 from an earlier one; the time per layer is the median
// replay divided by kLayers. "experts" counts the routed experts used plus the shared ones; "weight
// MB" counts each of them once: the bytes a decode step must stream. "rows" are T*(k + shared).
// "route us" is gate + align + combine per layer.
//
//   build/bin/moe_bench
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "kernels/moe.h"
#include "tests/testing/gpu_bench.h"

namespace cohort {
namespace {

using testing::DeviceAlloc;

constexpr int kExperts = 64;  // routed
constexpr int kTopK = 6;
constexpr int kShared = 2;
constexpr int64_t kHidden = 2048;
constexpr int64_t kIntermediate = 1408;
constexpr int kLayers = 4;
constexpr int64_t kMaxTokens = 4096;

uint16_t FloatToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// Random bf16 values in [-1, 1): copies of one random 64 MiB block (never zeros: zeros can run faster).
void FillRandomBf16(__nv_bfloat16* device, int64_t count, std::mt19937& rng) {
  static std::vector<uint16_t> block;
  if (block.empty()) {
    block.resize(int64_t{32} << 20);
    std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
    for (uint16_t& v : block) v = FloatToBf16(dist(rng));
  }
  for (int64_t done = 0; done < count;) {
    const int64_t n = std::min<int64_t>(count - done, static_cast<int64_t>(block.size()));
    BENCH_CHECK(cudaMemcpy(device + done, block.data(), n * sizeof(uint16_t), cudaMemcpyHostToDevice));
    done += n;
  }
}

int Run() {
  const testing::BenchDevice bench = testing::OpenBenchDevice("moe_bench");
  const cudaStream_t stream = bench.stream;
  const double copy_gbs = bench.copy_gbs;

  const int64_t n1 = 2 * kIntermediate, k1 = kHidden, n2 = kHidden, k2 = kIntermediate;
  const int64_t expert_elems = n1 * k1 + n2 * k2;
  std::printf(
      "V2-Lite experts: E=%d k=%d shared=%d, gate_up %lldx%lld, down %lldx%lld, %.1f MB per expert, %d layers\n",
      kExperts, kTopK, kShared, static_cast<long long>(n1), static_cast<long long>(k1), static_cast<long long>(n2),
      static_cast<long long>(k2), 2e-6 * expert_elems, kLayers);

  std::mt19937 rng(std::random_device{}());
  __nv_bfloat16* gate_up[kLayers];
  __nv_bfloat16* down[kLayers];
  constexpr int64_t kAllExperts = kExperts + kShared;
  for (int l = 0; l < kLayers; ++l) {
    gate_up[l] = DeviceAlloc<__nv_bfloat16>(kAllExperts * n1 * k1);
    down[l] = DeviceAlloc<__nv_bfloat16>(kAllExperts * n2 * k2);
    FillRandomBf16(gate_up[l], kAllExperts * n1 * k1, rng);
    FillRandomBf16(down[l], kAllExperts * n2 * k2, rng);
  }
  const int64_t max_pairs = kMaxTokens * kTopK, max_rows = kMaxTokens * (kTopK + kShared);
  __nv_bfloat16* hidden = DeviceAlloc<__nv_bfloat16>(kMaxTokens * kHidden);
  __nv_bfloat16* y1 = DeviceAlloc<__nv_bfloat16>(max_rows * n1);
  __nv_bfloat16* act = DeviceAlloc<__nv_bfloat16>(max_rows * k2);
  __nv_bfloat16* y2 = DeviceAlloc<__nv_bfloat16>(max_rows * n2);
  __nv_bfloat16* out = DeviceAlloc<__nv_bfloat16>(kMaxTokens * kHidden);
  float* logits = DeviceAlloc<float>(kMaxTokens * kExperts);
  int32_t* topk_ids = DeviceAlloc<int32_t>(max_pairs);
  float* topk_weights = DeviceAlloc<float>(max_pairs);
  int32_t* experts_used = DeviceAlloc<int32_t>(1);
  const int64_t workspace_bytes = MoeRoutingWorkspaceBytes(kMaxTokens, kTopK, kExperts, kShared);
  void* workspace = DeviceAlloc<char>(workspace_bytes);
  FillRandomBf16(hidden, kMaxTokens * kHidden, rng);
  {
    std::vector<float> host(kMaxTokens * kExperts);
    std::normal_distribution<float> dist(0.0f, 1.0f);
    for (float& v : host) v = dist(rng);
    BENCH_CHECK(cudaMemcpy(logits, host.data(), host.size() * sizeof(float), cudaMemcpyHostToDevice));
  }
  BENCH_CHECK(cudaDeviceSynchronize());  // the fills, before work on the non-blocking stream
  MoeGateParams gate;
  gate.num_experts = kExperts;
  gate.top_k = kTopK;

  std::printf("\n%6s %6s %5s %10s %8s %10s %8s %7s %8s %11s %6s %9s\n", "tokens", "rows", "tile", "us/layer",
              "experts", "weight MB", "GB/s", "of copy", "TFLOP/s", "unfused us", "gain", "route us");
  // MoeDefaultTileRows' switch-overs: 16 -> 64 past 96 tokens (with shared experts); 512 and 768
  // tokens give 62 and 93 rows per expert, either side of the 64 -> 128 one at 64. The decode graphs'
  // batch sizes from 32 to 512 among them.
  for (const int64_t tokens : {1, 2, 4, 8, 16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 256, 320, 384, 448, 512, 768,
                               1024, 2048, 4096}) {
    const int64_t rows = tokens * (kTopK + kShared);
    const int default_tile = MoeDefaultTileRows(tokens, kTopK, kExperts, kShared);
    const int reps = tokens <= 512 ? 100 : 20;
    for (const int tile_rows : {16, 64, 128}) {
      MoeRouting routing;
      BENCH_CHECK(
          CarveMoeRouting(workspace, workspace_bytes, tokens, kTopK, kExperts, kShared, tile_rows, &routing));
      BENCH_CHECK(LaunchMoeGate(logits, nullptr, tokens, gate, topk_ids, topk_weights, stream));
      BENCH_CHECK(cudaMemsetAsync(experts_used, 0, sizeof(int32_t), stream));
      BENCH_CHECK(LaunchMoeAlign(topk_ids, routing, experts_used, stream));
      int32_t used = 0;
      BENCH_CHECK(cudaMemcpyAsync(&used, experts_used, sizeof(int32_t), cudaMemcpyDeviceToHost, stream));
      BENCH_CHECK(cudaStreamSynchronize(stream));

      // Microseconds per layer of the expert GEMMs, with the SiLU-and-mul fused into gate_up or not.
      auto time_experts = [&](bool fused) {
        const cudaGraphExec_t experts_graph = testing::CaptureGraph(stream, [&] {
          for (int l = 0; l < kLayers; ++l) {
            if (fused) {
              BENCH_CHECK(LaunchMoeGroupedGemm({hidden, true, gate_up[l], kIntermediate, k1, act, /*silu_mul=*/true},
                                               routing, stream));
            } else {
              BENCH_CHECK(LaunchMoeGroupedGemm({hidden, true, gate_up[l], n1, k1, y1}, routing, stream));
              BENCH_CHECK(
                  LaunchMoeSiluMul(y1, rows, kIntermediate, routing.expert_offsets + kAllExperts, act, stream));
            }
            // The routing is complete (the engine's align is two launches back): as there, the down
            // product requests its first weights before it waits for the gate_up product.
            BENCH_CHECK(LaunchMoeGroupedGemm({act, false, down[l], n2, k2, y2, /*silu_mul=*/false,
                                              /*routing_ready=*/true},
                                             routing, stream));
          }
        });
        const double us =
            testing::MedianMicros(stream, 3, reps, [&] { BENCH_CHECK(cudaGraphLaunch(experts_graph, stream)); }) /
            kLayers;
        BENCH_CHECK(cudaGraphExecDestroy(experts_graph));
        return us;
      };
      const double us = time_experts(/*fused=*/true);
      const double unfused_us = time_experts(/*fused=*/false);

      double route_us = 0.0;
      if (tile_rows == default_tile) {
        const cudaGraphExec_t route_graph = testing::CaptureGraph(stream, [&] {
          for (int l = 0; l < kLayers; ++l) {
            BENCH_CHECK(
                LaunchMoeRoute(logits, nullptr, gate, nullptr, topk_ids, topk_weights, routing, nullptr, stream));
            BENCH_CHECK(LaunchMoeCombine(y2, topk_weights, routing, {}, kHidden, out, stream));
          }
        });
        route_us = testing::MedianMicros(stream, 3, reps, [&] { BENCH_CHECK(cudaGraphLaunch(route_graph, stream)); }) /
                   kLayers;
        BENCH_CHECK(cudaGraphExecDestroy(route_graph));
      }

      const int experts_read = used + kShared;
      const double weight_bytes = 2.0 * experts_read * expert_elems;
      const double gbs = weight_bytes / us / 1e3;
      const double tflops = 2.0 * rows * expert_elems / us / 1e6;
      std::printf("%6lld %6lld %4d%c %10.1f %8d %10.1f %8.0f %6.0f%% %8.1f %11.1f %5.2fx",
                  static_cast<long long>(tokens), static_cast<long long>(rows), tile_rows,
                  tile_rows == default_tile ? '*' : ' ', us, experts_read, weight_bytes / 1e6, gbs,
                  100.0 * gbs / copy_gbs, tflops, unfused_us, unfused_us / us);
      if (route_us > 0.0) std::printf(" %9.1f", route_us);
      std::printf("\n");
    }
  }
  BENCH_CHECK(cudaDeviceSynchronize());
  return 0;
}

}  // namespace
}  // namespace cohort

int main() { return cohort::Run(); }
