// Times the attention kernels on DeepSeek-V2/V3 heads (16 heads as in V2-Lite):
// - the prefill attention (kernels/attention.h, LaunchFlashPrefill; 128 nope + 64 rope query values,
//   128 values) for the chunk shapes a prefill step runs: whole prompts of 1024 to 16384 tokens,
//   chunks at the end of longer contexts (chunked prefill), and several sequences' chunks in one
//   launch (timed also as one launch a chunk). FLOPs count the causal work only
//   (2 (nope + rope + v) per visible (query, key) pair and head); "% peak" is against the dense bf16
//   peak (--peak-tflops, 989 for an H200);
// - the decode attention (kernels/mla_decode.h, LaunchMlaDecode with its split merge; latent 512 +
//   rope 64) for decode steps of 1 to 512 sequences at contexts of 1024 and 4096, of 1 to 512 at
//   1024 with the first sequence at 32768 (one long request among short ones), and of 16 to 512
//   with the same tokens spread evenly from almost none to twice the context ("~1024"; for these
//   two "splits" reads "default cut/work items" of MlaDecodePlanner's plan), with the engine's
//   context splits and 64-token cache blocks scattered at random (as a long-running server's block
//   tables are), and again with each sequence's blocks in order. It is a read of the cache, so
//   "% copy" is the cache bytes over the time against the copy bandwidth measured at the start. Each
//   shape runs as the step does, once a layer over as many layers' caches (a graph of launches) as
//   keep a layer's cache from still being in L2 when it is read again.
//
//   build/bin/attention_bench [--peak-tflops N] [--decode-only | --prefill-only]
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/attention.h"
#include "kernels/mla_decode.h"
#include "tests/testing/gpu_bench.h"

