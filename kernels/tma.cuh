// Hopper's tensor memory accelerator (TMA), the shared-memory barriers (mbarrier) its copies complete
// on, and warpgroup register reallocation: what a warp-specialised kernel (a producer warp feeding
// tensor-core warpgroups through a ring of shared-memory stages) is built from. sm_90a.
//
// Host: EncodeBf16TensorMap describes a bf16 tensor in global memory (cuTensorMapEncodeTiled, bound
// through the runtime's driver entry point, so nothing links libcuda). Device: TmaLoad copies one box
// of it into shared memory, 128-byte swizzled as wgmma reads it (SwizzledDescriptor), and counts its
// bytes on an mbarrier.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace cohort::kernels {

// ------------------------------------------------------------------------------------------- host

// `map` <- the bf16 tensor at `base` of `rank` (1..5) dimensions, innermost first: dims[i] elements,
// dim i + 1 strides[i] bytes apart (multiples of 16), read in boxes of box[i] elements (each at most
// 256; box[0] at most 64, one 128-byte swizzled row). Elements outside the tensor, even a box wholly
// outside it, read as zeros and still count as bytes copied. cudaErrorInvalidValue when the driver
// rejects the description or lacks TMA.
inline cudaError_t EncodeBf16TensorMap(CUtensorMap* map, const void* base, int rank, const uint64_t* dims,
                                       const uint64_t* strides, const uint32_t* box) {
  using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
  static const EncodeTiled encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      return EncodeTiled{nullptr};
    }
    return reinterpret_cast<EncodeTiled>(fn);
  }();
  if (encode == nullptr || rank < 1 || rank > 5) return cudaErrorInvalidValue;
  const cuuint32_t element_strides[5] = {1, 1, 1, 1, 1};
  const CUresult result = encode(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, static_cast<cuuint32_t>(rank),
                                 const_cast<void*>(base), dims, strides, box, element_strides,
                                 CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                 CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return result == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

// ----------------------------------------------------------------------------------------- device

// mbarrier at shared-memory address `bar` (8-byte aligned): a phase completes when `count` arrivals
// have come and every byte announced to it (expect_tx) has landed; waiters name the phase by parity.
__device__ __forceinline__ void MbarrierInit(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Makes initialised barriers visible to the async proxy (the TMA unit) before anyone uses them.
__device__ __forceinline__ void FenceBarrierInit() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }

__device__ __forceinline__ void MbarrierArrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// `count` arrivals at once.
__device__ __forceinline__ void MbarrierArrive(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void MbarrierArriveExpectTx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// An arrival that happens once every cp.async this thread issued before it has landed; it counts
// toward the barrier's `count` (noinc), so a barrier fed this way is initialised with these arrivals.
__device__ __forceinline__ void CpAsyncArriveNoInc(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
// Returns once the phase of parity `parity` has completed (acquire: what was written before the
// arrivals and the copies it counted is visible).
__device__ __forceinline__ void MbarrierWait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\n"
      "waiting:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra waiting;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}

// Named barrier `id` (1..15; 0 is __syncthreads') for `threads` threads, a multiple of 32: the warps
// of one role meeting without the others.
__device__ __forceinline__ void NamedBarrierSync(uint32_t id, uint32_t threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

__device__ __forceinline__ void PrefetchTensorMap(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// One box of `map` at element coordinates (c0, c1[, c2]) -> shared memory at `dst` (1024-byte
// aligned for the swizzle); its bytes complete on `bar`. Keep c0 a whole number of 16-byte chunks
// (8 bf16 values): flash prefill boxes starting at other key columns failed their test. `map` must be a __grid_constant__ kernel
// parameter (or in global memory).
__device__ __forceinline__ void TmaLoad(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];\n" ::
          "r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1)
      : "memory");
}
__device__ __forceinline__ void TmaLoad(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1, int c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], "
      "[%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
}

// The registers of each thread of the calling warpgroup, lowered to (or raised to) kRegisters, a
// multiple of 8 in [24, 256]: a producer warpgroup gives up what the tensor-core warpgroups need for
// their accumulators. Every warp of the warpgroup must execute it.
template <int kRegisters>
__device__ __forceinline__ void ReleaseRegisters() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}
template <int kRegisters>
__device__ __forceinline__ void ClaimRegisters() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}

}  // namespace cohort::kernels
