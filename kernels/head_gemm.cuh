// The head GEMM's tile (contract in head_gemm.h), for kernels that run it: LaunchHeadGemm's own, and
// the cache write's (kernels/elementwise.h), which forms the absorbed queries of up to
// kMaxAbsorbRows rows in the same launch.
//
// Block: a tile of TileRows = 16 kWarpsM rows and 64 output columns of one batch entry (head), on 4
// warps, or on 8 for K of 256 and more: two groups of 4 that take a half of K each and sum through
// shared memory at the end. In a group, warp (wm, wn) multiplies rows [16 wm, + 16) by 64 / kWarpsN
// columns with mma.sync m16n8k16, loading each k-step's fragments (ldmatrix) while the step before
// multiplies. Both operands sit in shared memory whole (rows of k elements padded by 16 bytes, so
// the eight rows an ldmatrix reads fall in eight different banks): at most 64 + 64 rows of 512
// elements, 130 KB. The weights are copied before the PDL wait, the rows after it, each in one round
// of copies, so a block waits for memory twice (once behind the kernel before it) however long K is.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "kernels/head_gemm.h"
#include "kernels/mma.cuh"
#include "kernels/pdl.cuh"

namespace cohort::kernels::head_gemm {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kColumns = 64;  // output columns a block
constexpr int kPad = 8;       // elements after each shared-memory row: 16 bytes
static_assert(kHeadGemmMaxK / 8 <= kThreads, "CopyRows: a row's pieces at once");

constexpr int TileRows(int warps_m) { return 16 * warps_m; }
// Blocks of kColumns output columns, and tiles of TileRows(warps_m) rows, that cover a product.
constexpr int ColumnBlocks(int n_out) { return (n_out + kColumns - 1) / kColumns; }
constexpr int RowTiles(int rows, int warps_m) { return (rows + TileRows(warps_m) - 1) / TileRows(warps_m); }

// The operands, or the split groups' fp32 sums of the whole tile where those take more (short K).
constexpr size_t SmemBytes(int warps_m, int k) {
  const size_t operands = static_cast<size_t>(kColumns + TileRows(warps_m)) * (k + kPad) * sizeof(__nv_bfloat16);
  const size_t sums = static_cast<size_t>(TileRows(warps_m)) * kColumns * sizeof(float);
  return operands > sums ? operands : sums;
}

// Rows [first, first + count) of a [rows, k] operand (row stride `stride`) into shared memory rows of
// `ld` elements; rows past `valid_rows` are zero-filled and read nothing. Thread t copies 16-byte
// piece t % pieces of every (threads / pieces)-th row: one division, not one a copy.
__device__ __forceinline__ void CopyRows(__nv_bfloat16* smem, int ld, const __nv_bfloat16* from, int64_t stride,
                                         int first, int count, int valid_rows, int k, int threads) {
  const int pieces = k / 8, rows_at_once = threads / pieces;  // k <= kHeadGemmMaxK: pieces <= threads
  const int c = threadIdx.x % pieces, r0 = threadIdx.x / pieces;
  if (r0 < rows_at_once) {
    for (int r = r0; r < count; r += rows_at_once) {
      const bool valid = first + r < valid_rows;
      CpAsync16(smem + r * ld + c * 8, valid ? from + (first + r) * stride + c * 8 : from, valid);
    }
  }
  CpAsyncCommit();
}

// The same from fp32 rows, each value rounded to bf16 (round to nearest even) as it is stored.
__device__ __forceinline__ void CopyRowsRounded(__nv_bfloat16* smem, int ld, const float* from, int64_t stride,
                                                int first, int count, int valid_rows, int k, int threads) {
  const int pieces = k / 8, rows_at_once = threads / pieces;
  const int c = threadIdx.x % pieces, r0 = threadIdx.x / pieces;
  if (r0 >= rows_at_once) return;
#pragma unroll 4
  for (int r = r0; r < count; r += rows_at_once) {
    uint4 packed = make_uint4(0u, 0u, 0u, 0u);
    if (first + r < valid_rows) {
      const float4* at = reinterpret_cast<const float4*>(from + (first + r) * stride + c * 8);
      const float4 lo = at[0], hi = at[1];
      packed.x = PackBf16(__float2bfloat16(lo.x), __float2bfloat16(lo.y));
      packed.y = PackBf16(__float2bfloat16(lo.z), __float2bfloat16(lo.w));
      packed.z = PackBf16(__float2bfloat16(hi.x), __float2bfloat16(hi.y));
      packed.w = PackBf16(__float2bfloat16(hi.z), __float2bfloat16(hi.w));
    }
    *reinterpret_cast<uint4*>(smem + r * ld + c * 8) = packed;
  }
}

// A warp's ldmatrix fragments of one k-step of 16: A's 16 rows, and B for its kNTiles n8 tiles.
template <int kNTiles>
struct Fragments {
  uint32_t a[4];
  uint32_t b[kNTiles][2];
};

// ldmatrix.x4 row addresses (mma.cuh): for A, matrix i = lane / 8 holds rows (i % 2) * 8 + lane % 8 at
// k + (i / 2) * 8, so r = {a0, a1, a2, a3}; for B (the weights, k-contiguous rows: the mma's col-major
// B), matrix i holds n rows (i / 2) * 8 + lane % 8 at k + (i % 2) * 8, so r = the b0, b1 of two n8
// tiles.
template <int kNTiles>
__device__ __forceinline__ void LoadFragments(const __nv_bfloat16* a_row, const __nv_bfloat16* b_row, int ld, int k0,
                                              Fragments<kNTiles>& f) {
  LdMatrixX4(f.a, a_row + k0);
#pragma unroll
  for (int j = 0; j < kNTiles; j += 2) {
    uint32_t b4[4];
    LdMatrixX4(b4, b_row + j * 8 * ld + k0);
    f.b[j][0] = b4[0];
    f.b[j][1] = b4[1];
    f.b[j + 1][0] = b4[2];
    f.b[j + 1][1] = b4[3];
  }
}

// One tile: columns [n_block * kColumns, + kColumns) and rows [m_block * TileRows, + TileRows) of
// batch entry `batch`, by a block of kThreads * kSplitK threads whose dynamic shared memory holds
// SmemBytes(kWarpsM, p.k). kWarpsM warps along M and 4 / kWarpsM along N, times kSplitK groups of
// them taking halves of K (summed through shared memory at the end). Waits for the kernel before it
// (PdlWait) after copying its weights.
template <int kWarpsM, int kSplitK>
__device__ __forceinline__ void Tile(const HeadGemmParams& p, int n_block, int64_t batch, int m_block) {
  constexpr int kWarpsN = kWarps / kWarpsM;
  constexpr int kWarpColumns = kColumns / kWarpsN;  // 16, 32 or 64
  constexpr int kNTiles = kWarpColumns / 8;         // n8 tiles a warp, taken two an ldmatrix
  static_assert(kNTiles % 2 == 0);
  extern __shared__ __align__(16) unsigned char smem[];
  const int ld = p.k + kPad;
  __nv_bfloat16* w_tile = reinterpret_cast<__nv_bfloat16*>(smem);  // [kColumns][ld]
  __nv_bfloat16* x_tile = w_tile + kColumns * ld;                   // [TileRows][ld]
  const int64_t b = batch;
  const int n0 = n_block * kColumns, m0 = m_block * TileRows(kWarpsM);

  // Weights before the wait; the rows after it.
  CopyRows(w_tile, ld, p.w + b * p.w_batch_stride, p.w_row_stride, n0, kColumns, p.n_out, p.k, kThreads * kSplitK);
  PdlWait();
  PdlLaunchDependents();
  if (p.x_fp32 != nullptr) {
    CopyRowsRounded(x_tile, ld, p.x_fp32 + b * p.x_batch_stride, p.x_row_stride, m0, TileRows(kWarpsM), p.rows,
                    p.k, kThreads * kSplitK);
  } else {
    CopyRows(x_tile, ld, p.x + b * p.x_batch_stride, p.x_row_stride, m0, TileRows(kWarpsM), p.rows, p.k,
             kThreads * kSplitK);
  }
  CpAsyncWait<0>();
  __syncthreads();

  const int warp = threadIdx.x / 32 % kWarps, split = threadIdx.x / kThreads, lane = threadIdx.x % 32;
  const int warp_m = warp % kWarpsM, warp_n = warp / kWarpsM;
  const bool has_rows = m0 + warp_m * 16 < p.rows;  // a tile's last warps may have none
  const __nv_bfloat16* a_row = x_tile + (warp_m * 16 + (lane / 8) % 2 * 8 + lane % 8) * ld + lane / 16 * 8;
  const __nv_bfloat16* b_row = w_tile + (warp_n * kWarpColumns + lane / 16 * 8 + lane % 8) * ld + (lane / 8) % 2 * 8;
  float acc[kNTiles][4] = {};
  // This split's k-steps, each step's fragments loaded while the one before it multiplies.
  const int steps = p.k / 16, k_begin = steps * split / kSplitK * 16, k_end = steps * (split + 1) / kSplitK * 16;
  if (has_rows && k_begin < k_end) {
    Fragments<kNTiles> now;
    LoadFragments(a_row, b_row, ld, k_begin, now);
    for (int k0 = k_begin; k0 < k_end; k0 += 16) {
      Fragments<kNTiles> next;
      if (k0 + 16 < k_end) LoadFragments(a_row, b_row, ld, k0 + 16, next);
#pragma unroll
      for (int j = 0; j < kNTiles; ++j) MmaBf16(acc[j], now.a, now.b[j]);
      now = next;
    }
  }
  if constexpr (kSplitK > 1) {
    // The second half's sums join the first's through shared memory (the operands are no longer read).
    static_assert(kSplitK == 2);
    float* partial = reinterpret_cast<float*>(smem) + warp * kNTiles * 4 * 32;
    __syncthreads();
    if (split == 1) {
#pragma unroll
      for (int j = 0; j < kNTiles; ++j) {
#pragma unroll
        for (int i = 0; i < 4; ++i) partial[(j * 4 + i) * 32 + lane] = acc[j][i];
      }
    }
    __syncthreads();
    if (split == 1) return;
#pragma unroll
    for (int j = 0; j < kNTiles; ++j) {
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[j][i] += partial[(j * 4 + i) * 32 + lane];
    }
  }
  if (!has_rows) return;

  // d[0..1] = row g, columns 2t, 2t + 1 of the n8 tile; d[2..3] the same of row g + 8. n_out is a
  // multiple of 8, so a tile is wholly in or out.
  const int g = lane / 4, t = lane % 4;
  __nv_bfloat16* y = p.y + b * p.y_batch_stride;
  const int m = m0 + warp_m * 16 + g;
#pragma unroll
  for (int j = 0; j < kNTiles; ++j) {
    const int n = n0 + warp_n * kWarpColumns + j * 8 + 2 * t;
    if (n >= p.n_out) break;
    if (m < p.rows) {
      *reinterpret_cast<__nv_bfloat162*>(y + m * p.y_row_stride + n) = __floats2bfloat162_rn(acc[j][0], acc[j][1]);
    }
    if (m + 8 < p.rows) {
      *reinterpret_cast<__nv_bfloat162*>(y + (m + 8) * p.y_row_stride + n) =
          __floats2bfloat162_rn(acc[j][2], acc[j][3]);
    }
  }
}

}  // namespace cohort::kernels::head_gemm
