// A kernel timeline for machines without Nsight Systems: a CUPTI injection library that records
// every kernel's start and end on the GPU (graph nodes included) and writes them out when the
// process exits. Where a decode step's fused kernels lose time against the launches they replace,
// the gaps between kernels and their overlap show it (docs/cuda_backend_rounds.md, twelfth round).
//
//   CUDA_INJECTION64_PATH=build/lib/libcohort_kernel_trace.so COHORT_KERNEL_TRACE=trace.csv
//     build/bin/cohort bench step --batch-sizes 1 ...
//   scripts/kernel_trace_step.py trace.csv
//
// On the GPU machine, after `scripts/gpu_tests.sh bundle`: CUDA_INJECTION64_PATH=$PWD/.gpu/lib/
// libcohort_kernel_trace.so, with CUPTI's folder of that machine's CUDA (libcupti.so) on
// LD_LIBRARY_PATH where the loader does not find it. Tracing slows a decode step by about a quarter;
// compare traces with traces.
//
// One CSV line a kernel: start_ns,end_ns,stream,grid,block,cluster,dynamic_smem,smem_executed,name
// (the shared-memory carveout the SM ran it with, in bytes, then the mangled name). Copies and
// memsets (graph nodes included) are lines of the same form, grid and block 0, named `[memcpy
// HtoD 4096 B]` or `[memset 4 B]`. With COHORT_KERNEL_TRACE_HOST=1, each CUDA runtime call of the
// host is one too, in the same clock, its thread id in the stream column and named `[host
// cudaGraphLaunch]`: where the GPU waits, whether for the host's launches or for its own work.
#include <cupti.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string_view>

namespace {

constexpr size_t kBufferBytes = 16 << 20;

std::FILE* out = nullptr;
std::mutex out_mutex;

const char* CopyKind(uint8_t kind) {
  switch (kind) {
    case CUPTI_ACTIVITY_MEMCPY_KIND_HTOD: return "HtoD";
    case CUPTI_ACTIVITY_MEMCPY_KIND_DTOH: return "DtoH";
    case CUPTI_ACTIVITY_MEMCPY_KIND_DTOD: return "DtoD";
    case CUPTI_ACTIVITY_MEMCPY_KIND_PTOP: return "PtoP";
    default: return "other";
  }
}

void CUPTIAPI BufferRequested(uint8_t** buffer, size_t* size, size_t* max_records) {
  *buffer = static_cast<uint8_t*>(std::aligned_alloc(8, kBufferBytes));
  *size = *buffer != nullptr ? kBufferBytes : 0;
  *max_records = 0;
}

void CUPTIAPI BufferCompleted(CUcontext, uint32_t, uint8_t* buffer, size_t, size_t valid) {
  std::lock_guard<std::mutex> lock(out_mutex);
  CUpti_Activity* record = nullptr;
  while (cuptiActivityGetNextRecord(buffer, valid, &record) == CUPTI_SUCCESS) {
    switch (record->kind) {
      case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL: {
        const auto* k = reinterpret_cast<const CUpti_ActivityKernel10*>(record);
        std::fprintf(out, "%llu,%llu,%u,%d,%d,%u,%d,%u,%s\n", static_cast<unsigned long long>(k->start),
                     static_cast<unsigned long long>(k->end), k->streamId, k->gridX * k->gridY * k->gridZ,
                     k->blockX * k->blockY * k->blockZ, k->clusterX * k->clusterY * k->clusterZ,
                     k->dynamicSharedMemory, k->sharedMemoryExecuted, k->name);
        break;
      }
      case CUPTI_ACTIVITY_KIND_MEMCPY: {
        const auto* m = reinterpret_cast<const CUpti_ActivityMemcpy6*>(record);
        std::fprintf(out, "%llu,%llu,%u,0,0,0,0,0,[memcpy %s %llu B]\n", static_cast<unsigned long long>(m->start),
                     static_cast<unsigned long long>(m->end), m->streamId, CopyKind(m->copyKind),
                     static_cast<unsigned long long>(m->bytes));
        break;
      }
      case CUPTI_ACTIVITY_KIND_MEMSET: {
        const auto* m = reinterpret_cast<const CUpti_ActivityMemset4*>(record);
        std::fprintf(out, "%llu,%llu,%u,0,0,0,0,0,[memset %llu B]\n", static_cast<unsigned long long>(m->start),
                     static_cast<unsigned long long>(m->end), m->streamId, static_cast<unsigned long long>(m->bytes));
        break;
      }
      case CUPTI_ACTIVITY_KIND_RUNTIME: {
        const auto* a = reinterpret_cast<const CUpti_ActivityAPI*>(record);
        const char* name = nullptr;
        if (cuptiGetCallbackName(CUPTI_CB_DOMAIN_RUNTIME_API, a->cbid, &name) != CUPTI_SUCCESS) name = "?";
        std::fprintf(out, "%llu,%llu,%u,0,0,0,0,0,[host %s]\n", static_cast<unsigned long long>(a->start),
                     static_cast<unsigned long long>(a->end), a->threadId, name);
        break;
      }
      default:
        break;
    }
  }
  std::free(buffer);
}

void Flush() {
  cuptiActivityFlushAll(1);
  std::lock_guard<std::mutex> lock(out_mutex);
  if (out != stderr) std::fclose(out);
}

}  // namespace

// Called by the CUDA driver when CUDA_INJECTION64_PATH names this library.
extern "C" int InitializeInjection() {
  const char* path = std::getenv("COHORT_KERNEL_TRACE");
  out = path != nullptr ? std::fopen(path, "w") : stderr;
  if (out == nullptr) {
    std::fprintf(stderr, "kernel_trace: cannot write %s\n", path);
    return 0;
  }
  if (cuptiActivityRegisterCallbacks(BufferRequested, BufferCompleted) != CUPTI_SUCCESS ||
      cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) != CUPTI_SUCCESS ||
      cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY) != CUPTI_SUCCESS ||
      cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMSET) != CUPTI_SUCCESS) {
    std::fprintf(stderr, "kernel_trace: CUPTI would not record kernels and copies\n");
    return 0;
  }
  const char* host = std::getenv("COHORT_KERNEL_TRACE_HOST");
  if (host != nullptr && std::string_view(host) == "1" &&
      cuptiActivityEnable(CUPTI_ACTIVITY_KIND_RUNTIME) != CUPTI_SUCCESS) {
    std::fprintf(stderr, "kernel_trace: CUPTI would not record the host's runtime calls\n");
    return 0;
  }
  std::atexit(Flush);
  return 1;
}