namespace cohort {
namespace {

using testing::DeviceAlloc;

constexpr int kHeads = 16, kNope = 128, kRope = 64, kV = 128, kRank = 512;
constexpr int kReps = 20;

struct Shape {
  int chunks, queries, first_position;  // chunks of queries at first_position, in one launch
};

// Small random-looking values (a ramp of bf16 bit patterns), never zeros: zeros can run faster.
std::vector<uint16_t> Ramp(int64_t count) {
  std::vector<uint16_t> fill(count);
  for (size_t i = 0; i < fill.size(); ++i) fill[i] = static_cast<uint16_t>(0x3c00 + (i * 2654435761u >> 20) % 0x200);
  return fill;
}

void RunPrefill(const testing::BenchDevice& bench, double peak_tflops) {
  const Shape shapes[] = {{1, 1024, 0},    {1, 4096, 0},     {1, 16384, 0},   {1, 1024, 3072},
                          {1, 512, 7680},   {1, 2048, 14336}, {16, 1024, 0},   {8, 512, 1536}};
  int max_keys = 0, max_queries = 0;
  for (const Shape& s : shapes) {
    max_keys = std::max(max_keys, s.chunks * (s.first_position + s.queries));
    max_queries = std::max(max_queries, s.chunks * s.queries);
  }
  const int qk = kNope + kRope, width = kRank + kRope;
  __nv_bfloat16* q = DeviceAlloc<__nv_bfloat16>(int64_t{max_queries} * kHeads * qk);
  const int64_t ld = (max_keys + 7) / 8 * 8;  // keys a row of the transposed values
  __nv_bfloat16* k = DeviceAlloc<__nv_bfloat16>(int64_t{max_keys} * kHeads * kNope);
  __nv_bfloat16* v_t = DeviceAlloc<__nv_bfloat16>(int64_t{kHeads} * kV * ld);
  __nv_bfloat16* latent = DeviceAlloc<__nv_bfloat16>(int64_t{max_keys} * width);
  __nv_bfloat16* out = DeviceAlloc<__nv_bfloat16>(int64_t{max_queries} * kHeads * kV);
  const std::vector<uint16_t> fill = Ramp(std::max({int64_t{kHeads} * kV * ld, int64_t{max_keys} * kHeads * kNope,
                                                    int64_t{max_queries} * kHeads * qk, int64_t{max_keys} * width}));
  BENCH_CHECK(cudaMemcpy(v_t, fill.data(), int64_t{kHeads} * kV * ld * 2, cudaMemcpyHostToDevice));
  BENCH_CHECK(cudaMemcpy(k, fill.data(), int64_t{max_keys} * kHeads * kNope * 2, cudaMemcpyHostToDevice));
  BENCH_CHECK(cudaMemcpy(q, fill.data(), int64_t{max_queries} * kHeads * qk * 2, cudaMemcpyHostToDevice));
  BENCH_CHECK(cudaMemcpy(latent, fill.data(), int64_t{max_keys} * width * 2, cudaMemcpyHostToDevice));

  std::printf("flash prefill attention, %d heads of %d + %d query values and %d values; peak %.0f TFLOP/s\n\n",
              kHeads, kNope, kRope, kV, peak_tflops);
  std::printf("  chunks  queries  context        us   TFLOP/s   %% peak\n");
  for (const Shape& s : shapes) {
    std::vector<kernels::FlashChunk> chunks;
    for (int c = 0; c < s.chunks; ++c) {
      const int context = s.first_position + s.queries;
      chunks.push_back({c * s.queries, s.queries, s.first_position, c * context, context});
    }
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
    p.chunks = chunks.data();
    p.num_chunks = s.chunks;
    p.heads = kHeads;
    p.nope = kNope;
    p.rope = kRope;
    p.v_dim = kV;
    p.softmax_scale = 0.0722f;
    // Visible (query, key) pairs: query r sees first_position + r + 1 keys.
    const double n = s.queries, pairs = s.chunks * (n * s.first_position + n * (n + 1) / 2);
    const auto report = [&](const char* how, double us) {
      const double tflops = 2.0 * kHeads * pairs * (qk + kV) / (us * 1e-6) / 1e12;
      std::printf("%8d %8d %8d %9.1f %9.1f %7.1f%%%s\n", s.chunks, s.queries, s.first_position + s.queries, us, tflops,
                  100.0 * tflops / peak_tflops, how);
    };
    report("", testing::MedianMicros(bench.stream, 3, kReps,
                                     [&] { BENCH_CHECK(kernels::LaunchFlashPrefill(p, bench.stream)); }));
    if (s.chunks > 1) {  // as the engine ran several chunks before they shared a launch
      report("  (a launch a chunk)", testing::MedianMicros(bench.stream, 3, kReps, [&] {
               for (const kernels::FlashChunk& chunk : chunks) {
                 kernels::FlashPrefillParams one = p;
                 one.chunks = &chunk;
                 one.num_chunks = 1;
                 BENCH_CHECK(kernels::LaunchFlashPrefill(one, bench.stream));
               }
             }));
    }
  }
  BENCH_CHECK(cudaFree(q));
  BENCH_CHECK(cudaFree(k));
  BENCH_CHECK(cudaFree(v_t));
  BENCH_CHECK(cudaFree(latent));
  BENCH_CHECK(cudaFree(out));
}

void RunDecode(const testing::BenchDevice& bench) {
  constexpr int kBlockTokens = 64;
  constexpr int64_t kSplitPairs = 1024;      // the engine's split workspace (worker/model/cuda/cuda_engine.cc)
  constexpr int64_t kLayersBytes = 512 << 20;  // cache read between two reads of one layer's: well past L2
  struct DecodeShape {
    int context, batch, long_context;  // long_context > 0: the first sequence's instead
    bool spread = false;               // contexts spread evenly from almost none to twice `context`
  };
  std::vector<DecodeShape> shapes;
  // 192: a part-empty wave unsplit (split at 4096 tokens); 320 to 448: past one wave unsplit.
  for (const int context : {1024, 4096}) {
    for (const int batch : {1, 4, 16, 64, 128, 192, 256, 320, 384, 448, 512}) shapes.push_back({context, batch, 0});
  }
  // One long request among short ones (MlaDecodePlanner's uneven cut).
  for (const int batch : {1, 16, 64, 256, 512}) shapes.push_back({1024, batch, 32768});
  // A server's batch: the same tokens spread out (cohort bench step --spread-contexts).
  for (const int context : {1024, 4096}) {
    for (const int batch : {16, 64, 128, 256, 320, 384, 512}) shapes.push_back({context, batch, 0, true});
  }
  // Each sequence's tokens of context.
  const auto contexts_of = [](const DecodeShape& d) {
    std::vector<int> tokens(d.batch, d.context);
    if (d.spread) {
      for (int q = 0; q < d.batch; ++q) {
        tokens[q] = std::max(1, static_cast<int>(int64_t{d.context} * (2 * q + 1) / d.batch));
      }
    }
    if (d.long_context > 0) tokens[0] = d.long_context;
    return tokens;
  };  const int width = kRank + kRope;
  const int64_t row_bytes = int64_t{width} * 2;
  int blocks_per_sm = 0;
  BENCH_CHECK(kernels::MlaDecodeResidentBlocks(kRank, kRope, &blocks_per_sm));
  const int64_t resident = int64_t{bench.prop.multiProcessorCount} * blocks_per_sm;
  const auto blocks_of = [](int tokens) { return (tokens + kBlockTokens - 1) / kBlockTokens; };

  // One pool of cache blocks serves every shape: each shape's layers are consecutive runs of it.
  int64_t pool_blocks = 0, max_queries = 0, max_plan_ints = 0;
  for (const DecodeShape& d : shapes) {
    int64_t blocks = 0;
    for (const int t : contexts_of(d)) blocks += blocks_of(t);
    const int64_t layers = std::max<int64_t>(1, kLayersBytes / (blocks * kBlockTokens * row_bytes));
    pool_blocks = std::max(pool_blocks, blocks * layers);
    max_queries = std::max<int64_t>(max_queries, d.batch);
    const kernels::MlaDecodeShape shape =
        kernels::MlaDecodeShapeFor(d.batch, kHeads, 64, resident, kSplitPairs, /*uneven=*/true);
    max_plan_ints = std::max<int64_t>(max_plan_ints, kernels::MlaPlanBytes(shape) / 4);
  }
  __nv_bfloat16* cache = DeviceAlloc<__nv_bfloat16>(pool_blocks * kBlockTokens * width);
  const std::vector<uint16_t> fill = Ramp(int64_t{64} << 20);
  for (int64_t done = 0, total = pool_blocks * kBlockTokens * width; done < total;) {
    const int64_t n = std::min<int64_t>(fill.size(), total - done);
    BENCH_CHECK(cudaMemcpy(cache + done, fill.data(), n * 2, cudaMemcpyHostToDevice));
    done += n;
  }
  __nv_bfloat16* q_latent = DeviceAlloc<__nv_bfloat16>(max_queries * kHeads * kRank);
  __nv_bfloat16* q_rope = DeviceAlloc<__nv_bfloat16>(max_queries * kHeads * kRope);
  BENCH_CHECK(cudaMemcpy(q_latent, fill.data(), max_queries * kHeads * kRank * 2, cudaMemcpyHostToDevice));
  BENCH_CHECK(cudaMemcpy(q_rope, fill.data(), max_queries * kHeads * kRope * 2, cudaMemcpyHostToDevice));
  __nv_bfloat16* out = DeviceAlloc<__nv_bfloat16>(max_queries * kHeads * kRank);
  float* workspace = DeviceAlloc<float>(kernels::MlaSplitWorkspaceFloats(kSplitPairs, kHeads, kRank));
  // The plan (merge rows, then work items), then the block tables.
  int32_t* inputs = DeviceAlloc<int32_t>(max_plan_ints + pool_blocks);

  std::printf("\nMLA decode attention (latent %d + rope %d, %d heads), %d-token cache blocks at random; "
              "copy bandwidth %.0f GB/s\n\n", kRank, kRope, kHeads, kBlockTokens, bench.copy_gbs);
  std::printf("                                         scattered blocks      blocks in order\n");
  std::printf("    context  batch  splits  layers   cache MB    us/layer  %% copy    us/layer  %% copy\n");
  std::mt19937 random(1234);
  kernels::MlaDecodePlanner planner;
  for (const DecodeShape& d : shapes) {
    const int batch = d.batch;
    const std::vector<int> contexts = contexts_of(d);
    // As the engine plans: with room for uneven cuts, kept only where the plan takes them.
    std::vector<int32_t> positions(batch), table_offsets(batch);
    int64_t blocks = 0, tokens = 0;
    for (int q = 0; q < batch; ++q) {
      positions[q] = contexts[q] - 1;
      table_offsets[q] = static_cast<int32_t>(blocks);
      blocks += blocks_of(contexts[q]);
      tokens += contexts[q];
    }
    const int layers = static_cast<int>(std::max<int64_t>(1, kLayersBytes / (blocks * kBlockTokens * row_bytes)));
    const int splits = kernels::MlaDecodeSplits(batch, kHeads, *std::max_element(contexts.begin(), contexts.end()),
                                                resident, kSplitPairs);
    const auto shape_for = [&](bool room) {
      return kernels::MlaDecodeShapeFor(batch, kHeads, splits, resident, kSplitPairs, room);
    };
    const kernels::MlaDecodeShape shape = shape_for(planner.Choose(shape_for(true), positions.data(), false));
    std::vector<int32_t> host(kernels::MlaPlanBytes(shape) / 4 + blocks);
    auto* merges = reinterpret_cast<kernels::MlaMergeRow*>(host.data());
    auto* work = reinterpret_cast<kernels::MlaWorkItem*>(merges + shape.merge_rows);
    BENCH_CHECK(planner.Write(shape, positions.data(), table_offsets.data(), work, merges) ? cudaSuccess
                                                                                            : cudaErrorInvalidValue);
    int items = 0;
    while (items < shape.work_slots && work[items].query >= 0) ++items;
    const int64_t plan_ints = host.size() - blocks;
    int32_t* tables = host.data() + plan_ints;
    std::iota(tables, tables + blocks, 0);

    kernels::MlaDecodeParams p;
    p.q_latent = q_latent;
    p.q_rope = q_rope;
    p.q_rope_row_stride = kHeads * kRope;
    p.q_rope_head_stride = kRope;
    p.block_tables = inputs + plan_ints;
    p.block_size = kBlockTokens;
    p.heads = kHeads;
    p.kv_lora_rank = kRank;
    p.rope_dim = kRope;
    p.softmax_scale = 0.0722f;
    p.shape = shape;
    p.merges = reinterpret_cast<const kernels::MlaMergeRow*>(inputs);
    p.work = reinterpret_cast<const kernels::MlaWorkItem*>(p.merges + shape.merge_rows);
    p.step_tokens_bound = 1;
    p.out = out;
    p.partial_out = workspace;
    p.partial_lse = workspace + kSplitPairs * kHeads * kRank;
    const cudaGraphExec_t graph = testing::CaptureGraph(bench.stream, [&] {
      for (int layer = 0; layer < layers; ++layer) {
        p.cache = cache + layer * blocks * kBlockTokens * width;
        BENCH_CHECK(kernels::LaunchMlaDecode(p, bench.stream));
      }
    });
    const auto time_layer = [&] {
      BENCH_CHECK(cudaMemcpy(inputs, host.data(), host.size() * sizeof(int32_t), cudaMemcpyHostToDevice));
      return testing::MedianMicros(bench.stream, 2, 10, [&] { BENCH_CHECK(cudaGraphLaunch(graph, bench.stream)); }) /
             layers;
    };
    const double in_order = time_layer();
    std::shuffle(tables, tables + blocks, random);
    const double scattered = time_layer();
    BENCH_CHECK(cudaGraphExecDestroy(graph));
    const double bytes = double(tokens) * row_bytes;
    const auto percent = [&](double us) { return 100.0 * bytes / (us * 1e3) / bench.copy_gbs; };
    // "1024+32768" with one long sequence, "~1024" spread; "64/300": a plan of unequal contexts in 300
    // work items.
    std::string context = std::to_string(d.context);
    if (d.long_context > 0) context.append("+").append(std::to_string(d.long_context));
    if (d.spread) context.insert(context.begin(), '~');
    const std::string cut = d.long_context > 0 || d.spread ? std::to_string(splits) + "/" + std::to_string(items)
                                                           : std::to_string(splits);
    std::printf("%11s %6d %7s %7d %10.1f %11.2f %6.1f%% %11.2f %6.1f%%\n", context.c_str(), batch, cut.c_str(), layers,
                bytes / 1e6, scattered, percent(scattered), in_order, percent(in_order));
  }
}

int Run(double peak_tflops, bool prefill, bool decode) {
  const testing::BenchDevice bench = testing::OpenBenchDevice("attention_bench");
  if (prefill) RunPrefill(bench, peak_tflops);
  if (decode) RunDecode(bench);
  return 0;
}

}  // namespace
}  // namespace cohort

int main(int argc, char** argv) {
  double peak = 989.0;
  bool prefill = true, decode = true;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--peak-tflops") == 0 && i + 1 < argc) {
      peak = std::atof(argv[++i]);
    } else if (std::strcmp(argv[i], "--decode-only") == 0) {
      prefill = false;
    } else if (std::strcmp(argv[i], "--prefill-only") == 0) {
      decode = false;
    } else {
      std::fprintf(stderr, "usage: attention_bench [--peak-tflops N] [--decode-only | --prefill-only]\n");
      return 2;
    }
  }
  if (!prefill && !decode) {
    std::fprintf(stderr, "attention_bench: --decode-only and --prefill-only leave nothing to time\n");
    return 2;
  }
  if (!(peak > 0)) {
    std::fprintf(stderr, "attention_bench: --peak-tflops must be positive\n");
    return 2;
  }
  return cohort::Run(peak, prefill, decode);
}
