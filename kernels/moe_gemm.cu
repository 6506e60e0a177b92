// Grouped expert GEMM and SiLU-and-mul of the MoE path. Contracts in moe.h.
//
// The GEMM is a persistent kernel: gridDim = SMs x resident blocks, and block b takes the work items
// b, b + gridDim, ... of the (tile, column block) list, tile fastest, so the M-tiles of one expert run
// side by side and share its weight columns through L2. Each item streams a BN x K weight slice and a
// BM x K activation slice (rows gathered through row_token) through a STAGES-deep cp.async ring; the
// ring runs across item boundaries, so the next item's first loads overlap this item's last MMAs and
// its epilogue. A product whose routing is complete when it starts (MoeGemmArgs::routing_ready) looks
// up its first tile and requests its first stages' weights before its PDL wait. The grid is capped by
// a bound on the items from the batch shape (TilesBound), so no block is launched that can have no
// work. All threads load and all warps compute from an XOR-swizzled layout (16-byte chunk c of row r
// lives at chunk c ^ (r % 8)): decode tiles with mma.sync m16n8k16, operands via ldmatrix; tiles of
// 64 and 128 rows (BK = 64, so the layout is wgmma's 128-byte swizzle) with wgmma, operands read by
// the tensor cores from shared memory, one k-step's products running while the stage before is
// refilled.
//
// With silu_mul an item covers BN / 2 act columns j0 .. j0 + BN/2 - 1 and its BN weight rows interleave
// the gate and up rows in groups of 16: tile row r holds the gate (r / 8 % 2 == 0) or up row of act
// column j0 + 8 (r / 16) + r % 8. A warp's n8 fragments 2f and 2f + 1 are then the gate and the up of
// the same 8 columns, each accumulator of one sits in the same thread and register as its partner in
// the other, and the epilogue writes silu(gate) * up with no exchange between threads. wgmma's
// accumulators sit per warp as 16 such n8 fragments, so the same epilogue serves both.
#include <cuda_bf16.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "kernels/launch_setup.h"
#include "kernels/mma.cuh"
#include "kernels/moe.h"
#include "kernels/pdl.cuh"
#include "kernels/wgmma.cuh"

