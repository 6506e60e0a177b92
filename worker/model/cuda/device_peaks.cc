#include "worker/model/cuda/device_peaks.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <vector>

#include "common/status.h"
#include "kernels/cuda_check.h"

namespace cohort::cuda {

absl::StatusOr<double> MeasureCopyBandwidth(int device_id, int64_t bytes) {
  COHORT_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_id));
  void *src = nullptr, *dst = nullptr;
  COHORT_CUDA_RETURN_IF_ERROR(cudaMalloc(&src, bytes));
  if (cudaError_t e = cudaMalloc(&dst, bytes); e != cudaSuccess) {
    cudaFree(src);
    return CudaStatus(e, "cudaMalloc");
  }
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  cudaMemset(src, 0x3c, bytes);  // not zeros: some paths compress them
  std::vector<float> ms;
  for (int i = 0; i < 12; ++i) {
    cudaEventRecord(start);
    cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice);
    cudaEventRecord(stop);
    cudaEventSynchronize(stop);
    float t = 0;
    cudaEventElapsedTime(&t, start, stop);
    if (i >= 2) ms.push_back(t);  // the first copies warm up
  }
  const cudaError_t error = cudaGetLastError();
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cudaFree(src);
  cudaFree(dst);
  COHORT_CUDA_RETURN_IF_ERROR(error);
  std::nth_element(ms.begin(), ms.begin() + ms.size() / 2, ms.end());
  return 2.0 * static_cast<double>(bytes) / (ms[ms.size() / 2] * 1e-3);
}

}  // namespace cohort::cuda
