// Skinny GEMM (contract in skinny_gemm.h).
//
// The k order of a dot product is free, so both operands take the same permutation of k and every
// lane loads 16 contiguous bytes of each straight into mma registers. For a 32-wide chunk at k0, lane
// (g = lane / 4, t = lane % 4) loads w[row g][k0 + 8t .. +7] = p0..p7, the same of row g + 8, and
// x[row g of the n8 fragment][k0 + 8t .. +7] = x0..x7. mma #1 of the chunk takes
// a = {p0p1 (row g), p0p1 (row g+8), p2p3 (row g), p2p3 (row g+8)}, b = {x0x1, x2x3}; mma #2 the same
// with p4..p7 and x4..x7. Against mma.cuh's layout, lane (g, t) holds logical k {2t, 2t+1, 2t+8, 2t+9}
// of A's rows g, g+8 and of B's column g, mapped to physical k0 + 8t + {0, 1, 2, 3} (mma #1) and
// k0 + 8t + {4, 5, 6, 7} (mma #2) alike for both operands: every physical k meets its partner once.
//
// Block: 8 warps as kWarpRows x kWarpSplits. Each warp covers kMFrags m16 fragments of weight rows
// over one contiguous slice of K (whole 32-wide chunks; a lane whose 16 bytes lie past K loads zeros
// for both operands); warps of a row group split K, warps of one K slice take different rows and read
// the same activations, which they then mostly find in L1. The main loop keeps two register stages of
// kStage chunks, loading one while multiplying the other, so each lane has 2 * kStage * 2 * kMFrags
// 16-byte weight loads outstanding at the peak. The warps' fp32 accumulators meet in shared memory;
// with k_splits > 1 the blocks of a cluster each hold a partial tile and each sums a share of the
// tile over the cluster (distributed shared memory) and writes it.
//
// Blocks (or clusters) are persistent: at most two per SM, each taking every groups-th tile of
// kBlockRows weight rows, the tiles dealt out evenly; the last weight load of a tile fetches the next
// tile's first stage, so the stream does not stop for the reduction. On an H200 this streams the
// weights of the large products at about the device's copy bandwidth for up to 8 rows
// (tests/kernels/skinny_gemm_bench.cc); more rows cost more through the activation loads.
#include "kernels/skinny_gemm.h"

#include <cooperative_groups.h>

#include <algorithm>
#include <cstdint>

#include "kernels/launch_setup.h"
#include "kernels/mma.cuh"
#include "kernels/pdl.cuh"

