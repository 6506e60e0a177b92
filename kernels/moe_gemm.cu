// Grouped expert GEMM and SiLU-and-mul of the MoE path. Contracts in moe.h.
//
// Both GEMM kernels are persistent: gridDim = SMs x resident blocks, block b takes the work item b of
// the (tile, column block) list and then b + gridDim, b + 2 gridDim, ... (decode tiles) or whatever a
// counter hands out (tiles of 64 and 128 rows, below), and each item streams a BN x K weight slice
// and a BM x K activation slice (rows gathered through row_token) through a ring of shared-memory
// stages that runs across item boundaries, so the next item's first loads overlap this item's last
// products and its stores. Stages are XOR-swizzled (16-byte chunk c of row r at chunk c ^ (r % 8)).
// A down product whose routing is complete when it starts (MoeGemmArgs::routing_ready) looks up its
// first tile and requests its first stages' weights before its PDL wait. The grid is capped by a bound
// on the items from the batch shape (TilesBound), so no block is launched that can have no work.
// One token whose k + S experts each got its row (the decode step of one request) has tile t = row t
// alone, so a decode-tile block knows its first tile from its index: it reads that tile's expert beside
// the tile count after its wait (one round of lookups instead of three), and a gate_up block whose
// tile is a shared expert's requests that expert's first weights before its wait (H200, cohort bench
// step: batch 1 2.5% faster).
//
// - Decode tiles (16 rows; few rows an expert, so the weights are the traffic): every thread loads
//   through a cp.async ring and every warp multiplies with mma.sync m16n8k16 from ldmatrix operands.
//   Items are tile fastest, so the M-tiles of one expert run side by side and share its weight
//   columns through L2.
// - Tiles of 64 and 128 rows (wgmma): warp-specialised, a producer warpgroup feeding two tensor-core
//   warpgroups through TMA and mbarriers; see "wgmma tiles" below.
//
// With silu_mul (the gate_up product) an item covers BN / 2 act columns and the epilogue writes
// silu(gate) * up from accumulators that sit in the same thread and register, so no thread exchanges
// anything. In the decode tiles its BN weight rows interleave the gate and up rows in groups of 16:
// tile row r holds the gate (r / 8 % 2 == 0) or up row of act column j0 + 8 (r / 16) + r % 8, so a
// warp's n8 fragments 2f and 2f + 1 are the gate and the up of the same 8 columns.
#include <cuda_bf16.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "kernels/launch_setup.h"
#include "kernels/mma.cuh"
#include "kernels/moe.h"
#include "kernels/pdl.cuh"
#include "kernels/tma.cuh"
#include "kernels/wgmma.cuh"

