#include "kernels/mla_decode.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "kernels/launch_setup.h"
#include "kernels/mma.cuh"
#include "kernels/pdl.cuh"
#include "kernels/reduce.cuh"

namespace cohort::kernels {
namespace {

constexpr int kHeadsPerBlock = 16;            // the mma M dimension
constexpr int kTileTokens = kMlaTileTokens;   // tokens per shared-memory tile
constexpr int64_t kLongContext = 2048;        // MlaDecodeSplits: tokens past which a context counts as long
// The cost of a plan in tile times (MlaDecodeSplits, MlaDecodePlanner): the merge writes and reads each
// partial row, fp32, about 1.8 times a tile's bytes of cache (2 x 4 x kv_lora_rank against 32 x
// (kv_lora_rank + rope) x 2 for DeepSeek's 512 + 64), spread over the whole GPU, and its launch
// costs about two tile times.
constexpr double kPartialTiles = 1.8, kMergeLaunchTiles = 2.0;
// Tile times of a merge of `partial_blocks` partial rows (each for one group of 16 heads).
double MergeTiles(int64_t partial_blocks, int64_t resident_blocks) {
  return kPartialTiles * static_cast<double>(partial_blocks) / static_cast<double>(resident_blocks) +
         kMergeLaunchTiles;
}
// Blocks a query takes per item: one for each group of 16 heads.
int64_t HeadGroups(int heads) { return (heads + kHeadsPerBlock - 1) / kHeadsPerBlock; }
// A packed plan's block starts each item after its first about a tile's time late: the item's queries
// and first tile are requested only once the last item is done (MlaDecodePlanner::Pack).
constexpr double kPackedItemTiles = 1.0;
// The fewest tiles a packed plan gives a block: as MlaDecodeSplits' items past 16 splits, where a
// merge of more partials costs more than a tile.
constexpr int64_t kMinPackedTiles = 2;

// Work of a tile: scores Q . K^T (16 heads x 32 tokens, k = the cached width) with the k range split
// over the warps, each holding its slice of the queries in registers; the warps' partial scores are
// summed in shared memory by the softmax; then P . V (16 heads x kv_lora_rank, k = 32 tokens) with
// the output columns split over the warps. Operands come from shared memory through ldmatrix (the
// values side transposed), so a tile costs a few dozen shared-memory instructions per warp.
//
// Two forms of the block, by how many blocks the grid has:
// - More than one an SM (the GPU full): four warps and two cache tiles, two blocks an SM, so that
//   while one block waits at a barrier the other computes. The next tile is copied while this one
//   is multiplied.
// - At most one an SM (few queries): eight warps, each with half the k slice and half the columns,
//   so a tile takes about half as long where nothing else runs beside it, and a ring of five tiles
//   (the queries in its last slot until the first tile's scores are computed), so a split's first
//   four tiles are all requested at once. One barrier a tile fewer: a slot is refilled only after
//   the barrier that follows the scores, by when every warp is done with the tile before.
// Launches with room for uneven plans always run the four-warp form, which can take a packed plan
// (kPacked: a block's items one after another, each item's queries and first tile requested once the
// last is done).
// H200, cohort bench step against four-warp blocks alone: with eight-warp blocks for small grids,
// 3.7% faster at batch 1 x 4096 and 0.6-1.5% at batch 1-2 otherwise (1.3% at 1 x 4096 without the
// ring); eight-warp blocks with the ring as the only form were 4.5-11% slower at batch 256-512.
template <int kRank, int kRope, int kWarpsPerBlock>
struct Shape {
  static constexpr int kWarps = kWarpsPerBlock;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kMinBlocks = kWarps == 4 ? 2 : 1;
  static constexpr int kStages = kWarps == 4 ? 2 : 5;  // cache tiles in shared memory
  static constexpr bool kRing = kStages > 2;
  static constexpr int kWidth = kRank + kRope;                  // cached values per token
  static constexpr int kWidthPadded = (kWidth + 15) / 16 * 16;  // mma k granularity
  static constexpr int kStride = kWidthPadded + 8;              // smem row stride: +16 bytes, conflict-free ldmatrix
  static constexpr int kSteps = kWidthPadded / 16;              // k16 steps of the scores
  static constexpr int kStepsPerWarp = (kSteps + kWarps - 1) / kWarps;
  static constexpr int kColsPerWarp = kRank / kWarps;           // output latent columns per warp
  static constexpr int kColTiles = kColsPerWarp / 8;
  static constexpr int kPStride = kTileTokens + 8;
  static constexpr int kScoreStride = kTileTokens + 8;          // conflict-free float2 stores
  // A cache tile is copied by kThreadsPerRow threads a row, so that each copy instruction of a warp
  // moves 4 rows x 128 contiguous bytes, whole L2 lines; a thread copies kRowsPerThread rows
  // kRowStride apart, after a block-table lookup for each (TileRowSource, CopyTileRow).
  static constexpr int kThreadsPerRow = 8;
  static constexpr int kRowStride = kThreads / kThreadsPerRow;
  static constexpr int kRowsPerThread = kTileTokens / kRowStride;
  // The softmax: kSoftmaxLanes consecutive threads per head row, kSoftmaxTokens scores each.
  static constexpr int kSoftmaxLanes = kThreads / kHeadsPerBlock;
  static constexpr int kSoftmaxTokens = kTileTokens / kSoftmaxLanes;
  static_assert(kColsPerWarp % 8 == 0, "kv_lora_rank must be a multiple of 8 a warp");
  static_assert(kTileTokens % kRowStride == 0, "whole rows a thread");
  static_assert(kSoftmaxLanes <= 32 && 32 % kSoftmaxLanes == 0, "a head row's softmax lanes lie in one warp");
  static_assert(kWidth % 8 == 0, "a cache row must be whole 16-byte chunks");
  static_assert(kTileTokens % 16 == 0, "tiles are whole k16 steps of P . V");

