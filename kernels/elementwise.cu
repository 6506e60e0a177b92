#include "kernels/elementwise.h"

#include "kernels/pdl.cuh"
#include "kernels/reduce.cuh"

namespace cohort::kernels {
namespace {

constexpr int kRowThreads = 256;

__global__ void EmbeddingKernel(const __nv_bfloat16* embedding, const int32_t* tokens, int hidden, float* out) {
  PdlWait();
  PdlLaunchDependents();
  const int64_t t = blockIdx.x;
  const __nv_bfloat16* src = embedding + static_cast<int64_t>(tokens[t]) * hidden;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) out[t * hidden + i] = __bfloat162float(src[i]);
}

// Each thread keeps its (at most kNormValuesPerThread) values in registers, so every load of the
// row is in flight before the first reduction and nothing is read twice.
constexpr int kNormValuesPerThread = 8;

__global__ void AddRmsNormKernel(float* __restrict__ residual, const __nv_bfloat16* __restrict__ delta,
                                 const __nv_bfloat16* __restrict__ weight, int dim, float eps,
                                 __nv_bfloat16* __restrict__ out) {
  __shared__ float scratch[32];
  PdlWait();
  PdlLaunchDependents();
  const int64_t row = blockIdx.x;
  float* h = residual + row * dim;
  float v[kNormValuesPerThread];
  float sum_sq = 0.0f;
#pragma unroll
  for (int j = 0; j < kNormValuesPerThread; ++j) {
    const int i = threadIdx.x + j * blockDim.x;
    v[j] = 0.0f;
    if (i < dim) v[j] = h[i] + (delta != nullptr ? __bfloat162float(delta[row * dim + i]) : 0.0f);
    sum_sq += v[j] * v[j];
  }
  const float inv_rms = rsqrtf(BlockSum(sum_sq, scratch) / dim + eps);
#pragma unroll
  for (int j = 0; j < kNormValuesPerThread; ++j) {
    const int i = threadIdx.x + j * blockDim.x;
    if (i >= dim) continue;
    if (delta != nullptr) h[i] = v[j];
    out[row * dim + i] = __float2bfloat16(v[j] * inv_rms * __bfloat162float(weight[i]));
  }
}

__global__ void RmsNormKernel(const float* in, int ld_in, const __nv_bfloat16* weight, int dim, float eps,
                              __nv_bfloat16* out, int ld_out) {
  __shared__ float scratch[32];
  PdlWait();
  PdlLaunchDependents();
  const float* x = in + static_cast<int64_t>(blockIdx.x) * ld_in;
  float sum_sq = 0.0f;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) sum_sq += x[i] * x[i];
  const float inv_rms = rsqrtf(BlockSum(sum_sq, scratch) / dim + eps);
  __nv_bfloat16* y = out + static_cast<int64_t>(blockIdx.x) * ld_out;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) y[i] = __float2bfloat16(x[i] * inv_rms * __bfloat162float(weight[i]));
}

// The two indices rotated together for pair i, and cos/sin at `position` (angle formed in float32,
// as the CPU reference and DeepSeek's code do).
struct RopePair {
  int a, b;
  float cos, sin;
};

__device__ __forceinline__ RopePair PairAt(const RopeParams& rope, int i, int position) {
  const float angle = rope.inv_freq[i] * static_cast<float>(position);
  const int half = rope.rope_dim / 2;
  return {rope.interleave ? 2 * i : i, rope.interleave ? 2 * i + 1 : i + half, cosf(angle) * rope.attention_factor,
          sinf(angle) * rope.attention_factor};
}

// Rotates pair `i` of the rope part (the last rope_dim values of qk_dim) of q[row, head].
__device__ __forceinline__ void RotateQueryPair(__nv_bfloat16* q, int heads, int qk_dim, int row, int head, int i,
                                                int position, const RopeParams& rope) {
  __nv_bfloat16* x = q + (static_cast<int64_t>(row) * heads + head) * qk_dim + (qk_dim - rope.rope_dim);
  const RopePair p = PairAt(rope, i, position);
  const float a = __bfloat162float(x[p.a]), b = __bfloat162float(x[p.b]);
  x[p.a] = __float2bfloat16(a * p.cos - b * p.sin);
  x[p.b] = __float2bfloat16(b * p.cos + a * p.sin);
}

__global__ void RopeQueriesKernel(__nv_bfloat16* q, int heads, int qk_dim, const int32_t* positions, RopeParams rope) {
  PdlWait();
  PdlLaunchDependents();
  const int row = blockIdx.x, head = blockIdx.y, i = threadIdx.x;
  if (i < rope.rope_dim / 2) RotateQueryPair(q, heads, qk_dim, row, head, i, positions[row], rope);
}

