// Per-head products of MLA decode (contract in head_gemm.h; the tile in head_gemm.cuh).
//
// The launcher takes the tallest tile that still gives every SM a block (fewer rows take fewer warps
// along M and more along N), and splits K of 256 and more over two groups of warps. Each tile reads
// its head's weights and rows again: past about 48 rows cuBLAS's larger tiles are faster
// (tests/kernels/skinny_gemm_bench.cc).
#include "kernels/head_gemm.h"

#include <cstdint>

#include "kernels/head_gemm.cuh"
#include "kernels/launch_setup.h"
#include "kernels/pdl.cuh"

namespace cohort::kernels {
namespace {

using head_gemm::ColumnBlocks;
using head_gemm::kColumns;
using head_gemm::kThreads;
using head_gemm::RowTiles;
using head_gemm::SmemBytes;
using head_gemm::TileRows;

template <int kWarpsM, int kSplitK>
__global__ void __launch_bounds__(kThreads * kSplitK) HeadGemmKernel(const HeadGemmParams p) {
  head_gemm::Tile<kWarpsM, kSplitK>(p, blockIdx.x, blockIdx.y, blockIdx.z);
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
  const dim3 grid(ColumnBlocks(p.n_out), p.batch, RowTiles(p.rows, kWarpsM));
  return LaunchPdl(HeadGemmKernel<kWarpsM, kSplitK>, grid, dim3(kThreads * kSplitK), SmemBytes(kWarpsM, p.k), stream,
                   p);
}

template <int kSplitK>
cudaError_t LaunchSplit(const HeadGemmParams& p, int sms, cudaStream_t stream) {
  // The tallest tile that still gives every SM a block (or 16 rows).
  const int64_t column_blocks = int64_t{ColumnBlocks(p.n_out)} * p.batch;
  const auto blocks = [&](int warps_m) { return column_blocks * RowTiles(p.rows, warps_m); };
  if (p.rows > 32 && blocks(4) >= sms) return Launch<4, kSplitK>(p, stream);
  if (p.rows > 16 && blocks(2) >= sms) return Launch<2, kSplitK>(p, stream);
  return Launch<1, kSplitK>(p, stream);
}

}  // namespace

bool HeadGemmSupports(const HeadGemmParams& p) {
  const auto multiple = [](int64_t stride, int64_t of) { return stride >= 0 && stride % of == 0; };
  const int64_t x_align = p.x_fp32 != nullptr ? 4 : 8;  // elements in 16 bytes
  const void* x = p.x_fp32 != nullptr ? static_cast<const void*>(p.x_fp32) : p.x;
  return p.rows >= 1 && p.rows <= kHeadGemmMaxRows && p.n_out >= 8 && p.n_out % 8 == 0 && p.k >= 16 &&
         p.k <= kHeadGemmMaxK && p.k % 16 == 0 && p.batch >= 1 && p.batch <= 65535 &&
         (p.x == nullptr) != (p.x_fp32 == nullptr) && p.w != nullptr && p.y != nullptr && Aligned16(x) &&
         Aligned16(p.w) && Aligned16(p.y) && multiple(p.x_row_stride, x_align) &&
         multiple(p.x_batch_stride, x_align) && multiple(p.w_row_stride, 8) && multiple(p.w_batch_stride, 8) &&
         multiple(p.y_row_stride, 8) && multiple(p.y_batch_stride, 8) && (p.rows == 1 || p.y_row_stride >= p.n_out);
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
