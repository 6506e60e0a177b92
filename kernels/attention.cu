#include "kernels/attention.h"

#include "kernels/reduce.cuh"

namespace cohort::kernels {
namespace {

__global__ void GatherCacheKernel(const __nv_bfloat16* cache, const int32_t* table, int block_size, int width,
                                  __nv_bfloat16* out) {
  const int position = blockIdx.x;
  const int64_t slot = static_cast<int64_t>(table[position / block_size]) * block_size + position % block_size;
  // Rows are whole 16-byte chunks (width % 8 == 0, checked by the launcher).
  const uint4* src = reinterpret_cast<const uint4*>(cache + slot * width);
  uint4* dst = reinterpret_cast<uint4*>(out + static_cast<int64_t>(position) * width);
  for (int i = threadIdx.x; i < width / 8; i += blockDim.x) dst[i] = src[i];
}

__global__ void CausalSoftmaxKernel(const float* scores, int rows, int keys, int first_position, float scale,
                                    __nv_bfloat16* probs) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;  // head * rows + r
  const int visible = min(keys, first_position + static_cast<int>(row % rows) + 1);
  const float* s = scores + row * keys;
  __nv_bfloat16* p = probs + row * keys;
  float max = -INFINITY;
  for (int k = threadIdx.x; k < visible; k += blockDim.x) max = fmaxf(max, s[k] * scale);
  max = BlockMax(max, scratch);
  __syncthreads();
  float sum = 0.0f;
  for (int k = threadIdx.x; k < visible; k += blockDim.x) sum += __expf(s[k] * scale - max);
  const float inv = 1.0f / BlockSum(sum, scratch);
  for (int k = threadIdx.x; k < keys; k += blockDim.x) {
    p[k] = __float2bfloat16(k < visible ? __expf(s[k] * scale - max) * inv : 0.0f);
  }
}

}  // namespace

cudaError_t LaunchGatherCache(const __nv_bfloat16* layer_cache, const int32_t* block_table, int block_size,
                              int width, int length, __nv_bfloat16* out, cudaStream_t stream) {
  if (length == 0) return cudaSuccess;
  if (width % 8 != 0 || block_size <= 0) return cudaErrorInvalidValue;
  GatherCacheKernel<<<length, 128, 0, stream>>>(layer_cache, block_table, block_size, width, out);
  return cudaGetLastError();
}

cudaError_t LaunchCausalSoftmax(const float* scores, int heads, int rows, int keys, int first_position, float scale,
                                __nv_bfloat16* probs, cudaStream_t stream) {
  if (heads == 0 || rows == 0) return cudaSuccess;
  CausalSoftmaxKernel<<<heads * rows, 256, 0, stream>>>(scores, rows, keys, first_position, scale, probs);
  return cudaGetLastError();
}

}  // namespace cohort::kernels