__global__ void WriteKvCacheKernel(const float* kv, int rank, const __nv_bfloat16* latent_norm, float eps,
                                   RopeParams rope, CacheWriteParams where, __nv_bfloat16* cache,
                                   QueryRopeParams queries) {
  __shared__ float scratch[32];
  PdlWait();
  PdlLaunchDependents();
  const int row = blockIdx.x;
  const int width = rank + rope.rope_dim;
  const float* src = kv + static_cast<int64_t>(row) * width;
  const int position = where.positions[row];
  const int32_t* table = where.block_tables + where.table_offsets[where.sequence_of_token[row]];
  const int64_t slot = static_cast<int64_t>(table[position / where.block_size]) * where.block_size +
                       position % where.block_size;
  __nv_bfloat16* dst = cache + slot * width;

  float sum_sq = 0.0f;
  for (int i = threadIdx.x; i < rank; i += blockDim.x) sum_sq += src[i] * src[i];
  const float inv_rms = rsqrtf(BlockSum(sum_sq, scratch) / rank + eps);
  for (int i = threadIdx.x; i < rank; i += blockDim.x) {
    dst[i] = __float2bfloat16(src[i] * inv_rms * __bfloat162float(latent_norm[i]));
  }
  const int half = rope.rope_dim / 2;
  if (threadIdx.x < half) {
    const RopePair p = PairAt(rope, threadIdx.x, position);
    const float a = src[rank + p.a], b = src[rank + p.b];
    dst[rank + p.a] = __float2bfloat16(a * p.cos - b * p.sin);
    dst[rank + p.b] = __float2bfloat16(b * p.cos + a * p.sin);
  }
  if (queries.q != nullptr) {
    for (int i = threadIdx.x; i < queries.heads * half; i += blockDim.x) {
      RotateQueryPair(queries.q, queries.heads, queries.qk_dim, row, i / half, i % half, position, rope);
    }
  }
}

__global__ void GatherRowsKernel(const __nv_bfloat16* in, const int32_t* rows, int dim, __nv_bfloat16* out) {
  PdlWait();
  PdlLaunchDependents();
  const __nv_bfloat16* src = in + static_cast<int64_t>(rows[blockIdx.x]) * dim;
  __nv_bfloat16* dst = out + static_cast<int64_t>(blockIdx.x) * dim;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) dst[i] = src[i];
}

__global__ void CopyFirstRowToPaddingKernel(int32_t* ids, float* weights, int k, const int32_t* num_valid, int rows) {
  PdlWait();
  PdlLaunchDependents();
  const int first_padding = max(num_valid[0], 1);
  for (int i = first_padding * k + threadIdx.x; i < rows * k; i += blockDim.x) {
    ids[i] = ids[i % k];
    weights[i] = weights[i % k];
  }
}

// 32 x 32 tiles through shared memory (+1 column against bank conflicts); block (32, 8).
__global__ void TransposeKernel(const __nv_bfloat16* in, int rows, int cols, int64_t in_batch_stride,
                                __nv_bfloat16* out) {
  __shared__ __nv_bfloat16 tile[32][33];
  const __nv_bfloat16* src = in + blockIdx.z * in_batch_stride;
  __nv_bfloat16* dst = out + static_cast<int64_t>(blockIdx.z) * rows * cols;
  const int r0 = blockIdx.y * 32, c0 = blockIdx.x * 32;
  for (int i = threadIdx.y; i < 32; i += 8) {
    const int r = r0 + i, c = c0 + threadIdx.x;
    if (r < rows && c < cols) tile[i][threadIdx.x] = src[static_cast<int64_t>(r) * cols + c];
  }
  __syncthreads();
  for (int i = threadIdx.y; i < 32; i += 8) {
    const int c = c0 + i, r = r0 + threadIdx.x;
    if (r < rows && c < cols) dst[static_cast<int64_t>(c) * rows + r] = tile[threadIdx.x][i];
  }
}

__device__ __forceinline__ float HashUniform(uint64_t seed, int64_t index) {
  uint64_t z = seed + 0x9e3779b97f4a7c15ull * (static_cast<uint64_t>(index) + 1);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return static_cast<float>(z >> 40) * 0x1.0p-24f * 2.0f - 1.0f;  // [-1, 1)
}

__global__ void FillRandomKernel(__nv_bfloat16* out, int64_t count, uint64_t seed, float scale) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = __float2bfloat16(HashUniform(seed, i) * scale);
  }
}

__global__ void FillRandomFloatKernel(float* out, int64_t count, uint64_t seed, float scale) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = HashUniform(seed, i) * scale;
  }
}

__global__ void FillConstantKernel(__nv_bfloat16* out, int64_t count, float value) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = __float2bfloat16(value);
  }
}

int FillBlocks(int64_t count) { return static_cast<int>(std::min<int64_t>((count + 255) / 256, 65536)); }

}  // namespace