  struct Smem {
    __align__(16) __nv_bfloat16 q[kRing ? 1 : kHeadsPerBlock][kStride];  // unused with a ring (QueryRows)
    __align__(16) __nv_bfloat16 kv[kStages][kTileTokens][kStride];
    __align__(16) float scores[kWarps][kHeadsPerBlock][kScoreStride];  // each warp's partial sums
    __align__(16) __nv_bfloat16 p[kHeadsPerBlock][kPStride];
    float row_max[kHeadsPerBlock];
    float row_sum[kHeadsPerBlock];
    float row_scale[kHeadsPerBlock];
  };
  static_assert(kHeadsPerBlock <= kTileTokens, "the queries fit in a tile's slot");

  // The queries' rows.
  static __device__ __forceinline__ __nv_bfloat16 (*QueryRows(Smem& s))[kStride] {
    if constexpr (kRing) return s.kv[kStages - 1];
    return s.q;
  }
};

// The token of this thread's row r of `tile`.
template <class S>
__device__ __forceinline__ int RowToken(int tile, int r) {
  return tile * kTileTokens + static_cast<int>(threadIdx.x) / S::kThreadsPerRow + r * S::kRowStride;
}

// This thread's cache row r of `tile`, or nullptr past the context.
template <class S>
__device__ __forceinline__ const __nv_bfloat16* TileRowSource(int tile, int r, const MlaDecodeParams& p,
                                                             const int32_t* table, int kv_len) {
  const int token = RowToken<S>(tile, r);
  if (token >= kv_len) return nullptr;
  const int64_t slot = static_cast<int64_t>(table[token / p.block_size]) * p.block_size + token % p.block_size;
  return p.cache + slot * S::kWidth;
}

template <class S>
__device__ __forceinline__ void CopyTileRow(typename S::Smem& s, int buffer, int r, const __nv_bfloat16* src,
                                            const MlaDecodeParams& p) {
  constexpr int kChunks = S::kWidth / 8;  // 16-byte chunks per token
  const int row = threadIdx.x / S::kThreadsPerRow + r * S::kRowStride, first_chunk = threadIdx.x % S::kThreadsPerRow;
  const bool valid = src != nullptr;
#pragma unroll
  for (int chunk = first_chunk; chunk < kChunks; chunk += S::kThreadsPerRow) {
    CpAsync16(&s.kv[buffer][row][chunk * 8], valid ? src + chunk * 8 : p.cache, valid);
  }
}

// This thread's rows of `tile` into `buffer`.
template <class S>
__device__ __forceinline__ void CopyTile(typename S::Smem& s, int buffer, int tile, const MlaDecodeParams& p,
                                         const int32_t* table, int kv_len) {
#pragma unroll
  for (int r = 0; r < S::kRowsPerThread; ++r) {
    CopyTileRow<S>(s, buffer, r, TileRowSource<S>(tile, r, p, table, kv_len), p);
  }
}

// kPacked (launches with room for uneven plans): the block takes its item and the `more` after it,
// one after another (a packed plan); an item another block takes leaves at once.
template <int kRank, int kRope, int kWarps, bool kPacked>
__global__ void __launch_bounds__(kWarps * 32, Shape<kRank, kRope, kWarps>::kMinBlocks)
    MlaDecodeKernel(MlaDecodeParams p) {
  using S = Shape<kRank, kRope, kWarps>;
  static_assert(!kPacked || !S::kRing, "a packed block reloads its queries, which a ring's last slot holds");
  constexpr int kThreads = S::kThreads, kStages = S::kStages;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  auto& s = *reinterpret_cast<typename S::Smem*>(smem_raw);
  __nv_bfloat16(*q_rows)[S::kStride] = S::QueryRows(s);

  // Head groups fastest: the blocks that read the same cache tiles for different heads run together
  // and share them through L2.
  const int head0 = blockIdx.x * kHeadsPerBlock;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  // ldmatrix addressing: this lane's row within a 16-row operand and its 8-column half.
  const int ld_row = lane % 8 + 8 * ((lane / 8) % 2), ld_col = 8 * (lane / 16);

  // The plan, positions and block tables are step inputs, copied up before the step's first kernel,
  // so the chain of lookups up to this thread's first cache row runs before the wait, and so does
  // the copy of that row when an earlier step wrote it (or it lies past the context: zeros). The
  // queries and this step's cache rows (written by the kernel before) are copied after the wait.
  const MlaWorkItem first = p.work[blockIdx.y];
  // A slot with no work leaves at once: the launch still ends after the kernel before it, since every
  // plan has an item a query and those blocks wait for it. An item holds at least one tile.
  if (first.query < 0 || (kPacked && first.taken)) return;
  const int items = kPacked ? 1 + first.more : 1;
  for (int done = 0; done < items; ++done) {
    const MlaWorkItem item = done == 0 ? first : p.work[blockIdx.y + done];
    const int query = item.query, tile_begin = item.tile_begin, tile_end = item.tile_end, kv_len = item.context;
    const int32_t* table = p.block_tables + item.table_offset;
    const int earlier_rows = p.step_tokens_bound > 0 ? kv_len - p.step_tokens_bound : 0;  // rows [0, this)
    const __nv_bfloat16* first_rows[S::kRowsPerThread];
    bool early[S::kRowsPerThread];
#pragma unroll
    for (int r = 0; r < S::kRowsPerThread; ++r) {
      first_rows[r] = TileRowSource<S>(tile_begin, r, p, table, kv_len);
      early[r] = done == 0 && (first_rows[r] == nullptr || RowToken<S>(tile_begin, r) < earlier_rows);
      if (early[r]) CopyTileRow<S>(s, 0, r, first_rows[r], p);
    }
    if (done == 0) {
      PdlWait();
      PdlLaunchDependents();
    } else {
      __syncthreads();  // every warp is done with the last item's row sums (and, long since, its tiles)
    }

    // Queries (16 heads x (latent | rope)) and the rest of the first cache tile join the same async
    // group: every load is in flight at once. Heads past p.heads are zero rows.
    constexpr int kRankChunks = kRank / 8, kRowChunks = (kRank + kRope) / 8;
    for (int i = threadIdx.x; i < kHeadsPerBlock * kRowChunks; i += kThreads) {
      const int h = i / kRowChunks, c = i % kRowChunks, head = head0 + h;
      const bool valid = head < p.heads;
      const __nv_bfloat16* src = p.q_latent;
      if (valid && c < kRankChunks) {
        src = p.q_latent + (static_cast<int64_t>(query) * p.heads + head) * kRank + c * 8;
      } else if (valid) {
        src = p.q_rope + query * p.q_rope_row_stride + head * p.q_rope_head_stride + (c - kRankChunks) * 8;
      }
      CpAsync16(&q_rows[h][c * 8], src, valid);
    }
#pragma unroll
    for (int r = 0; r < S::kRowsPerThread; ++r) {
      if (!early[r]) CopyTileRow<S>(s, 0, r, first_rows[r], p);
    }
    CpAsyncCommit();  // one group with the rows copied before the wait
    if constexpr (S::kRing) {
      // The next kStages - 2 tiles, a group each (empty past the split): tile i has landed once all
      // but the kStages - 2 newest groups have.
#pragma unroll
      for (int d = 1; d < kStages - 1; ++d) {
        if (tile_begin + d < tile_end) CopyTile<S>(s, d, tile_begin + d, p, table, kv_len);
        CpAsyncCommit();
      }
    }

    // Padding columns of the queries and cache tiles are never copied into: zero them (again for each
    // item of a packed block, beside copies that touch only the other columns).
    if constexpr (S::kWidthPadded > S::kWidth) {
      constexpr int kPad = S::kWidthPadded - S::kWidth;
      for (int i = threadIdx.x; i < kHeadsPerBlock * kPad; i += kThreads) {
        q_rows[i / kPad][S::kWidth + i % kPad] = __float2bfloat16(0.0f);
      }
      for (int i = threadIdx.x; i < kStages * kTileTokens * kPad; i += kThreads) {
        s.kv[i / (kTileTokens * kPad)][(i / kPad) % kTileTokens][S::kWidth + i % kPad] = __float2bfloat16(0.0f);
      }
    }
    if (threadIdx.x < kHeadsPerBlock) {
      s.row_max[threadIdx.x] = -INFINITY;
      s.row_sum[threadIdx.x] = 0.0f;
    }

    uint32_t q_frag[S::kStepsPerWarp][4];  // this warp's k slice of the queries, as mma A fragments
    float acc[S::kColTiles][4] = {};
    for (int tile = tile_begin; tile < tile_end; ++tile) {
      const int buffer = (tile - tile_begin) % kStages;
      if constexpr (S::kRing) {
        CpAsyncWait<kStages - 2>();
      } else if (tile + 1 < tile_end) {
        CopyTile<S>(s, buffer ^ 1, tile + 1, p, table, kv_len);
        CpAsyncCommit();
        CpAsyncWait<1>();
      } else {
        CpAsyncWait<0>();
      }
      __syncthreads();
      if (tile == tile_begin) {
#pragma unroll
        for (int i = 0; i < S::kStepsPerWarp; ++i) {
          const int step = warp * S::kStepsPerWarp + i;
          if (step < S::kSteps) LdMatrixX4(q_frag[i], &q_rows[ld_row][step * 16 + ld_col]);
        }
      }

      // This warp's partial scores over its k slice, for the 16 heads x 32 tokens.
      const auto& kv = s.kv[buffer];
      float score[kTileTokens / 8][4] = {};
#pragma unroll
      for (int i = 0; i < S::kStepsPerWarp; ++i) {
        const int step = warp * S::kStepsPerWarp + i;
        if (step >= S::kSteps) break;
#pragma unroll
        for (int j = 0; j < kTileTokens / 16; ++j) {
          // Matrices: tokens 16j.. x k lo, tokens 16j.. x k hi, tokens 16j+8.. x k lo, x k hi.
          uint32_t b[4];
          LdMatrixX4(b, &kv[16 * j + lane % 8 + 8 * (lane / 16)][step * 16 + 8 * ((lane / 8) % 2)]);
          MmaBf16(score[2 * j], q_frag[i], {b[0], b[1]});
          MmaBf16(score[2 * j + 1], q_frag[i], {b[2], b[3]});
        }
      }
#pragma unroll
      for (int j = 0; j < kTileTokens / 8; ++j) {
        *reinterpret_cast<float2*>(&s.scores[warp][g][8 * j + 2 * t]) = make_float2(score[j][0], score[j][1]);
        *reinterpret_cast<float2*>(&s.scores[warp][g + 8][8 * j + 2 * t]) = make_float2(score[j][2], score[j][3]);
      }
      __syncthreads();
      if constexpr (S::kRing) {
        // Every warp is done with the tile before (and, at the first tile, with the queries): the tile
        // kStages - 1 on takes its slot.
        if (tile + kStages - 1 < tile_end) {
          CopyTile<S>(s, (buffer + kStages - 1) % kStages, tile + kStages - 1, p, table, kv_len);
        }
        CpAsyncCommit();
      }

      // Online softmax: kLanes consecutive lanes per head row, kTokens scores each, summed over the
      // warps' parts.
      {
        constexpr int kLanes = S::kSoftmaxLanes, kTokens = S::kSoftmaxTokens;
        const int row = threadIdx.x / kLanes, part = threadIdx.x % kLanes;
        float v[kTokens], tile_max = -INFINITY;
#pragma unroll
        for (int i = 0; i < kTokens; ++i) {
          float raw = 0.0f;
#pragma unroll
          for (int w = 0; w < kWarps; ++w) raw += s.scores[w][row][part * kTokens + i];
          const int token = tile * kTileTokens + part * kTokens + i;
          v[i] = token < kv_len ? raw * p.softmax_scale : -INFINITY;
          tile_max = fmaxf(tile_max, v[i]);
        }
#pragma unroll
        for (int offset = kLanes / 2; offset > 0; offset >>= 1) {
          tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, offset));
        }
        const float old_max = s.row_max[row];
        const float new_max = fmaxf(old_max, tile_max);  // finite: every tile holds a valid token
        float sum = 0.0f;
#pragma unroll
        for (int i = 0; i < kTokens; ++i) {
          const float e = __expf(v[i] - new_max);
          sum += e;
          s.p[row][part * kTokens + i] = __float2bfloat16(e);
        }
#pragma unroll
        for (int offset = kLanes / 2; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
        __syncwarp();
        if (part == 0) {
          const float rescale = __expf(old_max - new_max);  // 0 on the first tile (old_max = -inf)
          s.row_scale[row] = rescale;
          s.row_sum[row] = s.row_sum[row] * rescale + sum;
          s.row_max[row] = new_max;
        }
      }
      __syncthreads();

      // acc = acc * rescale + P . V over this warp's output columns.
      const float scale_lo = s.row_scale[g], scale_hi = s.row_scale[g + 8];
#pragma unroll
      for (int n = 0; n < S::kColTiles; ++n) {
        acc[n][0] *= scale_lo;
        acc[n][1] *= scale_lo;
        acc[n][2] *= scale_hi;
        acc[n][3] *= scale_hi;
      }
      const int col0 = warp * S::kColsPerWarp;
#pragma unroll
      for (int k = 0; k < kTileTokens; k += 16) {
        uint32_t a[4];
        LdMatrixX4(a, &s.p[ld_row][k + ld_col]);
        // Matrices (transposed): tokens k.. x cols c.., tokens k+8.. x cols c.., then cols c+8...
#pragma unroll
        for (int n = 0; n + 1 < S::kColTiles; n += 2) {
          uint32_t b[4];
          LdMatrixX4Trans(b, &kv[k + ld_row][col0 + n * 8 + ld_col]);
          MmaBf16(acc[n], a, {b[0], b[1]});
          MmaBf16(acc[n + 1], a, {b[2], b[3]});
        }
        if constexpr (S::kColTiles % 2 == 1) {
          uint32_t b[2];
          LdMatrixX2Trans(b, &kv[k + ld_row][col0 + (S::kColTiles - 1) * 8]);
          MmaBf16(acc[S::kColTiles - 1], a, b);
        }
      }
      // The next iteration's copy reuses this buffer. With a ring, the next writes of P, the rescales and
      // the scores follow barriers that every warp reaches only after this P . V.
      if constexpr (!S::kRing) __syncthreads();
    }

    // Rows g and g + 8 of this lane: normalise and store.
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = g + 8 * half, head = head0 + row;
      if (head >= p.heads) continue;
      const float sum = s.row_sum[row];
      const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
      if (item.partial < 0) {
        __nv_bfloat16* out = p.out + (static_cast<int64_t>(query) * p.heads + head) * kRank;
#pragma unroll
        for (int n = 0; n < S::kColTiles; ++n) {
          const int c = warp * S::kColsPerWarp + n * 8 + 2 * t;
          *reinterpret_cast<__nv_bfloat162*>(out + c) =
              __floats2bfloat162_rn(acc[n][2 * half] * inv, acc[n][2 * half + 1] * inv);
        }
      } else {
        const int64_t partial = static_cast<int64_t>(item.partial) * p.heads + head;
        float* out = p.partial_out + partial * kRank;
#pragma unroll
        for (int n = 0; n < S::kColTiles; ++n) {
          const int c = warp * S::kColsPerWarp + n * 8 + 2 * t;
          *reinterpret_cast<float2*>(out + c) = make_float2(acc[n][2 * half] * inv, acc[n][2 * half + 1] * inv);
        }
        if (warp == 0 && t == 0) p.partial_lse[partial] = sum > 0.0f ? s.row_max[row] + __logf(sum) : -INFINITY;
      }
    }
  }
}