namespace cohort::kernels {
namespace {

namespace cg = cooperative_groups;

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kBlocksPerSm = 2;                // __launch_bounds__: at most 128 registers a thread
constexpr int kChunk = 32;                     // k elements a row of lanes covers per step: 4 lanes x 8
constexpr uint32_t kPrefetchBytes = 32 << 10;  // per block, before PdlWait
constexpr int kMaxK = 1 << 30;                 // chunk offsets stay in int
// Tiles of up to this many n8 fragments of activation rows write a tail (kSkinnyMaxTailRows); wider
// ones have no registers to spare in their epilogue.
constexpr int kTailMaxFrags = kSkinnyMaxTailRows / 8;

// kNFrags n8 fragments of activation rows (8 * kNFrags >= rows); kMFrags m16 fragments of weight
// rows per warp; kWarpRows warps side by side on rows, the other kWarpSplits along K; kStage chunks
// per register stage.
template <int kNFragsT, int kMFragsT, int kWarpRowsT, int kStageT>
struct Tile {
  static constexpr int kNFrags = kNFragsT;
  static constexpr int kMFrags = kMFragsT;
  static constexpr int kWarpRows = kWarpRowsT;
  static constexpr int kWarpSplits = kWarps / kWarpRows;
  static constexpr int kStage = kStageT;
  static constexpr int kBlockRows = 16 * kMFrags * kWarpRows;  // weight rows (output columns) per tile
  static constexpr int kAcc = kMFrags * kNFrags * 4;           // accumulators per lane
  static constexpr int kRedFloats = kWarps * kAcc * 32;        // every warp's accumulators
  static constexpr int kPartial = kWarpRows * kAcc * 32;       // the block's sum over its K slices
  static constexpr int kTileStride = kBlockRows + 4;           // conflict-free transposed writes
  static constexpr int kTileFloats = 8 * kNFrags * kTileStride;
  static_assert(kWarps % kWarpRows == 0, "warps split evenly into row groups");
};

struct Args {
  const __nv_bfloat16* x;
  const __nv_bfloat16* w;
  void* y;
  float* y_tail;
  int64_t x_row_stride, x_batch_stride;
  int64_t w_row_stride, w_batch_stride;
  int64_t y_row_stride, y_batch_stride;
  int64_t y_tail_row_stride, y_tail_batch_stride;
  int rows, n_out, k;
  int tail_from;
  int chunks;      // ceil(k / kChunk)
  int row_tiles;   // ceil(n_out / kBlockRows)
  int num_tiles;   // row_tiles * batch; tile i is rows (i % row_tiles) of batch entry i / row_tiles
  int k_splits;    // blocks of a cluster along K (cluster dims (k_splits, 1, 1)); 1: no cluster
};

// 16 bytes of weights, streamed: read once, so not kept in L1. Zeros when !ok (no access).
__device__ __forceinline__ uint4 LoadWeights(const __nv_bfloat16* p, bool ok) {
  uint4 v = make_uint4(0u, 0u, 0u, 0u);
  asm volatile(
      "{\n .reg .pred q;\n setp.ne.b32 q, %4, 0;\n"
      " @q ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%5];\n}\n"
      : "+r"(v.x), "+r"(v.y), "+r"(v.z), "+r"(v.w)
      : "r"(static_cast<int>(ok)), "l"(p));
  return v;
}

// 16 bytes of activations: every block reads them, for every tile, so through L1. Plain (coherent)
// loads: x is the previous kernel's output. Zeros when !ok.
__device__ __forceinline__ uint4 LoadActivations(const __nv_bfloat16* p, bool ok) {
  uint4 v = make_uint4(0u, 0u, 0u, 0u);
  asm volatile(
      "{\n .reg .pred q;\n setp.ne.b32 q, %4, 0;\n"
      " @q ld.global.v4.u32 {%0, %1, %2, %3}, [%5];\n}\n"
      : "+r"(v.x), "+r"(v.y), "+r"(v.z), "+r"(v.w)
      : "r"(static_cast<int>(ok)), "l"(p));
  return v;
}

// One register stage of weights: [chunk][m16 fragment][rows g, g + 8].
template <class T>
struct Stage {
  uint4 w[T::kStage][T::kMFrags][2];
};

// A lane's weight rows in one tile; rows past n_out (or a tile past the last) read nothing.
template <class T>
struct WeightRows {
  const __nv_bfloat16* src[T::kMFrags][2];
  bool ok[T::kMFrags][2];
};

template <class T, bool kFp32Out>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) SkinnyGemmKernel(const Args a) {
  __shared__ __align__(16) float red[T::kRedFloats];
  __shared__ __align__(16) float tile[T::kTileFloats];

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int warp_row = warp % T::kWarpRows;
  const int warp_split = warp / T::kWarpRows;
  const int split = static_cast<int>(blockIdx.x) % a.k_splits;  // the cluster rank when k_splits > 1
  const int group = static_cast<int>(blockIdx.x) / a.k_splits;  // this block's (or cluster's) tiles:
  const int groups = static_cast<int>(gridDim.x) / a.k_splits;  // group, group + groups, ...

  // Chunks [c_begin, c_end) of this warp, the same in every tile; the block's slices are consecutive.
  const int slices = a.k_splits * T::kWarpSplits;
  const int slice = split * T::kWarpSplits + warp_split;
  const int c_begin = static_cast<int>(static_cast<int64_t>(slice) * a.chunks / slices);
  const int c_end = static_cast<int>(static_cast<int64_t>(slice + 1) * a.chunks / slices);

  // Weights are no kernel's output: start pulling the head of this block's first slice into L2 while
  // the previous kernel finishes. Whole 16-byte pieces (k and the chunk starts are multiples of 8).
  if (threadIdx.x < T::kBlockRows && group < a.num_tiles) {
    const int row = group % a.row_tiles * T::kBlockRows + static_cast<int>(threadIdx.x);
    const int block_begin = static_cast<int>(static_cast<int64_t>(split * T::kWarpSplits) * a.chunks / slices);
    const int block_end = static_cast<int>(static_cast<int64_t>((split + 1) * T::kWarpSplits) * a.chunks / slices);
    const int k_begin = block_begin * kChunk;
    const int k_end = min(a.k, block_end * kChunk);
    if (row < a.n_out && k_end > k_begin) {
      const uint32_t bytes = min(static_cast<uint32_t>(k_end - k_begin) * 2u, kPrefetchBytes / T::kBlockRows);
      PrefetchL2(a.w + group / a.row_tiles * a.w_batch_stride + row * a.w_row_stride + k_begin, bytes);
    }
  }
  auto weight_rows = [&](int tile_index) {
    WeightRows<T> rows;
    const bool valid = tile_index < a.num_tiles;
    const int row0 = tile_index % a.row_tiles * T::kBlockRows;
    const __nv_bfloat16* w = a.w + (valid ? tile_index / a.row_tiles : 0) * a.w_batch_stride + 8 * t;
#pragma unroll
    for (int r = 0; r < T::kMFrags; ++r) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = row0 + (warp_row * T::kMFrags + r) * 16 + h * 8 + g;
        rows.ok[r][h] = valid && row < a.n_out;
        rows.src[r][h] = w + (rows.ok[r][h] ? row : 0) * a.w_row_stride;
      }
    }
    return rows;
  };
  const int lane_k_end = a.k - 8 * t;  // this lane's piece of chunk c lies inside K iff c * 32 < lane_k_end

  // Activations are loaded only when their stage is multiplied, which keeps them out of the stages'
  // registers: they mostly come from L1 (the warps of a K slice share them, and every tile of a batch
  // entry reuses them) or L2. (Prefetching them into L1 with the stage's weights measured slower.)
  const __nv_bfloat16* x_src[T::kNFrags];
  bool x_ok[T::kNFrags];
  auto activation_rows = [&](int batch) {
#pragma unroll
    for (int f = 0; f < T::kNFrags; ++f) {
      const int m = f * 8 + g;
      x_ok[f] = m < a.rows;
      x_src[f] = a.x + batch * a.x_batch_stride + (x_ok[f] ? m : 0) * a.x_row_stride + 8 * t;
    }
  };
  auto load = [&](Stage<T>& s, const WeightRows<T>& rows, int c0) {
#pragma unroll
    for (int u = 0; u < T::kStage; ++u) {
      const int c = c0 + u;
      const bool ok = c < c_end && c * kChunk < lane_k_end;
#pragma unroll
      for (int r = 0; r < T::kMFrags; ++r) {
#pragma unroll
        for (int h = 0; h < 2; ++h) s.w[u][r][h] = LoadWeights(rows.src[r][h] + c * kChunk, ok && rows.ok[r][h]);
      }
    }
  };

  // The first register stage is weights too: in flight before the wait, so the first multiply
  // waits only for the activations. (Both stages before the wait, the loop turned to match, measured
  // slower in cohort bench step.)
  Stage<T> s0, s1;
  WeightRows<T> rows = weight_rows(group);
  load(s0, rows, c_begin);
  PdlWait();
  PdlLaunchDependents();

  float acc[T::kMFrags][T::kNFrags][4];