cudaError_t LaunchEmbedding(const __nv_bfloat16* embedding, const int32_t* tokens, int num_tokens, int hidden,
                            float* out, cudaStream_t stream) {
  if (num_tokens == 0) return cudaSuccess;
  return LaunchPdl(EmbeddingKernel, dim3(num_tokens), dim3(kRowThreads), 0, stream, embedding, tokens, hidden, out);
}

cudaError_t LaunchAddRmsNorm(float* residual, const __nv_bfloat16* delta, const __nv_bfloat16* weight, int rows,
                             int dim, float eps, __nv_bfloat16* out, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const int threads = std::max(32, (dim + kNormValuesPerThread * 32 - 1) / (kNormValuesPerThread * 32) * 32);
  if (threads > 1024) return cudaErrorInvalidValue;  // rows of up to 8192 values
  return LaunchPdl(AddRmsNormKernel, dim3(rows), dim3(threads), 0, stream, residual, delta, weight, dim, eps, out);
}

cudaError_t LaunchRmsNorm(const float* in, int ld_in, const __nv_bfloat16* weight, int rows, int dim, float eps,
                          __nv_bfloat16* out, int ld_out, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  return LaunchPdl(RmsNormKernel, dim3(rows), dim3(kRowThreads), 0, stream, in, ld_in, weight, dim, eps, out, ld_out);
}

cudaError_t LaunchRopeQueries(__nv_bfloat16* q, int rows, int heads, int qk_dim, const int32_t* positions,
                              const RopeParams& rope, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (rope.rope_dim % 2 != 0 || rope.rope_dim > 2 * 1024) return cudaErrorInvalidValue;
  const int threads = ((rope.rope_dim / 2 + 31) / 32) * 32;
  return LaunchPdl(RopeQueriesKernel, dim3(rows, heads), dim3(threads), 0, stream, q, heads, qk_dim, positions, rope);
}

cudaError_t LaunchWriteKvCache(const float* kv, int rows, int kv_lora_rank, const __nv_bfloat16* latent_norm,
                               float latent_eps, const RopeParams& rope, const CacheWriteParams& where,
                               __nv_bfloat16* layer_cache, cudaStream_t stream, const QueryRopeParams& queries) {
  if (rows == 0) return cudaSuccess;
  if (rope.rope_dim % 2 != 0 || rope.rope_dim / 2 > kRowThreads) return cudaErrorInvalidValue;
  if (queries.q != nullptr && (queries.heads <= 0 || queries.qk_dim < rope.rope_dim)) return cudaErrorInvalidValue;
  return LaunchPdl(WriteKvCacheKernel, dim3(rows), dim3(kRowThreads), 0, stream, kv, kv_lora_rank, latent_norm,
                   latent_eps, rope, where, layer_cache, queries);
}

cudaError_t LaunchGatherRows(const __nv_bfloat16* in, const int32_t* rows, int num_rows, int dim,
                             __nv_bfloat16* out, cudaStream_t stream) {
  if (num_rows == 0) return cudaSuccess;
  return LaunchPdl(GatherRowsKernel, dim3(num_rows), dim3(kRowThreads), 0, stream, in, rows, dim, out);
}

cudaError_t LaunchCopyFirstRowToPadding(int32_t* ids, float* weights, int k, const int32_t* num_valid, int rows,
                                        cudaStream_t stream) {
  if (rows <= 1) return cudaSuccess;
  return LaunchPdl(CopyFirstRowToPaddingKernel, dim3(1), dim3(256), 0, stream, ids, weights, k, num_valid, rows);
}

cudaError_t LaunchTranspose(const __nv_bfloat16* in, int rows, int cols, int64_t in_batch_stride, int batch,
                            __nv_bfloat16* out, cudaStream_t stream) {
  if (rows == 0 || cols == 0 || batch == 0) return cudaSuccess;
  if (rows < 0 || cols < 0 || batch < 0 || batch > 65535) return cudaErrorInvalidValue;
  TransposeKernel<<<dim3((cols + 31) / 32, (rows + 31) / 32, batch), dim3(32, 8), 0, stream>>>(in, rows, cols,
                                                                                              in_batch_stride, out);
  return cudaGetLastError();
}

cudaError_t LaunchFillRandom(__nv_bfloat16* out, int64_t count, uint64_t seed, float scale, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  FillRandomKernel<<<FillBlocks(count), 256, 0, stream>>>(out, count, seed, scale);
  return cudaGetLastError();
}

cudaError_t LaunchFillRandomFloat(float* out, int64_t count, uint64_t seed, float scale, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  FillRandomFloatKernel<<<FillBlocks(count), 256, 0, stream>>>(out, count, seed, scale);
  return cudaGetLastError();
}

cudaError_t LaunchFillConstant(__nv_bfloat16* out, int64_t count, float value, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  FillConstantKernel<<<FillBlocks(count), 256, 0, stream>>>(out, count, value);
  return cudaGetLastError();
}

}  // namespace cohort::kernels