// out[q, h, :] = sum over splits of exp(lse_s - lse) * partial_s, lse = log sum exp(lse_s), for the
// query of merge row r (block (h, r)). Each thread sums 2 columns (kv_lora_rank <= 2 * 256) of every
// split: up to kSplits of them (the launch picks the smallest of 8, 16, 32 and 64 that holds
// shape.max_splits), or with kRounds (a launch with room for uneven plans, whose rows may hold
// more) any number, kSplits a round. A block is latency-bound: every partial of a round is in
// flight at once, loaded before the weights are known; each warp turns the log-sum-exps into
// weights itself (no block barrier between the loads and the sum).
//
// With value weights (kValue), block (h, r, part) goes on to apply them to the merged row, rounded
// to bf16 as `out` would hold it: attention outputs [kValueOutputs * part, + kValueOutputs) of the
// head, 4 a warp, each lane holding up to kMaxValuePieces 16-byte pieces of each weight row, loaded
// before the wait. Every part of a head merges the same row again: partials are few and in L2,
// and a launch less is worth more.
constexpr int kMaxSplits = 64;
constexpr int kCombineThreads = 256;
constexpr int kCombineWarps = kCombineThreads / 32;
constexpr int kMaxCombineRank = 2 * kCombineThreads;
constexpr int kValueOutputs = 4 * kCombineWarps;
constexpr int kMaxValuePieces = kMaxCombineRank / 8 / 32;

