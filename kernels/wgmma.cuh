// Inline-PTX wrappers for Hopper's warpgroup matrix multiply (wgmma, sm_90a) on bf16 operands in
// shared memory laid out with the 128-byte swizzle, and the fences around it. Used by the grouped
// GEMM's 64- and 128-row tiles (moe_gemm.cu) and the flash prefill attention (attention.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace cohort::kernels {

// Makes the writes this thread's cp.async copies made to shared memory visible to wgmma's reads
// (the async proxy); then a barrier makes everyone's visible.
__device__ __forceinline__ void FenceProxyAsync() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void WgmmaFence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void WgmmaCommit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Waits until at most N of this warpgroup's committed wgmma groups are still running.
template <int N>
__device__ __forceinline__ void WgmmaWait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Descriptor of a K-major bf16 operand in shared memory whose rows are 128 bytes (64 values) with
// the 128-byte swizzle: 16-byte chunk c of row r at chunk c ^ (r % 8), groups of 8 rows 1024 bytes
// apart, the tile 1024-byte aligned. Exactly SwizzledOffset<64>'s layout. Advancing `address` by
// 32 bytes moves to the next 16 values of K.
__device__ __forceinline__ uint64_t SwizzledDescriptor(uint32_t address) {
  return static_cast<uint64_t>((address & 0x3ffff) >> 4) | uint64_t{1} << 16 | uint64_t{1024 >> 4} << 32 |
         uint64_t{1} << 62;
}

// The "+f" operands of accumulator rows [i, i + 4) of d, in the order wgmma numbers them.
#define COHORT_WGMMA_D4(i)                                                          \
  "+f"(d[(i)][0]), "+f"(d[(i)][1]), "+f"(d[(i)][2]), "+f"(d[(i)][3]),                 \
      "+f"(d[(i) + 1][0]), "+f"(d[(i) + 1][1]), "+f"(d[(i) + 1][2]), "+f"(d[(i) + 1][3]), \
      "+f"(d[(i) + 2][0]), "+f"(d[(i) + 2][1]), "+f"(d[(i) + 2][2]), "+f"(d[(i) + 2][3]), \
      "+f"(d[(i) + 3][0]), "+f"(d[(i) + 3][1]), "+f"(d[(i) + 3][2]), "+f"(d[(i) + 3][3])

// d[64 x N] += A[64 x 16] . B[N x 16]^T over one warpgroup; d laid out per warp as N / 8 mma.sync
// m16n8 accumulators (rows 16 w + lane / 4 and + 8, columns 8 n + 2 (lane % 4) and + 1).
// accumulate 0: d = A . B^T (d's old values ignored).
template <int N>
__device__ void WgmmaBf16(float (&d)[N / 8][4], uint64_t a, uint64_t b, int accumulate);
template <>
__device__ __forceinline__ void WgmmaBf16<256>(float (&d)[32][4], uint64_t a, uint64_t b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
      "%128, %129, p, 1, 1, 0, 0;\n}\n"
      : COHORT_WGMMA_D4(0), COHORT_WGMMA_D4(4), COHORT_WGMMA_D4(8), COHORT_WGMMA_D4(12), COHORT_WGMMA_D4(16),
        COHORT_WGMMA_D4(20), COHORT_WGMMA_D4(24), COHORT_WGMMA_D4(28)
      : "l"(a), "l"(b), "r"(accumulate));
}
template <>
__device__ __forceinline__ void WgmmaBf16<128>(float (&d)[16][4], uint64_t a, uint64_t b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "%64, %65, p, 1, 1, 0, 0;\n}\n"
      : COHORT_WGMMA_D4(0), COHORT_WGMMA_D4(4), COHORT_WGMMA_D4(8), COHORT_WGMMA_D4(12)
      : "l"(a), "l"(b), "r"(accumulate));
}
template <>
__device__ __forceinline__ void WgmmaBf16<64>(float (&d)[8][4], uint64_t a, uint64_t b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "%32, %33, p, 1, 1, 0, 0;\n}\n"
      : COHORT_WGMMA_D4(0), COHORT_WGMMA_D4(4)
      : "l"(a), "l"(b), "r"(accumulate));
}

// Byte offset of element (row, 8 * chunk) in a swizzled tile of BK columns.
template <int BK>
__device__ __forceinline__ uint32_t SwizzledOffset(int row, int chunk) {
  return static_cast<uint32_t>((row * BK + ((chunk ^ (row & 7)) << 3)) * 2);
}

// d[64 x 128] += A[64 x 16] . B[128 x 16]^T with A in registers: each warp's 16 rows as an mma.sync
// m16n8k16 A fragment (a[0] = row lane / 4, columns 2 (lane % 4) and + 1; a[1] the row + 8; a[2]
// and a[3] the columns + 8), so the accumulators of a product before (a softmax's probabilities)
// feed the next one without a trip through shared memory. d and accumulate as for WgmmaBf16.
__device__ __forceinline__ void WgmmaBf16RegA128(float (&d)[16][4], const uint32_t (&a)[4], uint64_t b,
                                                 int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "{%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"
      : COHORT_WGMMA_D4(0), COHORT_WGMMA_D4(4), COHORT_WGMMA_D4(8), COHORT_WGMMA_D4(12)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));
}

#undef COHORT_WGMMA_D4

}  // namespace cohort::kernels