namespace cohort {
namespace {

using kernels::ClaimRegisters;
using kernels::CpAsync16;
using kernels::CpAsyncArriveNoInc;
using kernels::CpAsyncCommit;
using kernels::CpAsyncWait;
using kernels::EvictFirstPolicy;
using kernels::FenceBarrierInit;
using kernels::FenceProxyAsync;
using kernels::LaunchPdl;
using kernels::LdMatrixX4;
using kernels::MbarrierArrive;
using kernels::MbarrierArriveExpectTx;
using kernels::MbarrierInit;
using kernels::MbarrierWait;
using kernels::MmaBf16;
using kernels::NamedBarrierSync;
using kernels::PdlLaunchDependents;
using kernels::PdlWait;
using kernels::PrefetchTensorMap;
using kernels::ReleaseRegisters;
using kernels::SmemAddress;
using kernels::SwizzledDescriptor;
using kernels::SwizzledOffset;
using kernels::TmaLoad;
using kernels::WgmmaBf16;
using kernels::WgmmaCommit;
using kernels::WgmmaFence;
using kernels::WgmmaWait;

constexpr int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Decode tiles: each warp runs ldmatrix and mma.sync on its own kWarpM x kWarpN part of the tile.
template <int BM, int BN, int BK, int WARPS_M, int WARPS_N, int STAGES, int MIN_BLOCKS>
struct TileConfig {
  static constexpr int kBM = BM;
  static constexpr int kBN = BN;
  static constexpr int kBK = BK;
  static constexpr int kWarpsN = WARPS_N;
  static constexpr int kStages = STAGES;
  static constexpr int kThreads = WARPS_M * WARPS_N * 32;
  static constexpr int kMinBlocks = MIN_BLOCKS;
  static constexpr int kWarpM = BM / WARPS_M;
  static constexpr int kWarpN = BN / WARPS_N;
  static constexpr int kFragsM = kWarpM / 16;
  static constexpr int kFragsN = kWarpN / 8;
  static constexpr int kChunksPerRow = BK / 8;  // 16-byte chunks
  static constexpr int kRowsPerPass = kThreads / kChunksPerRow;
  static constexpr int kAChunks = BM / kRowsPerPass;  // per thread and stage
  static constexpr int kBChunks = BN / kRowsPerPass;
  static constexpr int kStageBytes = (BM + BN) * BK * 2;
  static constexpr int kSmemBytes = STAGES * kStageBytes;
  // silu_mul: the act columns of an item, and where a thread's B chunk i lies relative to its chunk 0
  // (kRowsPerPass tile rows apart): act columns further on, and in the other half (gate <-> up) or not.
  static constexpr int kActCols = BN / 2;
  static constexpr int FusedColumnOffset(int i) {
    return kRowsPerPass % 16 == 0 ? i * kRowsPerPass / 2 : 8 * (i / 2);
  }
  static constexpr bool FusedOtherHalf(int i) { return kRowsPerPass % 16 != 0 && i % 2 == 1; }
  static_assert(kWarpM % 16 == 0 && kWarpN % 16 == 0, "warp tiles are whole m16 x (2 x n8) fragments");
  static_assert(BK % 64 == 0, "the swizzle needs at least 8 chunks per row");
  static_assert(kThreads % kChunksPerRow == 0 && kRowsPerPass % 8 == 0, "a thread keeps one swizzle phase");
  static_assert(BM % kRowsPerPass == 0 && BN % kRowsPerPass == 0, "loads divide evenly over threads");
  static_assert(kRowsPerPass % 16 == 0 || kRowsPerPass == 8, "a thread's B rows keep one gate/up pattern");
};

// Decode: few rows per expert, so the weights are the traffic. 64 columns per item gives enough items
// to fill 132 SMs from 6 experts; 3 stages x 20 KB, three blocks per SM.
using DecodeTiles = TileConfig<16, 64, 128, 1, 4, 3, 3>;
// A down product with its routing ready (weights requested before the wait) and at most two items per
// SM (one V2-Lite token: 6 experts x 32 items on 132 SMs): 4 stages, two blocks per SM, so three
// stages of weights are in flight before the gate_up product ends.
using DecodePairTiles = TileConfig<16, 64, 128, 1, 4, 4, 2>;

struct GemmParams {
  const __nv_bfloat16* a;
  const __nv_bfloat16* w;
  __nv_bfloat16* y;
  const int32_t* expert_offsets;
  const int32_t* row_token;
  const int32_t* tile_expert;
  const int32_t* tile_row;
  const int32_t* num_tiles;
  int32_t* item_counters;  // the warp-specialised kernel's work queue
  int32_t n;  // output columns: I with silu_mul (the weights then have 2n rows per expert)
  int32_t k;
  int32_t n_blocks;
  int32_t k_steps;
  // One token: k + S (its tile count when every routed id has a row), else 0. top_k and num_routed
  // (E) then name the shared experts' tiles: tile k + s is expert E + s.
  int32_t one_token_tiles;
  int32_t top_k;
  int32_t num_routed;
};

// The SiLU-and-mul of MoeSiluMulKernel and the fused epilogues: one formula for all. The fast exp and
// division (two MUFU instructions; relative errors under 1e-5, far below the bf16 rounding of the
// result) took about 8% of the cycles off the 128 x 256 gate_up product at 4096 tokens (Nsight
// Compute, locked clocks): the IEEE forms ran in every item's epilogue, where the tensor cores wait.
// Gates below about -87 make a denominator of 2^126 or more, for which __fdividef gives zero, the
// limit.
__device__ __forceinline__ float SiluMul(float gate, float up) { return __fdividef(gate, 1.0f + __expf(-gate)) * up; }

// kEarly (the routing complete when the kernel starts; no gather, no silu_mul): the first tile's
// lookups and its first stages' weights come before the wait, only the activations after it.
template <class C, bool kGather, bool kSiluMul, bool kEarly>
__global__ void __launch_bounds__(C::kThreads, C::kMinBlocks) MoeGroupedGemmKernel(const GemmParams p) {
  extern __shared__ __align__(1024) unsigned char smem[];
  const uint32_t smem_base = SmemAddress(smem);
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int warp_row = (warp / C::kWarpsN) * C::kWarpM;
  const int warp_col = (warp % C::kWarpsN) * C::kWarpN;
  // The weights stream through L2 as evict-first lines. At decode sizes each expert's weights are read
  // once a step (a second row tile of an expert reads them at the same time), and letting them push
  // out nothing else (activations, routing tables, the KV cache) measured 1-3% faster decode steps
  // (batch 1-128, cohort bench step).
  const uint64_t weight_policy = EvictFirstPolicy();

  // This thread's share of each stage: chunk column ld_chunk of rows ld_row + i * kRowsPerPass.
  const int ld_chunk = tid % C::kChunksPerRow;
  const int ld_row = tid / C::kChunksPerRow;
  const uint32_t ld_smem_a = SwizzledOffset<C::kBK>(ld_row, ld_chunk);
  const uint32_t ld_smem_b = C::kBM * C::kBK * 2 + ld_smem_a;
  constexpr uint32_t kPassBytes = C::kRowsPerPass * C::kBK * 2;

  int num_tiles = 0;
  int total_steps = 0;
  // One token with a tile for each of its k + S experts: tile t holds row t alone, from token 0.
  bool single = false;

  // Producer state: the item being loaded and its per-thread source pointers.
  int load_item = 0;
  int load_kstep = 0;
  int load_stage = 0;
  const __nv_bfloat16* a_src[C::kAChunks];
  const __nv_bfloat16* b_src = p.w;
  uint32_t a_ok = 0;
  uint32_t b_ok = 0;

  auto set_item = [&](int n_block, int expert, int first, int rows) {
    a_ok = 0;
#pragma unroll
    for (int i = 0; i < C::kAChunks; ++i) {
      const int r = ld_row + i * C::kRowsPerPass;
      int source = 0;
      if (r < rows) {
        source = kGather ? (single ? 0 : p.row_token[first + r]) : first + r;
        a_ok |= 1u << i;
      }
      a_src[i] = p.a + static_cast<int64_t>(source) * p.k + ld_chunk * 8;
    }
    b_ok = 0;
    if constexpr (kSiluMul) {
      // Tile row ld_row: the gate (half 0) or up (half 1) row of act column c0.
      const int c0 = n_block * C::kActCols + 8 * (ld_row >> 4) + (ld_row & 7);
      const int half = (ld_row >> 3) & 1;
#pragma unroll
      for (int i = 0; i < C::kBChunks; ++i) {
        if (c0 + C::FusedColumnOffset(i) < p.n) b_ok |= 1u << i;
      }
      b_src = p.w + (static_cast<int64_t>(expert) * 2 * p.n + c0 + half * p.n) * p.k + ld_chunk * 8;
    } else {
      const int n0 = n_block * C::kBN + ld_row;
#pragma unroll
      for (int i = 0; i < C::kBChunks; ++i) {
        if (n0 + i * C::kRowsPerPass < p.n) b_ok |= 1u << i;
      }
      b_src = p.w + (static_cast<int64_t>(expert) * p.n + n0) * p.k + ld_chunk * 8;
    }
  };
  auto begin_item = [&](int local_item) {
    const int item = static_cast<int>(blockIdx.x) + local_item * static_cast<int>(gridDim.x);
    const int tile = item % num_tiles;
    const int expert = p.tile_expert[tile];
    if (single) {
      set_item(item / num_tiles, expert, tile, 1);
    } else {
      const int first = p.tile_row[tile];
      set_item(item / num_tiles, expert, first, min(C::kBM, p.expert_offsets[expert + 1] - first));
    }
  };

  // Elements from a thread's B chunk 0 to its chunk i.
  auto b_chunk_offset = [&](int i) -> int64_t {
    if constexpr (kSiluMul) {
      return static_cast<int64_t>(C::FusedColumnOffset(i)) * p.k +
             (C::FusedOtherHalf(i) ? static_cast<int64_t>(p.n) * p.k : 0);
    } else {
      return static_cast<int64_t>(i) * C::kRowsPerPass * p.k;
    }
  };

  // One stage's activation (A) and weight (B) loads: k-step kstep into ring slot `slot`.
  auto issue_a = [&](int kstep, int slot) {
    const int k0 = kstep * C::kBK;
    const bool k_ok = k0 + ld_chunk * 8 < p.k;
    const uint32_t stage = smem_base + slot * C::kStageBytes;
#pragma unroll
    for (int i = 0; i < C::kAChunks; ++i) {
      const bool ok = k_ok && ((a_ok >> i) & 1u);
      CpAsync16(stage + ld_smem_a + i * kPassBytes, ok ? a_src[i] + k0 : p.a, ok ? 16u : 0u);
    }
  };
  auto issue_b = [&](int kstep, int slot) {
    const int k0 = kstep * C::kBK;
    const bool k_ok = k0 + ld_chunk * 8 < p.k;
    const uint32_t stage = smem_base + slot * C::kStageBytes;
#pragma unroll
    for (int i = 0; i < C::kBChunks; ++i) {
      const bool ok = k_ok && ((b_ok >> i) & 1u);
      const void* src = ok ? b_src + b_chunk_offset(i) + k0 : p.w;
      CpAsync16(stage + ld_smem_b + i * kPassBytes, src, ok ? 16u : 0u, weight_policy);
    }
  };

  int loaded_steps = 0;
  auto load_next = [&]() {
    if (loaded_steps < total_steps) {
      if (load_kstep == 0) begin_item(load_item);
      issue_a(load_kstep, load_stage);
      issue_b(load_kstep, load_stage);
      ++loaded_steps;
      load_stage = load_stage + 1 == C::kStages ? 0 : load_stage + 1;
      if (++load_kstep == p.k_steps) {
        load_kstep = 0;
        ++load_item;
      }
    }
    CpAsyncCommit();  // possibly empty: keeps one group per step
  };

  // The block's items, once the tile count is known; false for a block with none (it exits).
  auto count_items = [&]() {
    single = p.one_token_tiles > 0 && num_tiles == p.one_token_tiles;
    const int num_items = num_tiles * p.n_blocks;
    if (static_cast<int>(blockIdx.x) >= num_items) return false;
    const int my_items = (num_items - 1 - static_cast<int>(blockIdx.x)) / static_cast<int>(gridDim.x) + 1;
    total_steps = my_items * p.k_steps;
    return true;
  };
  // Groups B_0 .. B_{S-2} (weights) before the wait, A_0 .. A_{S-2} (activations) after it. These
  // S - 1 steps lie in the block's first item: it has one, and an item has at least S - 1 k-steps.
  // At loop step s the groups committed after A_s number S - 2, as in the plain ring, so the loop's
  // wait holds unchanged.
  constexpr int kEarlySteps = C::kStages - 1;
  auto issue_early_weights = [&]() {
#pragma unroll
    for (int s = 0; s < kEarlySteps; ++s) {
      issue_b(s, s);
      CpAsyncCommit();
    }
  };
  // Groups 0 .. S-2 of the ring: A_s, and B_s unless the weights went first (issue_early_weights).
  auto issue_first_steps = [&](bool weights_issued) {
#pragma unroll
    for (int s = 0; s < kEarlySteps; ++s) {
      issue_a(s, s);
      if (!weights_issued) issue_b(s, s);
      CpAsyncCommit();
    }
    loaded_steps = kEarlySteps;
    load_stage = kEarlySteps;
    load_kstep = kEarlySteps;
    if (load_kstep == p.k_steps) {
      load_kstep = 0;
      ++load_item;
    }
  };

  if constexpr (kEarly) {
    // The routing is complete before the wait (the launcher makes sure, CanStartEarly).
    num_tiles = *p.num_tiles;
    if (!count_items()) {
      PdlWait();  // exits only after the kernel before it: PDL's ordering holds
      return;
    }
    begin_item(0);
    issue_early_weights();
    PdlWait();  // the activations come from the previous kernel
    PdlLaunchDependents();
    issue_first_steps(/*weights_issued=*/true);
  } else {
    // One token: the block's first tile is blockIdx.x % (k + S) if every routed id got a row (the
    // tile count read after the wait tells), and that tile's expert is read beside the count. A gate_up
    // block whose first tile would then be a shared expert's (the last S, experts E..E+S-1 in order)
    // requests its first weights before the wait, and drains them when the count says otherwise (an
    // id without a row).
    const bool one_token = p.one_token_tiles > 0 && p.k_steps >= kEarlySteps &&
                           static_cast<int>(blockIdx.x) < p.one_token_tiles * p.n_blocks;
    const int first_tile = one_token ? static_cast<int>(blockIdx.x) % p.one_token_tiles : 0;
    const int n_block = one_token ? static_cast<int>(blockIdx.x) / p.one_token_tiles : 0;
    int guess = -1;
    if (kGather && kSiluMul && one_token && first_tile >= p.top_k) {
      guess = p.num_routed + first_tile - p.top_k;
      single = true;
      set_item(n_block, guess, first_tile, 1);
      issue_early_weights();
    }
    PdlWait();  // the routing buffers and the activations come from earlier kernels
    PdlLaunchDependents();
    num_tiles = *p.num_tiles;
    const int first_expert = one_token && guess < 0 ? p.tile_expert[first_tile] : -1;
    if (!count_items()) {
      CpAsyncWait<0>();
      return;
    }
    if (guess >= 0 && single) {
      issue_first_steps(/*weights_issued=*/true);
    } else if (one_token && single) {
      set_item(n_block, first_expert, first_tile, 1);
      issue_first_steps(/*weights_issued=*/false);
    } else {
      if (guess >= 0) CpAsyncWait<0>();  // the guess's copies land before the ring starts over
#pragma unroll
      for (int s = 0; s < kEarlySteps; ++s) load_next();
    }
  }

  float acc[C::kFragsM][C::kFragsN][4];
#pragma unroll
  for (int m = 0; m < C::kFragsM; ++m)
#pragma unroll
    for (int n = 0; n < C::kFragsN; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[m][n][e] = 0.0f;

  int read_stage = 0;

  // The outputs of local item `local_item` from the accumulators.
  auto store_item = [&](int local_item) {
    const int item = static_cast<int>(blockIdx.x) + local_item * static_cast<int>(gridDim.x);
    const int tile = item % num_tiles;
    const int first = single ? tile : p.tile_row[tile];
    const int rows = single ? 1 : min(C::kBM, p.expert_offsets[p.tile_expert[tile] + 1] - first);
    // This thread's first output column; with silu_mul fragment pair f covers the 8 act columns
    // from warp_col / 2 + 8 f of the item's.
    const int col0 = kSiluMul ? (item / num_tiles) * C::kActCols + warp_col / 2 + (lane & 3) * 2
                              : (item / num_tiles) * C::kBN + warp_col + (lane & 3) * 2;
#pragma unroll
    for (int m = 0; m < C::kFragsM; ++m) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = warp_row + m * 16 + (lane >> 2) + half * 8;
        if (r >= rows) continue;
        __nv_bfloat16* out = p.y + static_cast<int64_t>(first + r) * p.n;
        if constexpr (kSiluMul) {
#pragma unroll
          for (int f = 0; f < C::kFragsN / 2; ++f) {
            const int col = col0 + f * 8;
            if (col < p.n) {
              const float(&gate)[4] = acc[m][2 * f];
              const float(&up)[4] = acc[m][2 * f + 1];
              *reinterpret_cast<__nv_bfloat162*>(out + col) = __floats2bfloat162_rn(
                  SiluMul(gate[half * 2], up[half * 2]), SiluMul(gate[half * 2 + 1], up[half * 2 + 1]));
            }
          }
        } else {
#pragma unroll
          for (int n = 0; n < C::kFragsN; ++n) {
            const int col = col0 + n * 8;
            if (col < p.n) {
              *reinterpret_cast<__nv_bfloat162*>(out + col) =
                  __floats2bfloat162_rn(acc[m][n][half * 2], acc[m][n][half * 2 + 1]);
            }
          }
        }
      }
    }
  };