template <bool kValue, int kSplits, bool kRounds>
__global__ void __launch_bounds__(kCombineThreads) MlaCombineKernel(MlaDecodeParams p) {
  static_assert(kSplits <= 32 || kSplits % 32 == 0, "log-sum-exps are whole warps' worth past 32");
  constexpr int kLanes = kSplits < 32 ? 1 : kSplits / 32;  // log-sum-exps per lane
  __shared__ float weights[kCombineWarps][kSplits];
  __shared__ __align__(16) __nv_bfloat16 merged[kValue ? kMaxCombineRank : 8];
  const MlaMergeRow row = p.merges[blockIdx.y];  // a step input, like the plan's work items
  const int query = row.query, splits = row.splits, head = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int col = threadIdx.x * 2;
  const bool active = col < p.kv_lora_rank;
  uint4 w[kValue ? 4 : 1][kMaxValuePieces];
  if constexpr (kValue) {
#pragma unroll
    for (int o = 0; o < 4; ++o) {
      const int i = blockIdx.z * kValueOutputs + warp * 4 + o;
#pragma unroll
      for (int k = 0; k < kMaxValuePieces; ++k) {
        const int piece = (lane + 32 * k) * 8;
        w[o][k] = i < p.v_head_dim && piece < p.kv_lora_rank
                      ? __ldg(reinterpret_cast<const uint4*>(p.value_weights + head * p.value_head_stride +
                                                             static_cast<int64_t>(i) * p.kv_lora_rank + piece))
                      : make_uint4(0u, 0u, 0u, 0u);
      }
    }
  }
  PdlWait();
  PdlLaunchDependents();
  if (query < 0) return;  // after the wait, so that this launch still ends after the attention
  const int64_t first = static_cast<int64_t>(row.first_partial) * p.heads + head;
  const int64_t split_stride = static_cast<int64_t>(p.heads) * p.kv_lora_rank;
  // Rounds of kSplits partials (one without kRounds: the loop costs registers): sum holds the
  // rounds so far weighted by exp(lse - sum_max), total those weights' sum.
  float2 sum = make_float2(0.0f, 0.0f);
  float sum_max = -INFINITY, total = 0.0f;
  const float* partial = p.partial_out + first * p.kv_lora_rank + col;
  const float* partial_lse = p.partial_lse + first + lane * p.heads;
  for (int base = 0; base < splits && (kRounds || base == 0); base += kSplits) {
    const int n = min(kSplits, splits - base);
    float2 v[kSplits];
#pragma unroll
    for (int j = 0; j < kSplits; ++j) {
      v[j] = active && j < n ? *reinterpret_cast<const float2*>(partial + j * split_stride) : make_float2(0.0f, 0.0f);
    }
    partial += kSplits * split_stride;

    float lse[kLanes], round_max = -INFINITY;
#pragma unroll
    for (int j = 0; j < kLanes; ++j) {
      lse[j] = lane + 32 * j < n ? partial_lse[32 * j * p.heads] : -INFINITY;
      round_max = fmaxf(round_max, lse[j]);
    }
    partial_lse += kSplits * p.heads;
    const float new_max = fmaxf(sum_max, WarpMax(round_max));
    float e[kLanes], round_total = 0.0f;
#pragma unroll
    for (int j = 0; j < kLanes; ++j) {
      e[j] = lse[j] == -INFINITY ? 0.0f : __expf(lse[j] - new_max);
      round_total += e[j];
    }
    if (base > 0) __syncwarp();  // every lane has read the last round's weights
#pragma unroll
    for (int j = 0; j < kLanes; ++j) {
      if (lane + 32 * j < kSplits) weights[warp][lane + 32 * j] = e[j];
    }
    __syncwarp();

    const float rescale = __expf(sum_max - new_max);  // 0 in the first round
    sum.x *= rescale;
    sum.y *= rescale;
#pragma unroll
    for (int j = 0; j < kSplits; ++j) {
      const float weight = weights[warp][j];  // 0 past the row's splits
      sum.x += weight * v[j].x;
      sum.y += weight * v[j].y;
    }
    total = total * rescale + WarpSum(round_total);
    sum_max = new_max;
  }
  sum.x /= total;
  sum.y /= total;
  if constexpr (!kValue) {
    if (!active) return;
    __nv_bfloat16* out = p.out + (static_cast<int64_t>(query) * p.heads + head) * p.kv_lora_rank + col;
    *reinterpret_cast<__nv_bfloat162*>(out) = __floats2bfloat162_rn(sum.x, sum.y);
  } else {
    if (active) *reinterpret_cast<__nv_bfloat162*>(&merged[col]) = __floats2bfloat162_rn(sum.x, sum.y);
    __syncthreads();
    __nv_bfloat16* attn = p.attn + (static_cast<int64_t>(query) * p.heads + head) * p.v_head_dim;
#pragma unroll
    for (int o = 0; o < 4; ++o) {
      float dot = 0.0f;
#pragma unroll
      for (int k = 0; k < kMaxValuePieces; ++k) {
        const int piece = (lane + 32 * k) * 8;
        if (piece >= p.kv_lora_rank) continue;
        const uint4 m = *reinterpret_cast<const uint4*>(merged + piece);
        const __nv_bfloat162* mp = reinterpret_cast<const __nv_bfloat162*>(&m);
        const __nv_bfloat162* wp = reinterpret_cast<const __nv_bfloat162*>(&w[o][k]);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float2 mf = __bfloat1622float2(mp[e]), wf = __bfloat1622float2(wp[e]);
          dot += mf.x * wf.x + mf.y * wf.y;
        }
      }
      dot = WarpSum(dot);
      const int i = blockIdx.z * kValueOutputs + warp * 4 + o;
      if (lane == 0 && i < p.v_head_dim) attn[i] = __float2bfloat16(dot);
    }
  }
}

