// Programmatic dependent launch (sm_90): a kernel launched with LaunchPdl may start while the kernel
// before it in the stream is still running, so its launch, its set-up and its reads of data no kernel
// writes (weights) overlap the previous kernel's tail instead of following it. In a CUDA graph the
// captured edge keeps the same meaning.
//
// The contract, for every kernel launched with LaunchPdl:
//   - before PdlWait(): read only what no kernel of the step writes (weights, shapes, the step's
//     inputs copied up before its first kernel, KV cache rows of earlier steps), and write nothing
//     to global memory; prefetching weights into L2 or registers, and looking up positions and
//     block tables, is the point;
//   - PdlWait() returns once every earlier kernel of the stream has completed and its writes are
//     visible (it is a no-op for a kernel launched without the attribute);
//   - PdlLaunchDependents() lets the next kernel start; call it after PdlWait() (at most two kernels
//     then overlap) and before the kernel's main loop.
// So when a kernel starts, the kernel before it has passed its PdlWait(): every kernel two or more
// launches back has completed, and what those wrote may also be read before PdlWait() (a launcher
// that relies on this says so).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

namespace cohort::kernels {

__device__ __forceinline__ void PdlWait() { asm volatile("griddepcontrol.wait;\n" ::: "memory"); }

__device__ __forceinline__ void PdlLaunchDependents() { asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory"); }

// Asks L2 to fetch [address, address + bytes) from HBM; no registers or shared memory involved.
// `address` and `bytes` multiples of 16.
__device__ __forceinline__ void PrefetchL2(const void* address, uint32_t bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(address), "r"(bytes) : "memory");
}

// kernel<<<grid, block, smem, stream>>>(args...) with programmatic stream serialisation allowed, and
// with cluster > 0 its blocks in thread-block clusters of `cluster` along x (0: no cluster shape).
template <typename... Params, typename... Args>
cudaError_t LaunchPdlClusters(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, unsigned cluster,
                              cudaStream_t stream, Args&&... args) {
  cudaLaunchAttribute attributes[2]{};
  attributes[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attributes[0].val.programmaticStreamSerializationAllowed = 1;
  attributes[1].id = cudaLaunchAttributeClusterDimension;
  attributes[1].val.clusterDim.x = cluster;
  attributes[1].val.clusterDim.y = 1;
  attributes[1].val.clusterDim.z = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = attributes;
  config.numAttrs = cluster > 0 ? 2 : 1;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

template <typename... Params, typename... Args>
cudaError_t LaunchPdl(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                      Args&&... args) {
  return LaunchPdlClusters(kernel, grid, block, smem, /*cluster=*/0, stream, std::forward<Args>(args)...);
}

}  // namespace cohort::kernels
