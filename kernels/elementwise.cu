#include "kernels/elementwise.h"

#include "kernels/bf16.cuh"
#include "kernels/head_gemm.cuh"
#include "kernels/pdl.cuh"
#include "kernels/reduce.cuh"
#include "kernels/rms_norm.cuh"

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

// The arithmetic is kernels/rms_norm.cuh's, shared with the one-token MoE route that normalises its row.
template <typename Delta>
__global__ void AddRmsNormKernel(float* __restrict__ residual, const Delta* __restrict__ delta,
                                 const __nv_bfloat16* __restrict__ weight, int dim, float eps,
                                 __nv_bfloat16* __restrict__ out, float* __restrict__ inv_rms_out) {
  __shared__ float scratch[32];
  const NormSlice slice{static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x), dim};
  // The norm's weights before the wait: after the reduction they would be one more dependent load.
  float w[kNormValuesPerThread];
  LoadNormWeights(weight, slice, w);
  PdlWait();
  PdlLaunchDependents();
  const int64_t row = blockIdx.x;
  float* h = residual + row * dim;
  float v[kNormValuesPerThread];
  LoadResidual(h, slice, v);
  const float sum_sq = AddDelta(delta != nullptr ? delta + row * dim : nullptr, slice, v);
  const float inv_rms = InvRms(BlockSum(sum_sq, scratch), dim, eps);
  if (inv_rms_out != nullptr && threadIdx.x == 0) inv_rms_out[row] = inv_rms;
  StoreNormRow(slice, v, w, inv_rms, delta != nullptr ? h : nullptr, out + row * dim);
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

__device__ __forceinline__ float ToFloat(float v) { return v; }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 v) { return __bfloat162float(v); }

// Stores the pair (a, b) rotated by `p` into a head's rope part `to`.
__device__ __forceinline__ void StoreRotated(const RopePair& p, float a, float b, __nv_bfloat16* to) {
  to[p.a] = __float2bfloat16(a * p.cos - b * p.sin);
  to[p.b] = __float2bfloat16(b * p.cos + a * p.sin);
}

// Rotates pair `i` of one head's rope part: `from` and `to` point at the rope part (the last
// rope_dim values of qk_dim) of the head's source and destination, which may be the same.
template <class T>
__device__ __forceinline__ void RotatePair(const T* from, __nv_bfloat16* to, int i, int position,
                                           const RopeParams& rope) {
  const RopePair p = PairAt(rope, i, position);
  StoreRotated(p, ToFloat(from[p.a]), ToFloat(from[p.b]), to);
}

// Rotates pair `i` of the rope part of q[row, head] in place.
__device__ __forceinline__ void RotateQueryPair(__nv_bfloat16* q, int heads, int qk_dim, int row, int head, int i,
                                                int position, const RopeParams& rope) {
  __nv_bfloat16* x = q + (static_cast<int64_t>(row) * heads + head) * qk_dim + (qk_dim - rope.rope_dim);
  RotatePair(x, x, i, position, rope);
}

__global__ void RopeQueriesKernel(__nv_bfloat16* q, int heads, int qk_dim, const int32_t* positions, RopeParams rope) {
  PdlWait();
  PdlLaunchDependents();
  const int row = blockIdx.x, head = blockIdx.y, i = threadIdx.x;
  if (i < rope.rope_dim / 2) RotateQueryPair(q, heads, qk_dim, row, head, i, positions[row], rope);
}

// The queries of heads [first_head, first_head + heads) of one row, which the block handles alone:
// written from their fp32 source (rounded, rope part rotated) or rotated in place. Each thread loads
// all its values before it stores any (the source and q do not overlap).
__device__ __forceinline__ void WriteQueries(const QueryRopeParams& queries, int row, int first_head, int heads,
                                             int position, const RopeParams& rope) {
  constexpr int kPerThread = 4;
  const int qk_dim = queries.qk_dim, nope = qk_dim - rope.rope_dim, half = rope.rope_dim / 2;
  __nv_bfloat16* __restrict__ to = queries.q + (static_cast<int64_t>(row) * queries.heads + first_head) * qk_dim;
  if (queries.source == nullptr) {
    for (int i = threadIdx.x; i < heads * half; i += blockDim.x) {
      __nv_bfloat16* x = to + (i / half) * qk_dim + nope;
      RotatePair(x, x, i % half, position, rope);
    }
    return;
  }
  const float* __restrict__ from = queries.source + row * queries.source_row_stride + first_head * qk_dim;
  const int values = heads * qk_dim;
  for (int base = 0; base < values; base += kPerThread * blockDim.x) {
    float v[kPerThread];
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int i = base + threadIdx.x + j * blockDim.x;
      v[j] = i < values ? from[i] : 0.0f;
    }
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int i = base + threadIdx.x + j * blockDim.x;
      if (i < values && i % qk_dim < nope) to[i] = __float2bfloat16(v[j]);
    }
  }
  for (int i = threadIdx.x; i < heads * half; i += blockDim.x) {
    const int head = i / half;
    RotatePair(from + head * qk_dim + nope, to + head * qk_dim + nope, i % half, position, rope);
  }
}