// The kernel's shared-memory limit raised on the current device, and its occupancy there.
template <int kRank, int kRope, int kWarps, bool kPacked>
cudaError_t SetUp(LaunchInfo* info) {
  static LaunchSetUp setup;
  using S = Shape<kRank, kRope, kWarps>;
  return setup.Get(MlaDecodeKernel<kRank, kRope, kWarps, kPacked>, S::kThreads, sizeof(typename S::Smem), info);
}

// The merge of the splits, with or without the value weights. Heads fastest: a plan's merge rows come
// first and its unused ones (query -1) last, so the blocks with work are handed out first.
template <int kSplits, bool kRounds>
cudaError_t LaunchCombine(const MlaDecodeParams& p, cudaStream_t stream) {
  const int rows = p.shape.merge_rows;
  if (p.value_weights != nullptr) {
    const dim3 grid(p.heads, rows, (p.v_head_dim + kValueOutputs - 1) / kValueOutputs);
    return LaunchPdl(MlaCombineKernel<true, kSplits, kRounds>, grid, dim3(kCombineThreads), 0, stream, p);
  }
  return LaunchPdl(MlaCombineKernel<false, kSplits, kRounds>, dim3(p.heads, rows), dim3(kCombineThreads), 0, stream, p);
}

// The attention kernel with kWarps warps a block.
template <int kRank, int kRope, int kWarps, bool kPacked = false>
cudaError_t LaunchKernel(const MlaDecodeParams& p, const dim3& grid, cudaStream_t stream) {
  using S = Shape<kRank, kRope, kWarps>;
  LaunchInfo info;
  if (const cudaError_t error = SetUp<kRank, kRope, kWarps, kPacked>(&info); error != cudaSuccess) return error;
  return LaunchPdl(MlaDecodeKernel<kRank, kRope, kWarps, kPacked>, grid, dim3(S::kThreads), sizeof(typename S::Smem),
                   stream, p);
}