  int read_kstep = 0;
  int read_item = 0;
  for (int step = 0; step < total_steps; ++step) {
    CpAsyncWait<C::kStages - 2>();
    __syncthreads();  // stage `step` landed for all threads; stage `step - 1` is free
    load_next();

    const uint32_t stage_a = smem_base + read_stage * C::kStageBytes;
    const uint32_t stage_b = stage_a + C::kBM * C::kBK * 2;
#pragma unroll
    for (int kk = 0; kk < C::kBK / 16; ++kk) {
      uint32_t a_frag[C::kFragsM][4];
      uint32_t b_frag[C::kFragsN / 2][4];
#pragma unroll
      for (int m = 0; m < C::kFragsM; ++m) {
        const int row = warp_row + m * 16 + (lane & 15);
        LdMatrixX4(a_frag[m], stage_a + SwizzledOffset<C::kBK>(row, kk * 2 + (lane >> 4)));
      }
#pragma unroll
      for (int n = 0; n < C::kFragsN / 2; ++n) {
        const int row = warp_col + n * 16 + (lane & 7) + ((lane >> 4) << 3);
        LdMatrixX4(b_frag[n], stage_b + SwizzledOffset<C::kBK>(row, kk * 2 + ((lane >> 3) & 1)));
      }
#pragma unroll
      for (int m = 0; m < C::kFragsM; ++m)
#pragma unroll
        for (int n = 0; n < C::kFragsN; ++n)
          MmaBf16(acc[m][n], a_frag[m], {b_frag[n / 2][(n & 1) * 2], b_frag[n / 2][(n & 1) * 2 + 1]});
    }
    read_stage = read_stage + 1 == C::kStages ? 0 : read_stage + 1;

    if (++read_kstep == p.k_steps) {
      read_kstep = 0;
      store_item(read_item++);
#pragma unroll
      for (int m = 0; m < C::kFragsM; ++m)
#pragma unroll
        for (int n = 0; n < C::kFragsN; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[m][n][e] = 0.0f;
    }
  }
  CpAsyncWait<0>();
}

template <class C, bool kGather, bool kSiluMul, bool kEarly = false>
cudaError_t LaunchTiles(const GemmParams& p, int64_t max_tiles, cudaStream_t stream) {
  auto kernel = MoeGroupedGemmKernel<C, kGather, kSiluMul, kEarly>;
  static kernels::LaunchSetUp setup;
  kernels::LaunchInfo info;
  if (const cudaError_t error = setup.Get(kernel, C::kThreads, C::kSmemBytes, &info); error != cudaSuccess) {
    return error;
  }
  const int64_t max_items = max_tiles * p.n_blocks;
  int64_t grid = static_cast<int64_t>(info.sms) * (info.blocks_per_sm > 0 ? info.blocks_per_sm : 1);
  if (grid > max_items) grid = max_items;
  return LaunchPdl(kernel, dim3(static_cast<unsigned>(grid)), dim3(C::kThreads), C::kSmemBytes, stream, p);
}

// p with the column blocks and k-steps of tiles C (TileConfig or WsTiles).
template <class C>
GemmParams Shaped(const GemmParams& p, bool silu_mul) {
  GemmParams q = p;
  q.n_blocks = static_cast<int32_t>(CeilDiv(p.n, silu_mul ? C::kActCols : C::kBN));
  q.k_steps = static_cast<int32_t>(CeilDiv(p.k, C::kBK));
  return q;
}

// The early form needs its first S - 1 k-steps in the first item.
template <class C>
bool CanStartEarly(const MoeGemmArgs& args, const GemmParams& q) {
  return args.routing_ready && !args.gather_a && !args.silu_mul && q.k_steps >= C::kStages - 1;
}

template <class C>
cudaError_t LaunchGemm(const GemmParams& p, const MoeGemmArgs& args, int64_t max_tiles, cudaStream_t stream) {
  const bool gather = args.gather_a, silu_mul = args.silu_mul;
  const GemmParams q = Shaped<C>(p, silu_mul);
  if (max_tiles * q.n_blocks > INT32_MAX) return cudaErrorInvalidValue;
  if (CanStartEarly<C>(args, q)) return LaunchTiles<C, false, false, true>(q, max_tiles, stream);
  if (silu_mul) {
    return gather ? LaunchTiles<C, true, true>(q, max_tiles, stream)
                  : LaunchTiles<C, false, true>(q, max_tiles, stream);
  }
  return gather ? LaunchTiles<C, true, false>(q, max_tiles, stream)
                : LaunchTiles<C, false, false>(q, max_tiles, stream);
}

// ------------------------------------------------------------------ wgmma tiles, warp-specialised

// Tiles of 64 and 128 rows run as one producer warpgroup and two tensor-core (consumer) warpgroups
// that share nothing but a ring of shared-memory stages and its barriers: no block-wide barrier in
// the main loop, and the next item's stages load while the consumers store this one's. The
// producer's thread 0 copies each stage's weights with TMA (and the activations, when they are rows
// in order); gathered activation rows (gather_a) are copied by the producer's 128 threads with
// cp.async, eight threads a row so that each copy instruction of a warp moves four whole 128-byte
// lines. A stage is `full` when its bytes have landed (and, gathering, every producer thread's copies
// have); `empty` when the 8 consumer warps have finished the products that read it. Consumer
// warpgroup g multiplies 64 rows by kWgN columns: with 128-row tiles rows 64 g and all BN columns
// (m64n256k16, 128 fp32 accumulators a thread), with 64-row tiles all rows and columns kWgN g
// (m64n128k16 for 64 x 256 tiles); one k-step's products stay in flight.
//
// Items are (tile, column block) pairs, column block fastest: the blocks running at once cover a few
// tiles and all their columns, so each activation tile is read from HBM about once and its weights
// by the expert's tiles together. (Tile fastest, as the cp.async kernel walks them, measured
// 1216 -> 1315 us a layer at 4096 tokens in moe_bench: the down product's activations, 92 MB, were
// read again for each of the eight column blocks.) Block b takes item b first and each further one
// from a counter in the routing (MoeRouting::item_counters), so blocks that run slower take fewer
// items; the producer announces each item's number to the consumers in the stage of its first
// k-step, and -1 in the stage after its last item.
//
// With silu_mul a consumer warpgroup's kWgN weight rows are kWgN / 2 gate rows then the up rows of
// the same act columns (two TMA boxes), so the gate and the up of an act column are accumulator
// columns c and c + kWgN / 2: the same thread and register, fragments f and f + kWgN / 16.
template <int BM, int BN, int STAGES, int BLOCKS_PER_SM>
struct WsTiles {
  static constexpr int kBM = BM;
  static constexpr int kBN = BN;
  static constexpr int kBK = 64;  // one 128-byte swizzled row
  static constexpr int kStages = STAGES;
  static constexpr int kBlocksPerSm = BLOCKS_PER_SM;
  static constexpr int kThreads = 384;
  static constexpr int kConsumerWarps = 8;
  static constexpr int kRowGroups = BM / 64;        // consumer warpgroups along M: 2 or 1
  static constexpr int kWgN = BN * kRowGroups / 2;  // columns of a consumer warpgroup
  static constexpr int kActCols = BN / 2;           // act columns of an item with silu_mul
  static constexpr int kSiluBox = kWgN / 2;         // gate (or up) rows of a consumer warpgroup
  static constexpr int kABytes = BM * kBK * 2;
  static constexpr int kBBytes = BN * kBK * 2;
  static constexpr int kStageBytes = kABytes + kBBytes;
  static constexpr int kBarrierOffset = kStages * kStageBytes;
  static constexpr int kItemOffset = kBarrierOffset + 2 * kStages * 8;  // the item each stage starts, ints
  static constexpr int kNextOffset = kItemOffset + 4 * kStages;         // gathering: the next item, 2 ints
  static constexpr int kSmemBytes = kNextOffset + 2 * 4;
  static constexpr int kGatherRowStride = 128 / (kBK / 8);  // rows a pass of the producer, eight threads a row
  static constexpr int kGatherRowsPerThread = BM / kGatherRowStride;
  // One block of 384 threads an SM gets 168 registers a thread (65536 / 384, in steps of 8), too few
  // for 128 accumulators; the producer gives back what the consumers claim.
  static constexpr bool kReallocate = kWgN == 256;
  static constexpr int kProducerRegisters = 64;
  static constexpr int kConsumerRegisters = 216;
  static_assert(BM == 64 || BM == 128, "one or two consumer warpgroups along M");
  static_assert(kWgN == 64 || kWgN == 128 || kWgN == 256, "an m64nNk16 wgmma");
  static_assert(kSiluBox <= 256 && BN <= 256, "a TMA box has at most 256 rows");
  static_assert(!kReallocate || (BLOCKS_PER_SM == 1 &&
                                 kProducerRegisters * 128 + kConsumerRegisters * 256 <= 168 * kThreads),
                "the consumers claim only registers the producer gave back");
  static_assert(BLOCKS_PER_SM * (kSmemBytes + 1024) <= 228 * 1024, "shared memory of one SM");
};

// Tens of rows per expert (V2-Lite: decode or prefill of 170-520 tokens): 64 x 256 tiles, 5
// stages of 40 KB, one block per SM. moe_bench (H200, one call): 335 us a layer at 512 tokens, 299 at
// 192, against 348-351 and 306-307 for 64 x 128 tiles on the cp.async kernel (two blocks per SM), and
// 347-349 / 302-306 for 64 x 128 tiles here (4 stages, two blocks per SM) or 357 / 302 (8 stages, one).
using MidTiles = WsTiles<64, 256, 5, 1>;
// Hundreds of rows per expert (prefill): 128 x 256 tiles, 4 stages of 48 KB, one block per SM.
// moe_bench (H200, one call): 1216-1221 us a layer at 4096 tokens, 701-705 at 2048, 405-407 at 1024,
// against 1438-1441, 854-861 and 431-437 for the same tiles on the cp.async kernel (which had beaten
// 128 x 128 tiles there: 1428 against 1786 us).
using PrefillTiles = WsTiles<128, 256, 4, 1>;

template <class C, bool kGather, bool kSiluMul, bool kEarly>
__global__ void __launch_bounds__(C::kThreads, C::kBlocksPerSm)
    MoeGroupedGemmWsKernel(const GemmParams p, const __grid_constant__ CUtensorMap a_map,
                           const __grid_constant__ CUtensorMap b_map) {
  extern __shared__ __align__(1024) unsigned char smem[];
  const uint32_t smem_base = SmemAddress(smem);
  const uint32_t full = smem_base + C::kBarrierOffset;  // kStages barriers, then kStages `empty` ones
  const uint32_t empty = full + 8 * C::kStages;
  volatile int* stage_item = reinterpret_cast<volatile int*>(smem + C::kItemOffset);
  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  // A `full` barrier's arrivals: thread 0's (which also announces the weight bytes, and releases
  // stage_item), and gathering, one a producer thread once its row copies have landed.
  constexpr uint32_t kFullArrivals = kGather ? 129 : 1;
  if (tid == 0) {
    for (int s = 0; s < C::kStages; ++s) {
      MbarrierInit(full + 8 * s, kFullArrivals);
      MbarrierInit(empty + 8 * s, C::kConsumerWarps);
    }
    FenceBarrierInit();
    PrefetchTensorMap(&b_map);
    if constexpr (!kGather) PrefetchTensorMap(&a_map);
  }
  __syncthreads();
  if constexpr (!kEarly) {
    PdlWait();  // the routing and the activations come from earlier kernels
    PdlLaunchDependents();
  }
  const int num_tiles = *p.num_tiles;
  const int num_items = num_tiles * p.n_blocks;
  const int block = static_cast<int>(blockIdx.x);
  const int grid = static_cast<int>(gridDim.x);

  if (warp < 4) {
    // Producer.
    if constexpr (C::kReallocate) ReleaseRegisters<C::kProducerRegisters>();
    if (!kGather && tid != 0) {
      if constexpr (kEarly) PdlWait();  // exits only after the kernel before it: PDL's ordering holds
      return;                           // thread 0 issues every copy
    }
    // One stage's weights: BN rows of the column block, or with silu_mul each consumer warpgroup's
    // gate rows and then its up rows.
    auto load_weights = [&](uint32_t stage_b, uint32_t bar, int k0, int n_block, int expert) {
      if constexpr (kSiluMul) {
#pragma unroll
        for (int g = 0; g < 2 / C::kRowGroups; ++g) {
          const int column = n_block * C::kActCols + g * C::kSiluBox;
          const uint32_t rows = stage_b + g * C::kWgN * C::kBK * 2;
          TmaLoad(rows, &b_map, bar, k0, column, 2 * expert);
          TmaLoad(rows + C::kSiluBox * C::kBK * 2, &b_map, bar, k0, column, 2 * expert + 1);
        }
      } else {
        TmaLoad(stage_b, &b_map, bar, k0, n_block * C::kBN, expert);
      }
    };
    // kEarly: the routing was complete when the kernel started, so the first item's first stages of
    // weights are requested before the wait (with the stage's whole byte count), its activations
    // after it.
    int early_steps = 0;
    if constexpr (kEarly) {
      if (block < num_items) {
        const int tile = block / p.n_blocks;
        early_steps = min(C::kStages, p.k_steps);
        for (int s = 0; s < early_steps; ++s) {
          MbarrierArriveExpectTx(full + 8 * s, C::kABytes + C::kBBytes);
          load_weights(smem_base + s * C::kStageBytes + C::kABytes, full + 8 * s, s * C::kBK, block % p.n_blocks,
                       p.tile_expert[tile]);
        }
      }
      PdlWait();
      PdlLaunchDependents();
    }
    int* next_item = reinterpret_cast<int*>(smem + C::kNextOffset);
    int stage = 0;
    uint32_t phase = 0;
    int item = block < num_items ? block : -1;
    for (int n = 0; item >= 0; ++n) {
      // The item after this one, asked for now so that the answer arrives while this one loads.
      int fetched = 0;
      if (tid == 0) fetched = atomicAdd(p.item_counters, 1);
      const int tile = item / p.n_blocks;
      const int n_block = item % p.n_blocks;
      const int expert = p.tile_expert[tile];
      const int first = p.tile_row[tile];
      // Gathering, thread t copies chunk t % 8 of rows t / 8 + kGatherRowStride i.
      int source_row[kGather ? C::kGatherRowsPerThread : 1];
      if constexpr (kGather) {
        const int rows = p.expert_offsets[expert + 1] - first;
#pragma unroll
        for (int i = 0; i < C::kGatherRowsPerThread; ++i) {
          const int r = tid / 8 + C::kGatherRowStride * i;
          source_row[i] = r < rows ? p.row_token[first + r] : -1;
        }
      }
      for (int kstep = 0; kstep < p.k_steps; ++kstep) {
        MbarrierWait(empty + 8 * stage, phase ^ 1);  // a fresh barrier passes parity 1 at once
        const uint32_t bar = full + 8 * stage;
        const uint32_t stage_a = smem_base + stage * C::kStageBytes;
        const uint32_t stage_b = stage_a + C::kABytes;
        const int k0 = kstep * C::kBK;
        if (tid == 0) {
          const bool weights_requested = n == 0 && kstep < early_steps;  // before the wait
          if (kstep == 0 && n > 0) stage_item[stage] = item;  // the consumers know their first
          if constexpr (kGather) {
            MbarrierArriveExpectTx(bar, C::kBBytes);
          } else {
            if (!weights_requested) MbarrierArriveExpectTx(bar, C::kABytes + C::kBBytes);
            TmaLoad(stage_a, &a_map, bar, k0, first);
          }
          if (!weights_requested) load_weights(stage_b, bar, k0, n_block, expert);
        }
        if constexpr (kGather) {
          const int k = k0 + 8 * (tid % 8);
#pragma unroll
          for (int i = 0; i < C::kGatherRowsPerThread; ++i) {
            const bool ok = source_row[i] >= 0 && k < p.k;
            CpAsync16(stage_a + SwizzledOffset<C::kBK>(tid / 8 + C::kGatherRowStride * i, tid % 8),
                      ok ? p.a + static_cast<int64_t>(source_row[i]) * p.k + k : p.a, ok ? 16u : 0u);
          }
          CpAsyncArriveNoInc(bar);  // arrives once this thread's copies have landed
        }
        if (++stage == C::kStages) {
          stage = 0;
          phase ^= 1;
        }
      }
      if constexpr (kGather) {  // every producer thread needs the next item's rows
        if (tid == 0) next_item[n & 1] = fetched;
        NamedBarrierSync(1, 128);
        fetched = next_item[n & 1];  // two slots: thread 0 writes this one again only after the next meeting
      }
      item = grid + fetched < num_items ? grid + fetched : -1;
    }
    if (tid == 0) {
      // The stage after the last item tells the consumers to stop.
      MbarrierWait(empty + 8 * stage, phase ^ 1);
      stage_item[stage] = -1;
      MbarrierArrive(full + 8 * stage, kFullArrivals);
      // The last block to finish asking leaves the counters zero for the next launch.
      __threadfence();
      if (atomicAdd(p.item_counters + 1, 1) == grid - 1) {
        atomicExch(p.item_counters, 0);
        atomicExch(p.item_counters + 1, 0);
      }
    }
    if constexpr (kGather) CpAsyncWait<0>();
    return;
  }

  // Consumers.
  if constexpr (C::kReallocate) ClaimRegisters<C::kConsumerRegisters>();
  if constexpr (kEarly) {
    PdlWait();  // what they store must follow the kernel before
    PdlLaunchDependents();
  }
  const int group = (warp - 4) / 4;
  const int row_group = group % C::kRowGroups;
  const int column_group = group / C::kRowGroups;
  const int warp_row = row_group * 64 + (warp % 4) * 16;
  const uint32_t a_rows = row_group * 64 * C::kBK * 2;
  const uint32_t b_rows = column_group * C::kWgN * C::kBK * 2;
  int stage = 0;
  uint32_t phase = 0;
  float acc[C::kWgN / 8][4] = {};
  int item = block < num_items ? block : -1;
  while (item >= 0) {
    int previous = 0;
    for (int kstep = 0; kstep < p.k_steps; ++kstep) {
      MbarrierWait(full + 8 * stage, phase);
      // Rows copied with cp.async were written through the generic proxy; wgmma reads through the
      // async one.
      if constexpr (kGather) FenceProxyAsync();
      const uint32_t stage_a = smem_base + stage * C::kStageBytes;
      const uint32_t stage_b = stage_a + C::kABytes;
      WgmmaFence();
#pragma unroll
      for (int kk = 0; kk < C::kBK / 16; ++kk) {
        WgmmaBf16<C::kWgN>(acc, SwizzledDescriptor(stage_a + a_rows + 32 * kk),
                           SwizzledDescriptor(stage_b + b_rows + 32 * kk), kstep > 0 || kk > 0);
      }
      WgmmaCommit();
      WgmmaWait<1>();  // the previous k-step's products are done: its stage may be refilled
      if (kstep > 0 && lane == 0) MbarrierArrive(empty + 8 * previous);
      previous = stage;
      if (++stage == C::kStages) {
        stage = 0;
        phase ^= 1;
      }
    }
    WgmmaWait<0>();
    if (lane == 0) MbarrierArrive(empty + 8 * previous);

    const int tile = item / p.n_blocks;
    const int n_block = item % p.n_blocks;
    const int first = p.tile_row[tile];
    const int rows = min(C::kBM, p.expert_offsets[p.tile_expert[tile] + 1] - first);
    const int col0 = kSiluMul ? n_block * C::kActCols + column_group * C::kSiluBox + (lane & 3) * 2
                              : n_block * C::kBN + column_group * C::kWgN + (lane & 3) * 2;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = warp_row + (lane >> 2) + half * 8;
      if (r >= rows) continue;
      __nv_bfloat16* out = p.y + static_cast<int64_t>(first + r) * p.n;
      if constexpr (kSiluMul) {
#pragma unroll
        for (int f = 0; f < C::kWgN / 16; ++f) {
          const int col = col0 + f * 8;
          if (col < p.n) {
            const float(&gate)[4] = acc[f];
            const float(&up)[4] = acc[f + C::kWgN / 16];
            *reinterpret_cast<__nv_bfloat162*>(out + col) = __floats2bfloat162_rn(
                SiluMul(gate[half * 2], up[half * 2]), SiluMul(gate[half * 2 + 1], up[half * 2 + 1]));
          }
        }
      } else {
#pragma unroll
        for (int f = 0; f < C::kWgN / 8; ++f) {
          const int col = col0 + f * 8;
          if (col < p.n) {
            *reinterpret_cast<__nv_bfloat162*>(out + col) =
                __floats2bfloat162_rn(acc[f][half * 2], acc[f][half * 2 + 1]);
          }
        }
      }
    }
    MbarrierWait(full + 8 * stage, phase);  // the next item's first k-step, or the end
    item = stage_item[stage];
  }
}

// The tensor maps of a warp-specialised launch: the weights [E + S, n (x 2 with silu_mul), k] as
// boxes of BN rows (with silu_mul, boxes of kSiluBox gate or up rows), the activations in row order
// [rows, k] as boxes of BM rows (with gather_a the rows are copied without one).
template <class C, bool kGather, bool kSiluMul, bool kEarly>
cudaError_t LaunchWs(const GemmParams& p, int64_t experts, int64_t rows, int64_t max_tiles, cudaStream_t stream) {
  CUtensorMap a_map{};
  CUtensorMap b_map{};
  const uint64_t k = static_cast<uint64_t>(p.k), n = static_cast<uint64_t>(p.n);
  {
    // Dim 2 counts gate and up halves with silu_mul ([expert][half][n][k]), whole experts without.
    const uint64_t dims[3] = {k, n, static_cast<uint64_t>(experts) * (kSiluMul ? 2 : 1)};
    const uint64_t strides[2] = {k * 2, n * k * 2};
    const uint32_t box[3] = {C::kBK, static_cast<uint32_t>(kSiluMul ? C::kSiluBox : C::kBN), 1};
    if (const cudaError_t e = kernels::EncodeBf16TensorMap(&b_map, p.w, 3, dims, strides, box); e != cudaSuccess) {
      return e;
    }
  }
  if constexpr (!kGather) {
    const uint64_t dims[2] = {k, static_cast<uint64_t>(rows)};
    const uint64_t strides[1] = {k * 2};
    const uint32_t box[2] = {C::kBK, C::kBM};
    if (const cudaError_t e = kernels::EncodeBf16TensorMap(&a_map, p.a, 2, dims, strides, box); e != cudaSuccess) {
      return e;
    }
  }
  auto kernel = MoeGroupedGemmWsKernel<C, kGather, kSiluMul, kEarly>;
  static kernels::LaunchSetUp setup;
  kernels::LaunchInfo info;
  if (const cudaError_t e = setup.Get(kernel, C::kThreads, C::kSmemBytes, &info); e != cudaSuccess) return e;
  const int64_t grid =
      std::min<int64_t>(int64_t{info.sms} * (info.blocks_per_sm > 0 ? info.blocks_per_sm : 1), max_tiles * p.n_blocks);
  return LaunchPdl(kernel, dim3(static_cast<unsigned>(grid)), dim3(C::kThreads), C::kSmemBytes, stream, p, a_map,
                   b_map);
}

template <class C>
cudaError_t LaunchWsGemm(const GemmParams& p, const MoeGemmArgs& args, const MoeRouting& r, int64_t max_tiles,
                         cudaStream_t stream) {
  const GemmParams q = Shaped<C>(p, args.silu_mul);
  if (max_tiles * q.n_blocks > INT32_MAX) return cudaErrorInvalidValue;
  const int64_t experts = int64_t{r.num_experts} + r.num_shared;
  const int64_t rows = r.num_rows();
  if (args.silu_mul) {
    return args.gather_a ? LaunchWs<C, true, true, false>(q, experts, rows, max_tiles, stream)
                         : LaunchWs<C, false, true, false>(q, experts, rows, max_tiles, stream);
  }
  if (args.gather_a) return LaunchWs<C, true, false, false>(q, experts, rows, max_tiles, stream);
  return args.routing_ready ? LaunchWs<C, false, false, true>(q, experts, rows, max_tiles, stream)
                            : LaunchWs<C, false, false, false>(q, experts, rows, max_tiles, stream);
}

// ---------------------------------------------------------------------------------------- silu-mul

constexpr int kSiluThreads = 256;

__global__ void __launch_bounds__(kSiluThreads)
    MoeSiluMulKernel(const __nv_bfloat16* __restrict__ gate_up, int64_t rows, int32_t intermediate,
                     const int32_t* __restrict__ num_rows, __nv_bfloat16* __restrict__ act) {
  PdlWait();  // gate_up and the row count come from earlier kernels
  PdlLaunchDependents();
  int64_t rows_in_use = rows;
  if (num_rows != nullptr) rows_in_use = min(rows, static_cast<int64_t>(max(*num_rows, 0)));
  const int chunks_per_row = intermediate / 8;
  const int64_t total = rows_in_use * chunks_per_row;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * kSiluThreads + threadIdx.x; c < total;
       c += static_cast<int64_t>(gridDim.x) * kSiluThreads) {
    const int64_t row = c / chunks_per_row;
    const int col = static_cast<int>(c - row * chunks_per_row) * 8;
    const __nv_bfloat16* in = gate_up + row * 2 * intermediate + col;
    const uint4 gate = *reinterpret_cast<const uint4*>(in);
    const uint4 up = *reinterpret_cast<const uint4*>(in + intermediate);
    const __nv_bfloat162* g2 = reinterpret_cast<const __nv_bfloat162*>(&gate);
    const __nv_bfloat162* u2 = reinterpret_cast<const __nv_bfloat162*>(&up);
    uint4 packed;
    __nv_bfloat162* o2 = reinterpret_cast<__nv_bfloat162*>(&packed);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 g = __bfloat1622float2(g2[i]);
      const float2 u = __bfloat1622float2(u2[i]);
      o2[i] = __floats2bfloat162_rn(SiluMul(g.x, u.x), SiluMul(g.y, u.y));
    }
    *reinterpret_cast<uint4*>(act + row * intermediate + col) = packed;
  }
}