#pragma unroll
  for (int r = 0; r < T::kMFrags; ++r)
#pragma unroll
    for (int f = 0; f < T::kNFrags; ++f)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[r][f][e] = 0.0f;

  auto multiply = [&](const Stage<T>& s, int c0) {
    uint4 xs[T::kStage][T::kNFrags];
#pragma unroll
    for (int u = 0; u < T::kStage; ++u) {
      const int c = c0 + u;
      const bool ok = c < c_end && c * kChunk < lane_k_end;
#pragma unroll
      for (int f = 0; f < T::kNFrags; ++f) xs[u][f] = LoadActivations(x_src[f] + c * kChunk, ok && x_ok[f]);
    }
#pragma unroll
    for (int u = 0; u < T::kStage; ++u) {
#pragma unroll
      for (int r = 0; r < T::kMFrags; ++r) {
        const uint4& lo = s.w[u][r][0];
        const uint4& hi = s.w[u][r][1];
        const uint32_t a1[4] = {lo.x, hi.x, lo.y, hi.y};
        const uint32_t a2[4] = {lo.z, hi.z, lo.w, hi.w};
#pragma unroll
        for (int f = 0; f < T::kNFrags; ++f) {
          const uint32_t b1[2] = {xs[u][f].x, xs[u][f].y};
          const uint32_t b2[2] = {xs[u][f].z, xs[u][f].w};
          MmaBf16(acc[r][f], a1, b1);
          MmaBf16(acc[r][f], a2, b2);
        }
      }
    }
  };

  const bool clustered = a.k_splits > 1;
  cg::cluster_group cluster = cg::this_cluster();

  // Two register stages in turn: the loads of one are in flight while the other is multiplied. A
  // stage past c_end is all zeros (no loads) and multiplies to nothing. The last load of a tile
  // fetches the next tile's first stage, which stays in flight through the tile's reduction.
  for (int tile_index = group; tile_index < a.num_tiles; tile_index += groups) {
    const int next_tile = tile_index + groups;
    const WeightRows<T> next_rows = weight_rows(next_tile);
    const int batch = tile_index / a.row_tiles;
    const int row0 = tile_index % a.row_tiles * T::kBlockRows;
    activation_rows(batch);
    for (int c = c_begin; c < c_end; c += 2 * T::kStage) {
      load(s1, rows, c + T::kStage);
      multiply(s0, c);
      const bool last = c + 2 * T::kStage >= c_end;
      WeightRows<T> then;  // selected value by value: a selected reference would put both in memory
#pragma unroll
      for (int r = 0; r < T::kMFrags; ++r) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          then.src[r][h] = last ? next_rows.src[r][h] : rows.src[r][h];
          then.ok[r][h] = last ? next_rows.ok[r][h] : rows.ok[r][h];
        }
      }
      load(s0, then, last ? c_begin : c + 2 * T::kStage);
      multiply(s1, c + T::kStage);
    }
    rows = next_rows;

    // Sum the warps of each row group over their K slices: red[warp][acc][lane], lane fastest.