template <int kRank, int kRope>
cudaError_t Launch(const MlaDecodeParams& p, cudaStream_t stream) {
  int sms = 0;
  if (const cudaError_t error = CurrentDeviceSms(&sms); error != cudaSuccess) return error;
  const dim3 grid(static_cast<unsigned>(HeadGroups(p.heads)), p.shape.work_slots);
  const int64_t blocks = int64_t{grid.x} * grid.y;
  cudaError_t error;
  if (p.shape.uneven) {  // its plan may be packed (MlaDecodePlanner)
    error = LaunchKernel<kRank, kRope, 4, true>(p, grid, stream);
  } else if constexpr (kRank >= 64) {  // eight warps hold 8k latent columns each
    error = blocks <= sms ? LaunchKernel<kRank, kRope, 8>(p, grid, stream)
                          : LaunchKernel<kRank, kRope, 4>(p, grid, stream);
  } else {
    error = LaunchKernel<kRank, kRope, 4>(p, grid, stream);
  }
  const int splits = p.shape.max_splits;
  if (error != cudaSuccess || (splits == 1 && p.value_weights == nullptr)) return error;
  if (p.shape.uneven) {  // 16 or 64 a round (MlaDecodeShapeFor)
    return splits <= 16 ? LaunchCombine<16, true>(p, stream) : LaunchCombine<kMaxSplits, true>(p, stream);
  }
  if (splits <= 8) return LaunchCombine<8, false>(p, stream);
  if (splits <= 16) return LaunchCombine<16, false>(p, stream);
  if (splits <= 32) return LaunchCombine<32, false>(p, stream);
  return LaunchCombine<kMaxSplits, false>(p, stream);
}

// Of the four-warp kernel, which the splits are chosen for.
template <int kRank, int kRope>
cudaError_t ResidentBlocks(int* blocks_per_sm) {
  LaunchInfo info;
  if (const cudaError_t error = SetUp<kRank, kRope, 4, false>(&info); error != cudaSuccess) return error;
  *blocks_per_sm = info.blocks_per_sm;
  return cudaSuccess;
}

}  // namespace

int64_t MlaSplitWorkspaceFloats(int64_t partials, int heads, int kv_lora_rank) {
  return partials * heads * (kv_lora_rank + 1);
}