bool Aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Tiles a routing can fill, from its host shape: each routed expert's rows leave at most one partial
// tile and every tile holds a row; each shared expert has one row per token. Tighter than max_tiles(),
// which sizes the buffers; it caps the grid and picks the decode tiles.
int64_t TilesBound(const MoeRouting& r) {
  const int64_t routed = r.num_pairs();
  const int64_t routed_tiles =
      std::min(routed, CeilDiv(routed, r.tile_rows) + std::min<int64_t>(routed, r.num_experts));
  return routed_tiles + r.num_shared * CeilDiv(r.num_tokens, r.tile_rows);
}

}  // namespace

cudaError_t LaunchMoeGroupedGemm(const MoeGemmArgs& args, const MoeRouting& r, cudaStream_t stream) {
  const int64_t n = args.out_features;
  const int64_t k = args.in_features;
  if (n <= 0 || k <= 0 || n % 8 != 0 || k % 8 != 0 || n > INT32_MAX / 2 || k > INT32_MAX / 2 ||
      args.a == nullptr || args.weights == nullptr || args.y == nullptr || !Aligned16(args.a) ||
      !Aligned16(args.weights) || !Aligned16(args.y) || r.num_experts < 1 || r.num_experts > kMoeMaxExperts ||
      r.num_shared < 0 || r.num_shared > kMoeMaxShared || r.top_k < 1 || r.top_k > kMoeMaxTopK ||
      r.num_tokens < 0 || r.expert_offsets == nullptr || r.row_token == nullptr ||
      r.tile_expert == nullptr || r.tile_row == nullptr || r.num_tiles == nullptr ||
      (r.tile_rows != DecodeTiles::kBM && r.item_counters == nullptr)) {
    return cudaErrorInvalidValue;
  }
  GemmParams p;
  p.a = args.a;
  p.w = args.weights;
  p.y = args.y;
  p.expert_offsets = r.expert_offsets;
  p.row_token = r.row_token;
  p.tile_expert = r.tile_expert;
  p.tile_row = r.tile_row;
  p.num_tiles = r.num_tiles;
  p.item_counters = r.item_counters;
  p.n = static_cast<int32_t>(n);
  p.k = static_cast<int32_t>(k);
  p.n_blocks = 0;
  p.k_steps = 0;
  p.one_token_tiles = r.num_tokens == 1 ? r.top_k + r.num_shared : 0;
  p.top_k = r.top_k;
  p.num_routed = r.num_experts;
  const int64_t max_tiles = TilesBound(r);
  switch (r.tile_rows) {
    case DecodeTiles::kBM: {
      int sms = 0;
      if (const cudaError_t e = kernels::CurrentDeviceSms(&sms); e != cudaSuccess) return e;
      const GemmParams q = Shaped<DecodePairTiles>(p, args.silu_mul);
      if (CanStartEarly<DecodePairTiles>(args, q) && max_tiles * q.n_blocks <= 2 * int64_t{sms}) {
        return LaunchTiles<DecodePairTiles, false, false, true>(q, max_tiles, stream);
      }
      return LaunchGemm<DecodeTiles>(p, args, max_tiles, stream);
    }
    case MidTiles::kBM:
      return LaunchWsGemm<MidTiles>(p, args, r, max_tiles, stream);
    case PrefillTiles::kBM:
      return LaunchWsGemm<PrefillTiles>(p, args, r, max_tiles, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t LaunchMoeSiluMul(const __nv_bfloat16* gate_up, int64_t rows, int64_t intermediate,
                             const int32_t* num_rows, __nv_bfloat16* act, cudaStream_t stream) {
  if (rows < 0 || intermediate <= 0 || intermediate % 8 != 0 || intermediate > INT32_MAX / 2 ||
      gate_up == nullptr || act == nullptr || !Aligned16(gate_up) || !Aligned16(act)) {
    return cudaErrorInvalidValue;
  }
  const int64_t chunks = rows * (intermediate / 8);
  if (chunks == 0) return cudaSuccess;
  const int64_t blocks = (chunks + kSiluThreads - 1) / kSiluThreads;
  const unsigned grid = static_cast<unsigned>(blocks < 4096 ? blocks : 4096);
  return LaunchPdl(MoeSiluMulKernel, dim3(grid), dim3(kSiluThreads), 0, stream, gate_up, rows,
                   static_cast<int32_t>(intermediate), num_rows, act);
}

}  // namespace cohort