// The absorbed queries of one row and head for kAbsorbOutputs latent values j: each warp
// takes 8 values of j, each of them nope / 8 lanes holding one 16-byte piece of its weight row
// (passes of 32 / (nope / 8) rows per warp). The weights are loaded before the wait.
constexpr int kAbsorbOutputs = 8 * kRowThreads / 32;
constexpr int kAbsorbMaxPasses = 4;  // nope 128: 16 lanes a row, 2 rows a pass, 8 rows a warp

__device__ __forceinline__ float Dot8(const uint4& w, const float (&q)[8]) {
  const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&w);
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(pairs[i]);
    sum += f.x * q[2 * i] + f.y * q[2 * i + 1];
  }
  return sum;
}

__device__ void AbsorbQueries(const QueryRopeParams& queries, const QueryAbsorbParams& absorb, int nope, int row,
                              int head, int part) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int lanes_per_row = nope / 8, rows_per_pass = 32 / lanes_per_row;
  const int piece = (lane % lanes_per_row) * 8;
  uint4 w[kAbsorbMaxPasses];
  int j[kAbsorbMaxPasses];
#pragma unroll
  for (int p = 0; p < kAbsorbMaxPasses; ++p) {
    const int in_warp = p * rows_per_pass + lane / lanes_per_row;
    j[p] = part * kAbsorbOutputs + warp * 8 + in_warp;
    const bool valid = in_warp < 8 && j[p] < absorb.rank;
    if (!valid) j[p] = -1;
    w[p] = valid ? __ldg(reinterpret_cast<const uint4*>(absorb.absorbed_keys +
                                                        (static_cast<int64_t>(head) * absorb.rank + j[p]) * nope +
                                                        piece))
                 : make_uint4(0u, 0u, 0u, 0u);
  }
  PdlWait();
  PdlLaunchDependents();
  float q[8];
  if (queries.source != nullptr) {
    const float* from = queries.source + row * queries.source_row_stride + head * queries.qk_dim + piece;
    const float4 lo = *reinterpret_cast<const float4*>(from);
    const float4 hi = *reinterpret_cast<const float4*>(from + 4);
    const float v[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
    for (int i = 0; i < 8; ++i) q[i] = __bfloat162float(__float2bfloat16(v[i]));  // as written to q
  } else {
    const __nv_bfloat16* from =
        queries.q + (static_cast<int64_t>(row) * queries.heads + head) * queries.qk_dim + piece;
    Bf16x8ToFloat(*reinterpret_cast<const uint4*>(from), q);
  }
  __nv_bfloat16* out = absorb.q_latent + (static_cast<int64_t>(row) * queries.heads + head) * absorb.rank;
#pragma unroll
  for (int p = 0; p < kAbsorbMaxPasses; ++p) {
    float sum = Dot8(w[p], q);
    for (int offset = lanes_per_row / 2; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (lane % lanes_per_row == 0 && j[p] >= 0) out[j[p]] = __float2bfloat16(sum);
  }
}

constexpr int kMaxLatentPerThread = 4;  // kv_lora_rank <= 4 * kRowThreads
constexpr int kQueryHeadsPerBlock = 4;

// The cache slot (block * block_size + offset) of token `row` at `position`, through its sequence's
// block table (step inputs, complete before the kernel starts).
__device__ __forceinline__ int64_t CacheSlot(const CacheWriteParams& where, int row, int position) {
  const int32_t* table = where.block_tables + where.table_offsets[where.sequence_of_token[row]];
  return static_cast<int64_t>(table[position / where.block_size]) * where.block_size + position % where.block_size;
}

// The absorbed queries past kMaxRowAbsorbRows rows: head GEMM tiles of 16 rows (two groups of four
// warps, each half of nope), all a cache-write block's threads.
constexpr int kAbsorbTileWarpsM = 1;
constexpr int kAbsorbTileSplitK = 2;
static_assert(head_gemm::kThreads * kAbsorbTileSplitK == kRowThreads);
constexpr int kMaxTiledAbsorbNope = 256;
static_assert(head_gemm::SmemBytes(kAbsorbTileWarpsM, kMaxTiledAbsorbNope) <= 48 * 1024,
              "the tile's shared memory within the default 48 KB, so the launch needs no opt-in");

// Block (row, 0) normalises and places the row's latent and rotates its rope key; blocks (row, 1 + j)
// write the queries of heads [4j, 4j + 4), so the row's work is spread over several SMs. With
// absorbed queries, blocks (row, 1 + query blocks + i) form those of head i / parts, latent values
// [kAbsorbOutputs * (i % parts), + kAbsorbOutputs) (the same blocks of rows past the absorb rows exit);
// or, past kMaxRowAbsorbRows rows, block (x, 1 + query blocks + i) takes head GEMM tile i * rows + x
// of `tiles` (`tiled`: the product as HeadGemmParams).
__global__ void WriteKvCacheKernel(const float* __restrict__ kv, int64_t kv_row_stride, int rank,
                                   const __nv_bfloat16* __restrict__ latent_norm, float eps, RopeParams rope,
                                   CacheWriteParams where, __nv_bfloat16* __restrict__ cache, QueryRopeParams queries,
                                   QueryAbsorbParams absorb, int query_blocks, HeadGemmParams tiled, int tiles) {
  __shared__ float scratch[32];
  if (static_cast<int>(blockIdx.y) > query_blocks) {
    const int i = static_cast<int>(blockIdx.y) - 1 - query_blocks;
    if (tiles > 0) {
      const int tile = i * static_cast<int>(gridDim.x) + static_cast<int>(blockIdx.x);
      if (tile >= tiles) return;
      const int n_blocks = head_gemm::ColumnBlocks(tiled.n_out);
      head_gemm::Tile<kAbsorbTileWarpsM, kAbsorbTileSplitK>(tiled, tile % n_blocks, tile / n_blocks % tiled.batch,
                                                            tile / n_blocks / tiled.batch);
      return;
    }
    if (static_cast<int>(blockIdx.x) >= absorb.rows) return;
    const int parts = (absorb.rank + kAbsorbOutputs - 1) / kAbsorbOutputs;
    AbsorbQueries(queries, absorb, queries.qk_dim - rope.rope_dim, blockIdx.x, i / parts, i % parts);
    return;
  }
  // The position, the chain of lookups to the row's cache slot and the norm weights are step inputs
  // and weights: read before the wait, so that after it only the projected row is.
  const int row = blockIdx.x;
  const int position = where.positions[row];
  if (blockIdx.y > 0) {
    PdlWait();
    PdlLaunchDependents();
    const int first_head = (blockIdx.y - 1) * kQueryHeadsPerBlock;
    WriteQueries(queries, row, first_head, min(kQueryHeadsPerBlock, queries.heads - first_head), position, rope);
    return;
  }
  const int width = rank + rope.rope_dim;
  const int64_t slot = CacheSlot(where, row, position);
  float norm[kMaxLatentPerThread];
#pragma unroll
  for (int j = 0; j < kMaxLatentPerThread; ++j) {
    const int i = threadIdx.x + j * blockDim.x;
    norm[j] = i < rank ? __bfloat162float(latent_norm[i]) : 0.0f;
  }
  PdlWait();
  PdlLaunchDependents();
  const float* src = kv + row * kv_row_stride;
  float v[kMaxLatentPerThread];
  float sum_sq = 0.0f;
#pragma unroll
  for (int j = 0; j < kMaxLatentPerThread; ++j) {
    const int i = threadIdx.x + j * blockDim.x;
    v[j] = i < rank ? src[i] : 0.0f;
    sum_sq += v[j] * v[j];
  }
  __nv_bfloat16* dst = cache + slot * width;
  const float inv_rms = rsqrtf(BlockSum(sum_sq, scratch) / rank + eps);
#pragma unroll
  for (int j = 0; j < kMaxLatentPerThread; ++j) {
    const int i = threadIdx.x + j * blockDim.x;
    if (i < rank) dst[i] = __float2bfloat16(v[j] * inv_rms * norm[j]);
  }
  if (threadIdx.x < rope.rope_dim / 2) RotatePair(src + rank, dst + rank, threadIdx.x, position, rope);
}

// Launches of more than kCacheWriteSpreadMaxRows rows (prefill), without absorbed queries: a warp
// for each piece of a row's work, the latent with its rope key (piece 0) or one head's queries (piece
// 1 + h), eight pieces a block. WriteKvCacheKernel's spread of a row over five blocks suits decode
// batches (from 32 to 512 rows it measured level with this kernel or up to 0.5% faster a step, H200,
// alternating runs); for thousands of rows its short blocks, each a chain of dependent loads, took 69
// us a layer at 4096 tokens for 21 us of bytes (docs/cuda_backend_rounds.md, nineteenth round).
constexpr int kPiecesPerBlock = kRowThreads / 32;
// The shapes it takes (DeepSeek's, and smaller); others go to WriteKvCacheKernel.
constexpr int kMaxLatentPerLane = 16;  // kv_lora_rank <= 512
constexpr int kMaxNopePerLane = 4;     // qk_nope_head_dim <= 128
// and qk_rope_head_dim <= 64: a rotated pair a lane

// One head's queries of one row, by one warp: lane l holds nope values l + 32 j and rope pair l, all
// loaded before any is stored, so that the warp waits for its loads once.
__device__ __forceinline__ void WriteHeadQueries(const QueryRopeParams& queries, int row, int head, int position,
                                                 const RopeParams& rope) {
  const int lane = threadIdx.x % 32;
  const int qk_dim = queries.qk_dim, nope = qk_dim - rope.rope_dim;
  const bool rotates = lane < rope.rope_dim / 2;
  __nv_bfloat16* __restrict__ to = queries.q + (static_cast<int64_t>(row) * queries.heads + head) * qk_dim;
  if (queries.source == nullptr) {
    if (rotates) RotatePair(to + nope, to + nope, lane, position, rope);
    return;
  }
  const float* __restrict__ from = queries.source + row * queries.source_row_stride + head * qk_dim;
  float v[kMaxNopePerLane];
#pragma unroll
  for (int j = 0; j < kMaxNopePerLane; ++j) {
    const int i = lane + 32 * j;
    v[j] = i < nope ? from[i] : 0.0f;
  }
  const RopePair pair = PairAt(rope, rotates ? lane : 0, position);
  const float a = rotates ? from[nope + pair.a] : 0.0f, b = rotates ? from[nope + pair.b] : 0.0f;
#pragma unroll
  for (int j = 0; j < kMaxNopePerLane; ++j) {
    const int i = lane + 32 * j;
    if (i < nope) to[i] = __float2bfloat16(v[j]);
  }
  if (rotates) StoreRotated(pair, a, b, to + nope);
}

__global__ void __launch_bounds__(kRowThreads)
    WriteKvCacheRowsKernel(const float* __restrict__ kv, int64_t kv_row_stride, int rank,
                           const __nv_bfloat16* __restrict__ latent_norm, float eps, RopeParams rope,
                           CacheWriteParams where, __nv_bfloat16* __restrict__ cache, QueryRopeParams queries,
                           int pieces_per_row, int rows) {
  const int64_t piece = static_cast<int64_t>(blockIdx.x) * kPiecesPerBlock + threadIdx.x / 32;
  const int row = static_cast<int>(piece / pieces_per_row), part = static_cast<int>(piece % pieces_per_row);
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  // As in WriteKvCacheKernel: positions and block tables are step inputs, read before the wait.
  const int position = where.positions[row];
  if (part > 0) {
    PdlWait();
    PdlLaunchDependents();
    WriteHeadQueries(queries, row, part - 1, position, rope);
    return;
  }
  const int64_t slot = CacheSlot(where, row, position);
  PdlWait();
  PdlLaunchDependents();
  const float* src = kv + row * kv_row_stride;
  float v[kMaxLatentPerLane];
  float sum_sq = 0.0f;
#pragma unroll
  for (int j = 0; j < kMaxLatentPerLane; ++j) {
    const int i = lane + 32 * j;
    v[j] = i < rank ? src[i] : 0.0f;
    sum_sq += v[j] * v[j];
  }
  const int width = rank + rope.rope_dim;
  __nv_bfloat16* dst = cache + slot * width;
  const float inv_rms = rsqrtf(WarpSum(sum_sq) / rank + eps);
#pragma unroll
  for (int j = 0; j < kMaxLatentPerLane; ++j) {
    const int i = lane + 32 * j;
    if (i < rank) dst[i] = __float2bfloat16(v[j] * inv_rms * __bfloat162float(latent_norm[i]));
  }
  if (lane < rope.rope_dim / 2) RotatePair(src + rank, dst + rank, lane, position, rope);
}

__global__ void GatherRowsKernel(const __nv_bfloat16* in, const int32_t* rows, int dim, __nv_bfloat16* out) {
  PdlWait();
  PdlLaunchDependents();
  const __nv_bfloat16* src = in + static_cast<int64_t>(rows[blockIdx.x]) * dim;
  __nv_bfloat16* dst = out + static_cast<int64_t>(blockIdx.x) * dim;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) dst[i] = src[i];
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

template <typename Delta>
cudaError_t LaunchAddRmsNormOf(float* residual, const Delta* delta, const __nv_bfloat16* weight, int rows, int dim,
                               float eps, __nv_bfloat16* out, cudaStream_t stream, float* inv_rms) {
  if (rows == 0) return cudaSuccess;
  if (dim <= 0 || dim > kNormMaxDim) return cudaErrorInvalidValue;
  return LaunchPdl(AddRmsNormKernel<Delta>, dim3(rows), dim3(RmsNormThreads(dim)), 0, stream, residual, delta, weight,
                   dim, eps, out, inv_rms);
}

cudaError_t LaunchAddRmsNorm(float* residual, const __nv_bfloat16* delta, const __nv_bfloat16* weight, int rows,
                             int dim, float eps, __nv_bfloat16* out, cudaStream_t stream, float* inv_rms) {
  return LaunchAddRmsNormOf(residual, delta, weight, rows, dim, eps, out, stream, inv_rms);
}

cudaError_t LaunchAddRmsNorm(float* residual, const float* delta, const __nv_bfloat16* weight, int rows, int dim,
                             float eps, __nv_bfloat16* out, cudaStream_t stream, float* inv_rms) {
  return LaunchAddRmsNormOf(residual, delta, weight, rows, dim, eps, out, stream, inv_rms);
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

bool CanAbsorbQueries(const QueryRopeParams& queries, int rope_dim, const QueryAbsorbParams& absorb) {
  const int nope = queries.qk_dim - rope_dim;
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  const bool pieces_aligned = queries.source != nullptr
                                  ? aligned(queries.source) && queries.source_row_stride % 4 == 0 &&
                                        queries.qk_dim % 4 == 0
                                  : aligned(queries.q) && queries.qk_dim % 8 == 0;
  const bool shape = absorb.rows <= kMaxRowAbsorbRows
                         ? nope >= 8 && nope <= 128 && (nope & (nope - 1)) == 0
                         : nope >= 16 && nope <= kMaxTiledAbsorbNope && nope % 16 == 0 && absorb.rank % 8 == 0 &&
                               aligned(absorb.q_latent);
  return queries.q != nullptr && absorb.absorbed_keys != nullptr && absorb.q_latent != nullptr &&
         absorb.rows >= 1 && absorb.rows <= kMaxAbsorbRows && absorb.rank >= 1 && shape &&
         aligned(absorb.absorbed_keys) && pieces_aligned;
}

cudaError_t LaunchWriteKvCache(const float* kv, int64_t kv_row_stride, int rows, int kv_lora_rank,
                               const __nv_bfloat16* latent_norm, float latent_eps, const RopeParams& rope,
                               const CacheWriteParams& where, __nv_bfloat16* layer_cache, cudaStream_t stream,
                               const QueryRopeParams& queries, const QueryAbsorbParams& absorb) {
  if (rows == 0) return cudaSuccess;
  if (rope.rope_dim % 2 != 0 || rope.rope_dim / 2 > kRowThreads || kv_row_stride < kv_lora_rank + rope.rope_dim ||
      kv_lora_rank > kMaxLatentPerThread * kRowThreads) {
    return cudaErrorInvalidValue;
  }
  if (queries.q != nullptr && (queries.heads <= 0 || queries.qk_dim < rope.rope_dim)) return cudaErrorInvalidValue;
  if (queries.source != nullptr &&
      (queries.q == nullptr || queries.source_row_stride < static_cast<int64_t>(queries.heads) * queries.qk_dim)) {
    return cudaErrorInvalidValue;
  }
  const int query_blocks = queries.q != nullptr ? (queries.heads + kQueryHeadsPerBlock - 1) / kQueryHeadsPerBlock : 0;
  int absorb_blocks = 0, tiles = 0;
  HeadGemmParams tiled;
  size_t smem = 0;
  if (absorb.absorbed_keys != nullptr) {
    if (absorb.rows > rows || !CanAbsorbQueries(queries, rope.rope_dim, absorb)) return cudaErrorInvalidValue;
    if (absorb.rows <= kMaxRowAbsorbRows) {
      absorb_blocks = queries.heads * ((absorb.rank + kAbsorbOutputs - 1) / kAbsorbOutputs);
    } else {
      // q_latent[r, h] = q_nope[r, h] . absorbed_keys[h]^T, batched over the heads.
      const int nope = queries.qk_dim - rope.rope_dim;
      if (queries.source != nullptr) {
        tiled.x_fp32 = queries.source;
        tiled.x_row_stride = queries.source_row_stride;
      } else {
        tiled.x = queries.q;  // its nope part, which the query blocks leave as it is
        tiled.x_row_stride = int64_t{queries.heads} * queries.qk_dim;
      }
      tiled.x_batch_stride = queries.qk_dim;
      tiled.w = absorb.absorbed_keys;
      tiled.w_row_stride = nope;
      tiled.w_batch_stride = int64_t{absorb.rank} * nope;
      tiled.y = absorb.q_latent;
      tiled.y_row_stride = int64_t{queries.heads} * absorb.rank;
      tiled.y_batch_stride = absorb.rank;
      tiled.rows = absorb.rows;
      tiled.n_out = absorb.rank;
      tiled.k = nope;
      tiled.batch = queries.heads;
      if (!HeadGemmSupports(tiled)) return cudaErrorInvalidValue;
      tiles = head_gemm::ColumnBlocks(absorb.rank) * queries.heads *
              head_gemm::RowTiles(absorb.rows, kAbsorbTileWarpsM);
      absorb_blocks = (tiles + rows - 1) / rows;
      smem = head_gemm::SmemBytes(kAbsorbTileWarpsM, nope);
    }
  }
  const bool row_pieces_fit = kv_lora_rank <= 32 * kMaxLatentPerLane && rope.rope_dim / 2 <= 32 &&
                              (queries.q == nullptr || queries.qk_dim - rope.rope_dim <= 32 * kMaxNopePerLane);
  if (absorb_blocks == 0 && rows > kCacheWriteSpreadMaxRows && row_pieces_fit) {
    const int pieces_per_row = 1 + (queries.q != nullptr ? queries.heads : 0);
    const int64_t blocks = (static_cast<int64_t>(rows) * pieces_per_row + kPiecesPerBlock - 1) / kPiecesPerBlock;
    return LaunchPdl(WriteKvCacheRowsKernel, dim3(static_cast<unsigned>(blocks)), dim3(kRowThreads), 0, stream, kv,
                     kv_row_stride, kv_lora_rank, latent_norm, latent_eps, rope, where, layer_cache, queries,
                     pieces_per_row, rows);
  }
  return LaunchPdl(WriteKvCacheKernel, dim3(rows, 1 + query_blocks + absorb_blocks), dim3(kRowThreads), smem, stream,
                   kv, kv_row_stride, kv_lora_rank, latent_norm, latent_eps, rope, where, layer_cache, queries, absorb,
                   query_blocks, tiled, tiles);
}

cudaError_t LaunchGatherRows(const __nv_bfloat16* in, const int32_t* rows, int num_rows, int dim,
                             __nv_bfloat16* out, cudaStream_t stream) {
  if (num_rows == 0) return cudaSuccess;
  return LaunchPdl(GatherRowsKernel, dim3(num_rows), dim3(kRowThreads), 0, stream, in, rows, dim, out);
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