cudaError_t LaunchMlaDecode(const MlaDecodeParams& p, cudaStream_t stream) {
  const MlaDecodeShape& shape = p.shape;
  if (shape.queries == 0) return cudaSuccess;
  const auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  const bool merged = shape.max_splits > 1 || p.value_weights != nullptr;
  if (shape.max_splits < 1 || shape.max_splits > kMaxSplits || shape.queries > 65535 || p.block_size <= 0 ||
      p.step_tokens_bound < 0 || shape.work_slots < 1 || shape.work_slots > 65535 || p.work == nullptr ||
      !aligned(p.work)) {
    return cudaErrorInvalidValue;
  }
  if (merged && (shape.merge_rows < 1 || p.merges == nullptr || !aligned(p.merges) || p.partial_out == nullptr ||
                 p.partial_lse == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (p.value_weights != nullptr &&
      (p.attn == nullptr || p.v_head_dim < 1 || p.value_head_stride % 8 != 0 || !aligned(p.value_weights))) {
    return cudaErrorInvalidValue;
  }
  // Queries are copied in 16-byte pieces.
  if (!aligned(p.q_latent) || !aligned(p.q_rope) || p.q_rope_row_stride % 8 != 0 || p.q_rope_head_stride % 8 != 0) {
    return cudaErrorInvalidValue;
  }
  if (p.kv_lora_rank == 512 && p.rope_dim == 64) return Launch<512, 64>(p, stream);
  if (p.kv_lora_rank == 64 && p.rope_dim == 16) return Launch<64, 16>(p, stream);
  if (p.kv_lora_rank == 32 && p.rope_dim == 8) return Launch<32, 8>(p, stream);
  return cudaErrorInvalidValue;
}

int MlaDecodeSplits(int queries, int heads, int64_t max_context, int64_t resident_blocks, int64_t max_pairs) {
  const int64_t blocks = std::max<int64_t>(1, queries * HeadGroups(heads));
  const int64_t resident = std::max<int64_t>(1, resident_blocks);
  const int64_t most = std::min<int64_t>(kMaxSplits, max_pairs / std::max(queries, 1));
  const bool long_context = max_context <= 0 || max_context > kLongContext;
  const int64_t context_tiles = max_context > 0 ? (max_context + kTileTokens - 1) / kTileTokens : 0;
  if (blocks <= resident / 2 || (blocks <= resident && !long_context)) {
    // As many splits as keep every (head group, split, query) block resident in one wave: a second,
    // partial wave would cost as much time as the first. A split takes at least one tile up to 16
    // splits, and at least two past that, where a merge of more partials costs more than a tile
    // (decode graphs, H200: 16 one-tile splits 1.4-2.1% faster than 8 of two at contexts of 400, and
    // 64 one-tile splits 1.6-3.1% slower than 32 of two at 1024-1800).
    int64_t splits = resident / blocks;
    if (max_context > 0) splits = std::min({splits, context_tiles, std::max<int64_t>(16, context_tiles / 2)});
    return static_cast<int>(std::max<int64_t>(std::min(splits, most), 1));
  }
  // More blocks than one wave holds unsplit, or than half of one at long contexts. The blocks of the
  // last, partial wave take about as long as a full wave's (a block streams little faster with its
  // SM to itself: on an H200 the attention of 300 queries of 1024 tokens took 164 us against 88 us
  // for 264, two waves against one), so splitting the contexts pays where it makes the last wave
  // fuller: the count of splits s that takes the fewest tile times, ceil(blocks s / resident) waves
  // of ceil(tiles / s) tiles each, plus the merge (kPartialTiles, kMergeLaunchTiles). Past
  // kLongContext tokens (and in graphs whose contexts are not bounded) the tiles of 4096 tokens stand
  // for the context. A single wave left part empty costs
  // less than a full one (82 us for 200 queries of 1024 tokens), so it is split at long contexts
  // only: four ways, 192 queries of 4096 tokens took 258.6 us against about 309 unsplit, of 1024
  // tokens 86.5 against about 82.
  constexpr int64_t kLongContextTiles = 4096 / kTileTokens;
  const int64_t tiles = long_context ? std::max(kLongContextTiles, context_tiles) : context_tiles;
  auto cost = [&](int64_t splits) {
    const int64_t waves = (blocks * splits + resident - 1) / resident;
    const double attention = static_cast<double>(waves * ((tiles + splits - 1) / splits));
    return splits == 1 ? attention : attention + MergeTiles(blocks * splits, resident);
  };
  int64_t best = 1;
  for (int64_t splits = 2; splits <= std::min(most, tiles); ++splits) {
    if (cost(splits) < cost(best)) best = splits;
  }
  return static_cast<int>(best);
}

MlaDecodeShape MlaDecodeShapeFor(int queries, int heads, int splits, int64_t resident_blocks, int64_t max_partials,
                                 bool uneven) {
  MlaDecodeShape shape;
  shape.queries = queries;
  shape.heads = heads;
  shape.resident_blocks = std::max<int64_t>(1, resident_blocks);
  shape.max_partials = max_partials;
  shape.splits = std::clamp(splits, 1, kMaxSplits);
  shape.uneven = uneven;
  if (!uneven) {
    // The even plan and nothing more: the launch a batch of equal contexts needs.
    shape.max_splits = shape.splits;
    shape.merge_rows = shape.splits > 1 ? queries : 0;
    shape.work_slots = queries * shape.splits;
    return shape;
  }
  // Room for one more wave of items, and a merge for every query where the even plan cuts them all,
  // else for as many as a wave holds items (each merge row is a block a head in every step with the
  // room; plans that cut more queries do not fit). The merge sums 64 partials a round, or 16 where
  // that many merge blocks would not fit two waves (the widest merge holds one block an SM). The
  // room costs every step that has it (a wider merge, or one where the even plan has none, its
  // blocks waiting out the attention): steps that need no uneven cut run without it.
  const int64_t wave = std::max<int64_t>(1, shape.resident_blocks / HeadGroups(heads));
  shape.merge_rows = static_cast<int>(shape.splits > 1 ? queries : std::min<int64_t>(queries, wave));
  shape.max_splits = int64_t{shape.merge_rows} * heads <= 2 * shape.resident_blocks ? kMaxSplits : 16;
  shape.work_slots = static_cast<int>(int64_t{queries} * shape.splits + wave);
  return shape;
}

MlaDecodePlanner::Tally MlaDecodePlanner::Count(int64_t chunk) const {
  Tally t;
  for (size_t q = 0; q < tiles_.size(); ++q) {
    const int64_t size = ItemTiles(static_cast<int>(q), chunk), n = (tiles_[q] + size - 1) / size;
    t.items += n;
    if (n > 1 || every_query_merged_) {
      t.partials += n;
      ++t.cut;
    }
  }
  return t;
}

bool MlaDecodePlanner::Choose(const MlaDecodeShape& shape, const int32_t* positions, bool every_query_merged) {
  const int queries = shape.queries;
  splits_ = std::max(shape.splits, 1);
  every_query_merged_ = every_query_merged;
  chunk_ = 0;
  budget_ = 0;
  chosen_ = {};  // an empty step's, which plans nothing
  tiles_.resize(queries);
  order_.resize(queries);
  int64_t total = 0, most = 1;
  bool longest_first = true;
  for (int q = 0; q < queries; ++q) {
    tiles_[q] = (int64_t{positions[q]} + kTileTokens) / kTileTokens;  // of positions[q] + 1 tokens
    total += tiles_[q];
    most = std::max(most, tiles_[q]);
    longest_first = longest_first && (q == 0 || tiles_[q] <= tiles_[q - 1]);
  }
  if (queries == 0) return false;
  // Every plan hands out its queries' items longest first (ties in query order, so equal contexts
  // keep it): each item starts on the first block to come free, and a long one left for last would
  // end last.
  std::iota(order_.begin(), order_.end(), 0);
  if (!longest_first) {
    std::sort(order_.begin(), order_.end(),
              [&](int a, int b) { return tiles_[a] != tiles_[b] ? tiles_[a] > tiles_[b] : a < b; });
  }
  const int64_t head_groups = HeadGroups(shape.heads);
  const int64_t item_slots = std::max<int64_t>(1, shape.resident_blocks / head_groups);  // items in one wave
  auto merge_cost = [&](const Tally& t) {
    return t.partials == 0 ? 0.0 : MergeTiles(t.partials * head_groups, shape.resident_blocks);
  };
  // Tile times until the last item ends, each item on the first block to come free (item_slots at
  // once), or any time from `limit` on once the plan reaches it. On equal items this is
  // MlaDecodeSplits' waves x tiles an item. The earliest end never moves back (an item takes it
  // and ends later), so a count of the blocks ending at each tile time serves as the queue.
  auto makespan = [&](int64_t chunk, double limit) {
    int64_t last = 0, now = 0;
    ends_.assign(1, item_slots);  // ends_[t]: blocks free from tile time t
    for (const int q : order_) {
      const int64_t size = ItemTiles(q, chunk);
      for (int64_t begin = 0; begin < tiles_[q]; begin += size) {
        while (ends_[now] == 0) ++now;
        --ends_[now];
        const int64_t end = now + std::min(size, tiles_[q] - begin);
        if (end >= static_cast<int64_t>(ends_.size())) ends_.resize(end + 1, 0);
        ++ends_[end];
        last = std::max(last, end);
      }
      if (static_cast<double>(last) >= limit) break;
    }
    return static_cast<double>(last);
  };

  // Uneven cuts worth weighing: items shorter than the even plan's longest (which sets its length)
  // and no shorter than its average (MlaDecodeSplits' choice for equal contexts, which weighs what
  // this measure does not: a wider merge): the longest query in k items, and sizes a quarter apart
  // from the shortest. Weighed shortest first against the even plan's tile times, each with the
  // merge it costs (MlaDecodeSplits' measure), where it fits the launch.
  int64_t even_longest = 1;
  for (int q = 0; q < queries; ++q) even_longest = std::max(even_longest, ItemTiles(q, 0));
  const int64_t shortest = (total + int64_t{queries} * splits_ - 1) / (int64_t{queries} * splits_);
  candidates_.clear();
  for (int64_t c = shortest; c < even_longest; c = std::max(c + 1, c * 5 / 4)) candidates_.push_back(c);
  for (int k = 2; k <= kMaxSplits; ++k) {
    const int64_t c = (most + k - 1) / k;
    if (c < shortest) break;
    if (c < even_longest) candidates_.push_back(c);
  }
  std::sort(candidates_.begin(), candidates_.end());
  const Tally even = Count(0);
  chosen_ = even;
  double best = -1.0;  // the even plan's, once an uneven one is weighed against it
  const auto weigh_even = [&] {
    if (best < 0.0) best = makespan(0, INFINITY) + merge_cost(even);
  };
  for (size_t i = 0; i < candidates_.size(); ++i) {
    const int64_t c = candidates_[i];
    if (i > 0 && c == candidates_[i - 1]) continue;
    // No plan ends before its longest item, nor before its tiles have passed through every block.
    const double bound = std::max<double>(c, static_cast<double>(total) / static_cast<double>(item_slots));
    if (best >= 0.0 && bound >= best) break;  // nor will any longer items
    const Tally t = Count(c);
    if (!Fits(shape, t)) continue;
    weigh_even();
    if (bound + merge_cost(t) >= best) continue;
    if (const double time = makespan(c, best - merge_cost(t)) + merge_cost(t); time < best) {
      best = time;
      chunk_ = c;
      chosen_ = t;
    }
  }
  // A packed plan: every block a wave's share of the tiles (at least kMinPackedTiles), taken across
  // query boundaries (each block the next pieces of the queries, longest first), so the step ends
  // about when that share has passed through every block, whatever the contexts; only launches with
  // room can take it. Below a wave too: where the even plan's items leave part of a wave idle (96
  // queries of 4096 tokens cut in two: 192 items of 64 tiles on 264 blocks), its blocks take 47 tiles.
  if (shape.uneven) {
    const int64_t budget = std::max(kMinPackedTiles, (total + item_slots - 1) / item_slots);
    double end = 0.0;
    const Tally t = Pack(budget, end);
    if (Fits(shape, t)) {
      weigh_even();
      if (const double time = end + merge_cost(t); time < best) {
        best = time;
        chunk_ = 0;
        budget_ = budget;
        chosen_ = t;
      }
    }
  }
  return chunk_ > 0 || budget_ > 0;
}

MlaDecodePlanner::Tally MlaDecodePlanner::Pack(int64_t budget, double& end) const {
  Tally t;
  int64_t used = 0;  // tiles of the current block
  double block_end = 0.0, last = 0.0;
  for (const int q : order_) {
    int64_t pieces = 0;
    for (int64_t begin = 0; begin < tiles_[q]; ++pieces) {
      const int64_t take = std::min(tiles_[q] - begin, budget - used);
      begin += take;
      used += take;
      block_end += static_cast<double>(take) + (block_end > 0.0 ? kPackedItemTiles : 0.0);
      if (used == budget) {
        last = std::max(last, block_end);
        used = 0;
        block_end = 0.0;
      }
    }
    t.items += pieces;
    if (pieces > 1 || every_query_merged_) {
      t.partials += pieces;
      ++t.cut;
    }
  }
  end = std::max(last, block_end);
  return t;
}

bool MlaDecodePlanner::Write(const MlaDecodeShape& shape, const int32_t* positions, const int32_t* table_offsets,
                             MlaWorkItem* work, MlaMergeRow* merges) const {
  const int queries = static_cast<int>(tiles_.size());
  if (shape.queries != queries || !Fits(shape, chosen_) || (budget_ > 0 && !shape.uneven)) return false;
  int slot = 0, row = 0, partial = 0;
  if (budget_ > 0) {
    int64_t used = 0;  // tiles of the current block, whose first item is work[leader]
    int leader = 0;
    for (const int q : order_) {
      const int pieces = static_cast<int>((used + tiles_[q] + budget_ - 1) / budget_);  // blocks it reaches
      const bool merged = pieces > 1 || every_query_merged_;
      if (merged) merges[row++] = {q, partial, pieces, 0};
      for (int64_t begin = 0; begin < tiles_[q];) {
        const int64_t take = std::min(tiles_[q] - begin, budget_ - used);
        MlaWorkItem item{q, static_cast<int32_t>(begin), static_cast<int32_t>(begin + take), merged ? partial++ : -1,
                         positions[q] + 1, table_offsets[q]};
        if (used == 0) {
          leader = slot;
        } else {
          item.taken = 1;
          ++work[leader].more;
        }
        work[slot++] = item;
        begin += take;
        used = (used + take) % budget_;
      }
    }
  } else {
    for (const int q : order_) {
      const int64_t size = ItemTiles(q, chunk_);
      const int n = static_cast<int>((tiles_[q] + size - 1) / size);
      const bool merged = n > 1 || every_query_merged_;
      if (merged) merges[row++] = {q, partial, n, 0};
      for (int j = 0; j < n; ++j) {
        const int64_t begin = j * size, end = std::min(tiles_[q], begin + size);
        work[slot++] = {q, static_cast<int32_t>(begin), static_cast<int32_t>(end), merged ? partial++ : -1,
                        positions[q] + 1, table_offsets[q]};
      }
    }
  }
  for (; slot < shape.work_slots; ++slot) work[slot] = MlaWorkItem{};
  for (; row < shape.merge_rows; ++row) merges[row] = MlaMergeRow{};
  return true;
}

cudaError_t MlaDecodeResidentBlocks(int kv_lora_rank, int rope_dim, int* blocks_per_sm) {
  if (kv_lora_rank == 512 && rope_dim == 64) return ResidentBlocks<512, 64>(blocks_per_sm);
  if (kv_lora_rank == 64 && rope_dim == 16) return ResidentBlocks<64, 16>(blocks_per_sm);
  if (kv_lora_rank == 32 && rope_dim == 8) return ResidentBlocks<32, 8>(blocks_per_sm);
  return cudaErrorInvalidValue;
}

}  // namespace cohort::kernels
