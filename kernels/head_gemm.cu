// Per-head products of MLA decode (contract in head_gemm.h).
//
// Block: a tile of TileRows = 16 kWarpsM rows and 64 output columns of one batch entry (head), on 4
// warps, or on 8 for K of 256 and more: two groups of 4 that take a half of K each and sum through
// shared memory at the end. In a group, warp (wm, wn) multiplies rows [16 wm, + 16) by 64 / kWarpsN
// columns with mma.sync m16n8k16, loading each k-step's fragments (ldmatrix) while the step before
// multiplies. Fewer rows take fewer warps along M and more along N; the launcher takes the tallest
// tile that still gives every SM a block. Both operands sit in shared memory whole (rows of k
// elements padded by 16 bytes, so the eight rows an ldmatrix reads fall in eight different banks):
// at most 64 + 64 rows of 512 elements, 130 KB. The weights are copied before the PDL wait, the rows
// after it, each in one round of cp.async, so a block waits for memory twice (once behind the kernel
// before it) however long K is. Each tile reads its head's weights and rows again: past about 48
// rows cuBLAS's larger tiles are faster (tests/kernels/skinny_gemm_bench.cc).
#include "kernels/head_gemm.h"

#include <cstdint>

#include "kernels/launch_setup.h"
#include "kernels/mma.cuh"
#include "kernels/pdl.cuh"

namespace cohort::kernels {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kColumns = 64;  // output columns a block
constexpr int kPad = 8;       // elements after each shared-memory row: 16 bytes
static_assert(kHeadGemmMaxK / 8 <= kThreads, "CopyRows: a row's pieces at once");

constexpr int TileRows(int warps_m) { return 16 * warps_m; }

constexpr size_t SmemBytes(int warps_m, int k) {
  return static_cast<size_t>(kColumns + TileRows(warps_m)) * (k + kPad) * sizeof(__nv_bfloat16);
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

// kWarpsM warps along M and 4 / kWarpsM along N, times kSplitK groups of them taking halves of K
// (summed through shared memory at the end).
template <int kWarpsM, int kSplitK>
__global__ void __launch_bounds__(kThreads * kSplitK) HeadGemmKernel(const HeadGemmParams p) {
  constexpr int kWarpsN = kWarps / kWarpsM;
  constexpr int kWarpColumns = kColumns / kWarpsN;  // 16, 32 or 64
  constexpr int kNTiles = kWarpColumns / 8;         // n8 tiles a warp, taken two an ldmatrix
  static_assert(kNTiles % 2 == 0);
  extern __shared__ __align__(16) unsigned char smem[];
  const int ld = p.k + kPad;
  __nv_bfloat16* w_tile = reinterpret_cast<__nv_bfloat16*>(smem);  // [kColumns][ld]
  __nv_bfloat16* x_tile = w_tile + kColumns * ld;                   // [TileRows][ld]
  const int64_t b = blockIdx.y;
  const int n0 = blockIdx.x * kColumns, m0 = blockIdx.z * TileRows(kWarpsM);

  // Weights before the wait; the rows after it.
  CopyRows(w_tile, ld, p.w + b * p.w_batch_stride, p.w_row_stride, n0, kColumns, p.n_out, p.k, kThreads * kSplitK);
  PdlWait();
  PdlLaunchDependents();
  CopyRows(x_tile, ld, p.x + b * p.x_batch_stride, p.x_row_stride, m0, TileRows(kWarpsM), p.rows, p.k,
           kThreads * kSplitK);
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

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <int kWarpsM, int kSplitK>
cudaError_t Launch(const HeadGemmParams& p, cudaStream_t stream) {
  // The limit is raised once for the largest K; a launch asks for what its K needs.
  static LaunchSetUp set_up;
  LaunchInfo info;
  if (const cudaError_t e = set_up.Get(HeadGemmKernel<kWarpsM, kSplitK>, kThreads * kSplitK,
                                       SmemBytes(kWarpsM, kHeadGemmMaxK), &info);
      e != cudaSuccess) {
    return e;
  }
  const dim3 grid((p.n_out + kColumns - 1) / kColumns, p.batch, (p.rows + TileRows(kWarpsM) - 1) / TileRows(kWarpsM));
  return LaunchPdl(HeadGemmKernel<kWarpsM, kSplitK>, grid, dim3(kThreads * kSplitK), SmemBytes(kWarpsM, p.k), stream,
                   p);
}

template <int kSplitK>
cudaError_t LaunchSplit(const HeadGemmParams& p, int sms, cudaStream_t stream) {
  // The tallest tile that still gives every SM a block (or 16 rows).
  const int64_t column_blocks = int64_t{(p.n_out + kColumns - 1) / kColumns} * p.batch;
  const auto blocks = [&](int warps_m) {
    return column_blocks * ((p.rows + TileRows(warps_m) - 1) / TileRows(warps_m));
  };
  if (p.rows > 32 && blocks(4) >= sms) return Launch<4, kSplitK>(p, stream);
  if (p.rows > 16 && blocks(2) >= sms) return Launch<2, kSplitK>(p, stream);
  return Launch<1, kSplitK>(p, stream);
}

}  // namespace

bool HeadGemmSupports(const HeadGemmParams& p) {
  const auto multiple = [](int64_t stride) { return stride >= 0 && stride % 8 == 0; };
  return p.rows >= 1 && p.rows <= kHeadGemmMaxRows && p.n_out >= 8 && p.n_out % 8 == 0 && p.k >= 16 &&
         p.k <= kHeadGemmMaxK && p.k % 16 == 0 && p.batch >= 1 && p.batch <= 65535 &&
         p.x != nullptr && p.w != nullptr && p.y != nullptr && Aligned16(p.x) && Aligned16(p.w) && Aligned16(p.y) &&
         multiple(p.x_row_stride) && multiple(p.x_batch_stride) && multiple(p.w_row_stride) &&
         multiple(p.w_batch_stride) && multiple(p.y_row_stride) && multiple(p.y_batch_stride) &&
         (p.rows == 1 || p.y_row_stride >= p.n_out);
}

cudaError_t LaunchHeadGemm(const HeadGemmParams& p, cudaStream_t stream) {
  if (!HeadGemmSupports(p)) return cudaErrorInvalidValue;
  int sms = 0;
  if (const cudaError_t e = CurrentDeviceSms(&sms); e != cudaSuccess) return e;
  // Long K in two halves, on twice the warps. The halves' fp32 sums reuse the operands' shared
  // memory, which from this K on holds them at every tile height.
  constexpr int kSplitFromK = 256;
  static_assert(SmemBytes(4, kSplitFromK) >= size_t{TileRows(4)} * kColumns * sizeof(float) &&
                SmemBytes(1, kSplitFromK) >= size_t{TileRows(1)} * kColumns * sizeof(float));
  return p.k >= kSplitFromK ? LaunchSplit<2>(p, sms, stream) : LaunchSplit<1>(p, sms, stream);
}

}  // namespace cohort::kernels