#pragma unroll
    for (int r = 0; r < T::kMFrags; ++r) {
#pragma unroll
      for (int f = 0; f < T::kNFrags; ++f) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          red[(warp * T::kAcc + (r * T::kNFrags + f) * 4 + e) * 32 + lane] = acc[r][f][e];
          acc[r][f][e] = 0.0f;
        }
      }
    }
    __syncthreads();
    // Into the tile [activation row][weight row]: accumulator e of fragment (r, f) in lane (g, t) is
    // D[g + 8 (e / 2)][2t + e % 2] of y^T.
    for (int j = static_cast<int>(threadIdx.x); j < T::kPartial; j += kThreads) {  // (warp_row, acc, lane)
      float sum = 0.0f;
#pragma unroll
      for (int s = 0; s < T::kWarpSplits; ++s) sum += red[s * T::kPartial + j];
      const int j_lane = j % 32;
      const int j_acc = (j / 32) % T::kAcc;
      const int j_warp_row = j / (32 * T::kAcc);
      const int e = j_acc % 4;
      const int f = (j_acc / 4) % T::kNFrags;
      const int r = j_acc / (4 * T::kNFrags);
      const int weight_row = (j_warp_row * T::kMFrags + r) * 16 + (e / 2) * 8 + j_lane / 4;
      const int act_row = f * 8 + (j_lane % 4) * 2 + e % 2;
      tile[act_row * T::kTileStride + weight_row] = sum;
    }
    // Write y: block `split` of a cluster sums its share of the tile over the cluster's blocks.
    if (clustered) {
      cluster.sync();
    } else {
      __syncthreads();
    }
    const int total = a.rows * T::kBlockRows;
    const int begin = split * total / a.k_splits;
    const int end = (split + 1) * total / a.k_splits;
    const int64_t y_base = batch * a.y_batch_stride + row0;
    for (int j = begin + static_cast<int>(threadIdx.x); j < end; j += kThreads) {
      const int act_row = j / T::kBlockRows;
      const int weight_row = j % T::kBlockRows;
      const int offset = act_row * T::kTileStride + weight_row;
      float v = tile[offset];
      if (clustered) {
        v = 0.0f;
        for (int b = 0; b < a.k_splits; ++b) v += cluster.map_shared_rank(tile, b)[offset];
      }
      const int column = row0 + weight_row;
      if (T::kNFrags <= kTailMaxFrags && column >= a.tail_from) {
        if (column < a.n_out) {
          a.y_tail[batch * a.y_tail_batch_stride + act_row * a.y_tail_row_stride + column - a.tail_from] = v;
        }
      } else if (column < a.n_out) {
        const int64_t at = y_base + act_row * a.y_row_stride + weight_row;
        if constexpr (kFp32Out) {
          static_cast<float*>(a.y)[at] = v;
        } else {
          static_cast<__nv_bfloat16*>(a.y)[at] = __float2bfloat16_rn(v);
        }
      }
    }
    // The next tile may overwrite red at once (its last reads precede the barrier above) and writes
    // `tile` only after its own first barrier, when this block is done reading it; peers of a cluster
    // may still be reading it, though.
    if (clustered) cluster.sync();
  }
}