namespace cohort {
namespace {

using kernels::CpAsync16;
using kernels::CpAsyncCommit;
using kernels::CpAsyncWait;
using kernels::EvictFirstPolicy;
using kernels::FenceProxyAsync;
using kernels::LaunchPdl;
using kernels::LdMatrixX4;
using kernels::MmaBf16;
using kernels::PdlLaunchDependents;
using kernels::PdlWait;
using kernels::SmemAddress;
using kernels::SwizzledDescriptor;
using kernels::SwizzledOffset;
using kernels::WgmmaBf16;
using kernels::WgmmaCommit;
using kernels::WgmmaFence;
using kernels::WgmmaWait;

constexpr int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// WGMMA: the block's two warpgroups multiply with wgmma (sm_90a) from the swizzled stages, each 64
// rows by kWarpN columns (128-row tiles: split along M, WARPS_N = 1; 64-row tiles: along N,
// WARPS_N = 2); a warp's accumulators are then laid out as mma.sync's for its 16 rows, and the
// epilogue is the same. Otherwise each warp runs ldmatrix and mma.sync on its own tile.
template <int BM, int BN, int BK, int WARPS_M, int WARPS_N, int STAGES, int MIN_BLOCKS, bool WGMMA = false>
struct TileConfig {
  static constexpr bool kWgmma = WGMMA;
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
  // wgmma: two warpgroups, along M for 128-row tiles and along N for 64-row ones, each 64 rows x
  // kWarpN columns; a warp's accumulators are those of its 16 rows.
  static constexpr int kWgRowGroups = BM >= 64 ? BM / 64 : 1;
  static_assert(!WGMMA || (kThreads == 256 && BK == 64 && kWarpM == 16 &&
                           ((BM == 128 && WARPS_N == 1) || (BM == 64 && WARPS_N == 2)) &&
                           (kWarpN == 64 || kWarpN == 256)),
                "wgmma: two warpgroups of m64n64k16 or m64n256k16 from 128-byte swizzled rows");
};

// Decode: few rows per expert, so the weights are the traffic. 64 columns per item gives enough items
// to fill 132 SMs from 6 experts; 3 stages x 20 KB, three blocks per SM.
using DecodeTiles = TileConfig<16, 64, 128, 1, 4, 3, 3>;
// A down product with its routing ready (weights requested before the wait) and at most two items per
// SM (one V2-Lite token: 6 experts x 32 items on 132 SMs): 4 stages, two blocks per SM, so three
// stages of weights are in flight before the gate_up product ends.
using DecodePairTiles = TileConfig<16, 64, 128, 1, 4, 4, 2>;
// Whether the weights stream through L2 as evict-first lines. At decode sizes each expert's weights
// are read once a step (a second row tile of an expert reads them at the same time), and letting them
// push out nothing else — activations, routing tables, the KV cache — measured 1-3% faster decode
// steps (batch 1-128, cohort bench step). Prefill tiles re-read weights across row tiles: left as is.
template <class C>
constexpr bool kStreamWeights = C::kBM == DecodeTiles::kBM;
// Tens of rows per expert: 64 x 128 tiles on wgmma, two warpgroups of 64 x 64 (32 fp32 accumulators
// a thread); 96 KB of smem, two blocks per SM. moe_bench on an H200 against the same tiles on
// mma.sync (8 warps of 32 x 32): 341 against 403-409 us a layer at 512 tokens, 304 against 322 at 256.
using MidTiles = TileConfig<64, 128, 64, 4, 2, 4, 2, true>;
// Prefill: 128 x 256 tiles on wgmma, two warpgroups of m64n256k16 (128 fp32 accumulators a thread,
// 186-188 registers, no spills), 4 stages of 48 KB, one block per SM: every k-step of A serves twice
// the columns of a 128 x 128 tile. H200, 2026-11-29: cohort bench step's prefill against 128 x 128
// tiles (scripts/gpu_tests.sh ab, alternating, three runs each) 1 x 4096 99.7-100.1 -> 91.9 ms,
// 16 x 1024 252.7-254.4 -> 220.8-221.4 ms; moe_bench 1428 us a layer at 4096 tokens, 419 at 1024
// (1786-1788 and 500-512 with 128 x 128 tiles in an earlier call, which had beaten mma.sync tiles by
// 14-18%; there 6 stages measured the same as 4).
using PrefillTiles = TileConfig<128, 256, 64, 8, 1, 4, 1, true>;

struct GemmParams {
  const __nv_bfloat16* a;
  const __nv_bfloat16* w;
  __nv_bfloat16* y;
  const int32_t* expert_offsets;
  const int32_t* row_token;
  const int32_t* tile_expert;
  const int32_t* tile_row;
  const int32_t* num_tiles;
  int32_t n;  // output columns: I with silu_mul (the weights then have 2n rows per expert)
  int32_t k;
  int32_t n_blocks;
  int32_t k_steps;
};

// The SiLU-and-mul of MoeSiluMulKernel and the fused epilogue: one formula for both.
__device__ __forceinline__ float SiluMul(float gate, float up) { return gate / (1.0f + expf(-gate)) * up; }

// kEarly (the routing complete when the kernel starts; no gather, no silu_mul): the first tile's
// lookups and its first stages' weights come before the wait, only the activations after it.
template <class C, bool kGather, bool kSiluMul, bool kEarly>
__global__ void __launch_bounds__(C::kThreads, C::kMinBlocks) MoeGroupedGemmKernel(const GemmParams p) {
  // 1024-byte aligned: wgmma reads the stages as 128-byte swizzled tiles (SwizzledDescriptor).
  extern __shared__ __align__(1024) unsigned char smem[];
  const uint32_t smem_base = SmemAddress(smem);
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  // wgmma: warp w of warpgroup g holds rows 16 w of the group's 64, all of its columns.
  const int warpgroup = warp / 4;
  const int warp_row = C::kWgmma ? (warpgroup % C::kWgRowGroups) * 64 + (warp % 4) * 16
                                 : (warp / C::kWarpsN) * C::kWarpM;
  const int warp_col = C::kWgmma ? (warpgroup / C::kWgRowGroups) * C::kWarpN : (warp % C::kWarpsN) * C::kWarpN;
  const uint64_t weight_policy = kStreamWeights<C> ? EvictFirstPolicy() : 0;

  if constexpr (!kEarly) {
    PdlWait();  // the routing buffers and the activations come from earlier kernels
    PdlLaunchDependents();
  }
  const int num_tiles = *p.num_tiles;
  const int num_items = num_tiles * p.n_blocks;
  if (static_cast<int>(blockIdx.x) >= num_items) {
    if constexpr (kEarly) PdlWait();  // exits only after the kernel before it: PDL's ordering holds
    return;
  }
  const int my_items = (num_items - 1 - static_cast<int>(blockIdx.x)) / static_cast<int>(gridDim.x) + 1;
  const int total_steps = my_items * p.k_steps;

  // This thread's share of each stage: chunk column ld_chunk of rows ld_row + i * kRowsPerPass.
  const int ld_chunk = tid % C::kChunksPerRow;
  const int ld_row = tid / C::kChunksPerRow;
  const uint32_t ld_smem_a = SwizzledOffset<C::kBK>(ld_row, ld_chunk);
  const uint32_t ld_smem_b = C::kBM * C::kBK * 2 + ld_smem_a;
  constexpr uint32_t kPassBytes = C::kRowsPerPass * C::kBK * 2;

  // Producer state: the item being loaded and its per-thread source pointers.
  int load_item = 0;
  int load_kstep = 0;
  int load_stage = 0;
  const __nv_bfloat16* a_src[C::kAChunks];
  const __nv_bfloat16* b_src = p.w;
  uint32_t a_ok = 0;
  uint32_t b_ok = 0;

  auto begin_item = [&](int local_item) {
    const int item = static_cast<int>(blockIdx.x) + local_item * static_cast<int>(gridDim.x);
    const int tile = item % num_tiles;
    const int n_block = item / num_tiles;
    const int expert = p.tile_expert[tile];
    const int first = p.tile_row[tile];
    const int rows = min(C::kBM, p.expert_offsets[expert + 1] - first);
    a_ok = 0;
#pragma unroll
    for (int i = 0; i < C::kAChunks; ++i) {
      const int r = ld_row + i * C::kRowsPerPass;
      int source = 0;
      if (r < rows) {
        source = kGather ? p.row_token[first + r] : first + r;
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
      if constexpr (kStreamWeights<C>) {
        CpAsync16(stage + ld_smem_b + i * kPassBytes, src, ok ? 16u : 0u, weight_policy);
      } else {
        CpAsync16(stage + ld_smem_b + i * kPassBytes, src, ok ? 16u : 0u);
      }
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

  if constexpr (kEarly) {
    // Groups B_0 .. B_{S-2} (weights) before the wait, A_0 .. A_{S-2} (activations) after it. These
    // S - 1 steps lie in the block's first item: it has one (blocks without exited above), and the
    // launcher makes sure an item has at least S - 1 k-steps (CanStartEarly). At loop step s the
    // groups committed after A_s number S - 2, as in the plain ring, so the loop's wait holds unchanged.
    constexpr int kEarlySteps = C::kStages - 1;
    begin_item(0);
#pragma unroll
    for (int s = 0; s < kEarlySteps; ++s) {
      issue_b(s, s);
      CpAsyncCommit();
    }
    PdlWait();  // the activations come from the previous kernel
    PdlLaunchDependents();
#pragma unroll
    for (int s = 0; s < kEarlySteps; ++s) {
      issue_a(s, s);
      CpAsyncCommit();
    }
    loaded_steps = kEarlySteps;
    load_stage = kEarlySteps;
    load_kstep = kEarlySteps;
    if (load_kstep == p.k_steps) {
      load_kstep = 0;
      ++load_item;
    }
  } else {
#pragma unroll
    for (int s = 0; s < C::kStages - 1; ++s) load_next();
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
    const int first = p.tile_row[tile];
    const int rows = min(C::kBM, p.expert_offsets[p.tile_expert[tile] + 1] - first);
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

  if constexpr (C::kWgmma) {
    // Item by item: the accumulators are touched only by wgmma between an item's first k-step
    // (which overwrites them) and its stores.
    // This warpgroup's 64 rows of A and kWarpN rows of B (128 bytes each).
    const uint32_t a_rows = (warpgroup % C::kWgRowGroups) * 64 * C::kBK * 2;
    const uint32_t b_rows = warp_col * C::kBK * 2;
    for (int local_item = 0; local_item < my_items; ++local_item) {
      for (int kstep = 0; kstep < p.k_steps; ++kstep) {
        CpAsyncWait<C::kStages - 2>();
        FenceProxyAsync();
        __syncthreads();  // stage `kstep` landed for all threads
        const uint32_t stage_a = smem_base + read_stage * C::kStageBytes;
        const uint32_t stage_b = stage_a + C::kBM * C::kBK * 2;
        WgmmaFence();
#pragma unroll
        for (int kk = 0; kk < C::kBK / 16; ++kk) {
          WgmmaBf16<C::kWarpN>(acc[0], SwizzledDescriptor(stage_a + a_rows + 32 * kk),
                               SwizzledDescriptor(stage_b + b_rows + 32 * kk), kstep > 0 || kk > 0);
        }
        WgmmaCommit();
        // This step's products run while the stage before it is released and refilled: once every
        // warpgroup's products of that stage are done, the ring loads into its slot.
        WgmmaWait<1>();
        __syncthreads();
        load_next();
        read_stage = read_stage + 1 == C::kStages ? 0 : read_stage + 1;
      }
      WgmmaWait<0>();
      store_item(local_item);
    }
  } else {
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

// p with the column blocks and k-steps of tiles C.
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
      r.tile_expert == nullptr || r.tile_row == nullptr || r.num_tiles == nullptr) {
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
  p.n = static_cast<int32_t>(n);
  p.k = static_cast<int32_t>(k);
  p.n_blocks = 0;
  p.k_steps = 0;
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
      return LaunchGemm<MidTiles>(p, args, max_tiles, stream);
    case PrefillTiles::kBM:
      return LaunchGemm<PrefillTiles>(p, args, max_tiles, stream);
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
