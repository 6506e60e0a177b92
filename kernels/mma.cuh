// Inline-PTX wrappers for the tensor-core and async-copy instructions the kernels here use
// (sm_80+; on Hopper still the fastest path short of wgmma for these small tiles).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace cohort::kernels {

// The shared-memory address of a generic pointer into shared memory, as the PTX instructions below
// (and cp.async.bulk, mbarrier) take it.
__device__ __forceinline__ uint32_t SmemAddress(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// D = A (16x16 bf16, row) x B (16x8 bf16, col) + D, fp32 accumulators. Fragment layout for lane
// (g = lane / 4, t = lane % 4): a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..], a[2] = A[g][2t+8..],
// a[3] = A[g+8][2t+8..]; b[0] = B[2t..2t+1][g], b[1] = B[2t+8..2t+9][g]; d[0..1] = D[g][2t..2t+1],
// d[2..3] = D[g+8][2t..2t+1].
__device__ __forceinline__ void MmaBf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Two bf16 values as one register, `lo` in the low half (the lower index of a fragment pair).
__device__ __forceinline__ uint32_t PackBf16(__nv_bfloat16 lo, __nv_bfloat16 hi) {
  return static_cast<uint32_t>(__bfloat16_as_ushort(lo)) | (static_cast<uint32_t>(__bfloat16_as_ushort(hi)) << 16);
}

__device__ __forceinline__ uint32_t LoadPair(const __nv_bfloat16* p) { return *reinterpret_cast<const uint32_t*>(p); }

// ldmatrix: four (x4) or two (x2) 8x8 bf16 matrices from shared memory; lane l gives the address of
// row l % 8 of matrix l / 8 (16-byte aligned), and receives in r[i] the elements (row l / 4, columns
// 2 (l % 4) and 2 (l % 4) + 1) of matrix i, or with .trans the elements (rows 2 (l % 4) and
// 2 (l % 4) + 1, column l / 4): an mma B fragment of a matrix stored k-major.
__device__ __forceinline__ void LdMatrixX4(uint32_t (&r)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

__device__ __forceinline__ void LdMatrixX4(uint32_t (&r)[4], const void* smem_row) {
  LdMatrixX4(r, SmemAddress(smem_row));
}

__device__ __forceinline__ void LdMatrixX4Trans(uint32_t (&r)[4], const void* smem_row) {
  const uint32_t address = SmemAddress(smem_row);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

__device__ __forceinline__ void LdMatrixX2Trans(uint32_t (&r)[2], const void* smem_row) {
  const uint32_t address = SmemAddress(smem_row);
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(address));
}

// 16 bytes global -> shared, bypassing L1, into a shared-memory address (swizzled tiles compute it
// as one); src_bytes 0 writes zeros and reads nothing.
__device__ __forceinline__ void CpAsync16(uint32_t dst, const void* src, uint32_t src_bytes) {
  asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes)
               : "memory");
}

// The same to a shared-memory pointer; with `valid` false the destination is zero-filled instead.
__device__ __forceinline__ void CpAsync16(void* smem, const void* gmem, bool valid) {
  CpAsync16(SmemAddress(smem), gmem, valid ? 16u : 0u);
}

// An L2 policy under which the lines a load brings in are the first to be evicted.
__device__ __forceinline__ uint64_t EvictFirstPolicy() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}

// CpAsync16 with an L2 cache policy for the lines it brings in.
__device__ __forceinline__ void CpAsync16(uint32_t dst, const void* src, uint32_t src_bytes, uint64_t policy) {
  asm volatile("cp.async.cg.shared.global.L2::cache_hint.L2::256B [%0], [%1], 16, %2, %3;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes), "l"(policy)
               : "memory");
}

// The same into a shared-memory address (swizzled tiles compute it as one), of which the first
// src_bytes (0 to 16) are read and the rest zeroed: partial rows at the end of a context.
__device__ __forceinline__ void CpAsyncBytes(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}

// The copies issued since the last commit as one group; waiting until at most kPending groups are
// in flight. Both are compiler memory barriers, so no shared-memory access moves across them.
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int kPending>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

}  // namespace cohort::kernels