template <class T, bool kFp32Out>
cudaError_t LaunchTile(const Args& a, dim3 grid, cudaStream_t stream) {
  const unsigned cluster = a.k_splits > 1 ? static_cast<unsigned>(a.k_splits) : 0;
  return LaunchPdlClusters(SkinnyGemmKernel<T, kFp32Out>, grid, dim3(kThreads), 0, cluster, stream, a);
}

// Tiles, k_splits and the grid for tile T; false when the shape is out of range.
template <class T>
bool PlanGrid(const SkinnyGemmParams& p, int sms, int blocks_per_sm, Args* a, dim3* grid) {
  const int64_t row_tiles = (static_cast<int64_t>(p.n_out) + T::kBlockRows - 1) / T::kBlockRows;
  const int64_t num_tiles = row_tiles * p.batch;
  if (num_tiles > INT32_MAX / 2) return false;  // tile indices plus the grid stay in int
  int k_splits = p.k_splits;
  if (k_splits == 0) {
    // Few tiles: split K over a cluster, so that more warps share the latency-bound stream, while
    // every warp keeps enough chunks to be worth its reduction: at most one block per SM for up to
    // 8 rows, two above (activations then take more of each warp's time); at least 12 chunks a warp,
    // or 2 where even the split leaves most SMs idle (routers). Measured on an H200.
    k_splits = 1;
    const int64_t limit = p.rows > 8 ? static_cast<int64_t>(2) * sms : sms;
    while (k_splits < kSkinnyMaxKSplits) {
      const int64_t blocks = num_tiles * 2 * k_splits;
      const int min_chunks = blocks * 2 <= sms ? 2 : 12;
      if (blocks > limit || a->chunks < min_chunks * T::kWarpSplits * 2 * k_splits) break;
      k_splits *= 2;
    }
  }
  // Persistent blocks: at most blocks_per_sm per SM, and the tiles dealt out evenly (every block, or
  // cluster, gets the same number of tiles give or take one).
  const int64_t max_groups = std::max<int64_t>(1, static_cast<int64_t>(sms) * blocks_per_sm / k_splits);
  const int64_t rounds = (num_tiles + max_groups - 1) / max_groups;
  const int64_t groups = (num_tiles + rounds - 1) / rounds;
  a->row_tiles = static_cast<int>(row_tiles);
  a->num_tiles = static_cast<int>(num_tiles);
  a->k_splits = k_splits;
  *grid = dim3(static_cast<unsigned>(groups * k_splits));
  return true;
}

template <class T>
cudaError_t Launch(const SkinnyGemmParams& p, Args a, int sms, cudaStream_t stream) {
  dim3 grid;
  if (!PlanGrid<T>(p, sms, kBlocksPerSm, &a, &grid)) return cudaErrorInvalidValue;
  return p.y_fp32 ? LaunchTile<T, true>(a, grid, stream) : LaunchTile<T, false>(a, grid, stream);
}

// The warps' layout for kNFrags n8 fragments of activations, from the shape (measured on an H200,
// tests/kernels/skinny_gemm_bench.cc): long K runs per warp stream best, so one row group (all 8 warps
// along K) unless K is short (then 4 or 8 row groups, whose warps share activations through L1) or the
// tiles would not divide evenly over the SMs. Stages of two chunks, but one for 17..32 activation
// rows with one or eight row groups (registers).
template <int kNFrags>
cudaError_t LaunchRows(const SkinnyGemmParams& p, const Args& a, int sms, cudaStream_t stream) {
  constexpr bool kWide = kNFrags >= 3;
  const int64_t tiles_of_16 = (static_cast<int64_t>(p.n_out) + 15) / 16 * p.batch;
  const int64_t tiles_of_128 = (static_cast<int64_t>(p.n_out) + 127) / 128 * p.batch;
  int warp_rows = 1;
  if (a.chunks < 8) {
    warp_rows = tiles_of_128 >= sms ? 8 : 4;
  } else if (a.chunks < 32) {
    warp_rows = 4;
  } else if (tiles_of_16 > 2 * static_cast<int64_t>(sms)) {
    warp_rows = kWide ? 2 : 1;  // several tiles per block
  } else if (tiles_of_16 > sms) {
    warp_rows = kWide ? 1 : 2;  // one round, but more 16-row tiles than SMs
  }
  switch (warp_rows) {
    case 1:
      return Launch<Tile<kNFrags, 1, 1, kWide ? 1 : 2>>(p, a, sms, stream);
    case 2:
      return Launch<Tile<kNFrags, 1, 2, 2>>(p, a, sms, stream);
    case 4:
      return Launch<Tile<kNFrags, 1, 4, 2>>(p, a, sms, stream);
    default:
      return Launch<Tile<kNFrags, 1, 8, kWide ? 1 : 2>>(p, a, sms, stream);
  }
}

bool Aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace

bool SkinnyGemmSupports(const SkinnyGemmParams& p) {
  const int64_t y_align = p.y_fp32 ? 4 : 8;  // elements in 16 bytes
  const bool tail = p.tail_from < p.n_out;
  if (tail && (p.tail_from < 1 || p.rows > kSkinnyMaxTailRows || p.y_tail == nullptr || !Aligned16(p.y_tail) ||
               p.y_tail_row_stride < 0 || p.y_tail_batch_stride < 0 || p.y_tail_row_stride % 4 != 0 ||
               p.y_tail_batch_stride % 4 != 0 || (p.rows > 1 && p.y_tail_row_stride < p.n_out - p.tail_from))) {
    return false;
  }
  const int y_columns = tail ? p.tail_from : p.n_out;
  return !(p.rows < 1 || p.rows > kSkinnyMaxRows || p.n_out < 1 || p.k < 8 || p.k % 8 != 0 || p.k > kMaxK || p.batch < 1 ||
      p.batch > 65535 || p.k_splits < 0 || p.k_splits > kSkinnyMaxKSplits || p.x == nullptr || p.w == nullptr ||
      p.y == nullptr || !Aligned16(p.x) || !Aligned16(p.w) || !Aligned16(p.y) || p.x_row_stride < 0 ||
      p.x_batch_stride < 0 || p.w_row_stride < 0 || p.w_batch_stride < 0 || p.y_row_stride < 0 ||
      p.y_batch_stride < 0 || p.x_row_stride % 8 != 0 || p.x_batch_stride % 8 != 0 || p.w_row_stride % 8 != 0 ||
      p.w_batch_stride % 8 != 0 || p.y_row_stride % y_align != 0 || p.y_batch_stride % y_align != 0 ||
      (p.rows > 1 && p.y_row_stride < y_columns));
}

cudaError_t LaunchSkinnyGemm(const SkinnyGemmParams& p, cudaStream_t stream) {
  if (!SkinnyGemmSupports(p)) return cudaErrorInvalidValue;
  Args a;
  a.x = p.x;
  a.w = p.w;
  a.y = p.y;
  a.x_row_stride = p.x_row_stride;
  a.x_batch_stride = p.x_batch_stride;
  a.w_row_stride = p.w_row_stride;
  a.w_batch_stride = p.w_batch_stride;
  a.y_row_stride = p.y_row_stride;
  a.y_batch_stride = p.y_batch_stride;
  a.y_tail = p.y_tail;
  a.y_tail_row_stride = p.y_tail_row_stride;
  a.y_tail_batch_stride = p.y_tail_batch_stride;
  a.tail_from = std::min(p.tail_from, p.n_out);
  a.rows = p.rows;
  a.n_out = p.n_out;
  a.k = p.k;
  a.chunks = (p.k + kChunk - 1) / kChunk;
  a.row_tiles = 0;
  a.num_tiles = 0;
  a.k_splits = 1;

  int sms = 0;
  if (const cudaError_t error = CurrentDeviceSms(&sms); error != cudaSuccess) return error;

  switch ((p.rows + 7) / 8) {
    case 1:
      return LaunchRows<1>(p, a, sms, stream);
    case 2:
      return LaunchRows<2>(p, a, sms, stream);
    case 3:
      return LaunchRows<3>(p, a, sms, stream);
    default:
      return LaunchRows<4>(p, a, sms, stream);
  }
}

}  // namespace cohort::kernels
