#include "kernels/mla_decode.h"

#include "kernels/mma.cuh"
#include "kernels/reduce.cuh"

namespace cohort::kernels {
namespace {

constexpr int kHeadsPerBlock = 16;  // the mma M dimension
constexpr int kTileTokens = 32;     // tokens per shared-memory tile: each of 4 warps scores 8
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;

template <int kRank, int kRope>
struct Shape {
  static constexpr int kWidth = kRank + kRope;                  // cached values per token
  static constexpr int kWidthPadded = (kWidth + 15) / 16 * 16;  // mma k granularity
  static constexpr int kStride = kWidthPadded + 8;              // smem row stride: +16 bytes against bank conflicts
  static constexpr int kColsPerWarp = kRank / kWarps;           // output latent columns per warp
  static constexpr int kColTiles = kColsPerWarp / 8;
  static constexpr int kPStride = kTileTokens + 8;
  static_assert(kColsPerWarp % 8 == 0, "kv_lora_rank must be a multiple of 32");
  static_assert(kWidth % 8 == 0, "a cache row must be whole 16-byte chunks");

  struct Smem {
    __nv_bfloat16 q[kHeadsPerBlock][kStride];
    __nv_bfloat16 kv[2][kTileTokens][kStride];
    float scores[kHeadsPerBlock][kTileTokens];
    __nv_bfloat16 p[kHeadsPerBlock][kPStride];
    float row_max[kHeadsPerBlock];
    float row_sum[kHeadsPerBlock];
    float row_scale[kHeadsPerBlock];
  };
};

template <int kRank, int kRope>
__device__ __forceinline__ void LoadTile(typename Shape<kRank, kRope>::Smem& s, int buffer, int tile,
                                         const MlaDecodeParams& p, const int32_t* table, int kv_len) {
  using S = Shape<kRank, kRope>;
  constexpr int kChunks = S::kWidth / 8;  // 16-byte chunks per token
  for (int i = threadIdx.x; i < kTileTokens * kChunks; i += kThreads) {
    const int row = i / kChunks, chunk = i % kChunks;
    const int token = tile * kTileTokens + row;
    const bool valid = token < kv_len;
    const __nv_bfloat16* src = p.cache;
    if (valid) {
      const int64_t slot = static_cast<int64_t>(table[token / p.block_size]) * p.block_size + token % p.block_size;
      src = p.cache + slot * S::kWidth + chunk * 8;
    }
    CpAsync16(&s.kv[buffer][row][chunk * 8], src, valid);
  }
}

template <int kRank, int kRope>
__global__ void __launch_bounds__(kThreads) MlaDecodeKernel(MlaDecodeParams p) {
  using S = Shape<kRank, kRope>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  auto& s = *reinterpret_cast<typename S::Smem*>(smem_raw);

  const int query = blockIdx.z, head0 = blockIdx.y * kHeadsPerBlock, split = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int kv_len = p.query_position[query] + 1;
  const int32_t* table = p.block_tables + p.table_offsets[p.query_sequence[query]];
  const int tiles = (kv_len + kTileTokens - 1) / kTileTokens;
  const int tiles_per_split = (tiles + p.num_splits - 1) / p.num_splits;
  const int tile_begin = split * tiles_per_split;
  const int tile_end = min(tiles, tile_begin + tiles_per_split);

  // Queries (16 heads x (latent | rope)) and the first cache tile arrive in one async group: every
  // load is in flight at once. Heads past p.heads are zero rows.
  constexpr int kRankChunks = kRank / 8, kRowChunks = (kRank + kRope) / 8;
  for (int i = threadIdx.x; i < kHeadsPerBlock * kRowChunks; i += kThreads) {
    const int h = i / kRowChunks, c = i % kRowChunks, head = head0 + h;
    const bool valid = head < p.heads;
    const __nv_bfloat16* src = p.q_latent;
    if (valid && c < kRankChunks) {
      src = p.q_latent + (static_cast<int64_t>(query) * p.heads + head) * kRank + c * 8;
    } else if (valid) {
      src = p.q_rope + query * p.q_rope_row_stride + head * p.q_rope_head_stride + (c - kRankChunks) * 8;
    }
    CpAsync16(&s.q[h][c * 8], src, valid);
  }
  if (tile_begin < tile_end) LoadTile<kRank, kRope>(s, 0, tile_begin, p, table, kv_len);
  CpAsyncCommit();

  // Padding columns of the queries and cache tiles are never copied into: zero them once.
  if constexpr (S::kWidthPadded > S::kWidth) {
    constexpr int kPad = S::kWidthPadded - S::kWidth;
    for (int i = threadIdx.x; i < kHeadsPerBlock * kPad; i += kThreads) {
      s.q[i / kPad][S::kWidth + i % kPad] = __float2bfloat16(0.0f);
    }
    for (int i = threadIdx.x; i < 2 * kTileTokens * kPad; i += kThreads) {
      s.kv[i / (kTileTokens * kPad)][(i / kPad) % kTileTokens][S::kWidth + i % kPad] = __float2bfloat16(0.0f);
    }
  }
  if (threadIdx.x < kHeadsPerBlock) {
    s.row_max[threadIdx.x] = -INFINITY;
    s.row_sum[threadIdx.x] = 0.0f;
  }

  float acc[S::kColTiles][4] = {};
  for (int tile = tile_begin; tile < tile_end; ++tile) {
    const int buffer = (tile - tile_begin) % 2;
    if (tile + 1 < tile_end) {
      LoadTile<kRank, kRope>(s, buffer ^ 1, tile + 1, p, table, kv_len);
      CpAsyncCommit();
      CpAsyncWait<1>();
    } else {
      CpAsyncWait<0>();
    }
    __syncthreads();

    // Scores of this warp's 8 tokens for the 16 heads.
    float score[4] = {};
    const auto& kv = s.kv[buffer];
#pragma unroll 4
    for (int k = 0; k < S::kWidthPadded; k += 16) {
      const uint32_t a[4] = {LoadPair(&s.q[g][k + 2 * t]), LoadPair(&s.q[g + 8][k + 2 * t]),
                             LoadPair(&s.q[g][k + 2 * t + 8]), LoadPair(&s.q[g + 8][k + 2 * t + 8])};
      const uint32_t b[2] = {LoadPair(&kv[warp * 8 + g][k + 2 * t]), LoadPair(&kv[warp * 8 + g][k + 2 * t + 8])};
      MmaBf16(score, a, b);
    }
    const int col = warp * 8 + 2 * t;
    const int token = tile * kTileTokens + col;
    s.scores[g][col] = token < kv_len ? score[0] * p.softmax_scale : -INFINITY;
    s.scores[g][col + 1] = token + 1 < kv_len ? score[1] * p.softmax_scale : -INFINITY;
    s.scores[g + 8][col] = token < kv_len ? score[2] * p.softmax_scale : -INFINITY;
    s.scores[g + 8][col + 1] = token + 1 < kv_len ? score[3] * p.softmax_scale : -INFINITY;
    __syncthreads();

    // Online softmax: 8 consecutive lanes per head row, 4 scores each.
    {
      const int row = threadIdx.x / 8, part = threadIdx.x % 8;
      float v[4], tile_max = -INFINITY;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        v[i] = s.scores[row][part * 4 + i];
        tile_max = fmaxf(tile_max, v[i]);
      }
#pragma unroll
      for (int offset = 4; offset > 0; offset >>= 1) tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, offset));
      const float old_max = s.row_max[row];
      const float new_max = fmaxf(old_max, tile_max);  // finite: every tile holds a valid token
      float sum = 0.0f;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float e = __expf(v[i] - new_max);
        sum += e;
        s.p[row][part * 4 + i] = __float2bfloat16(e);
      }
#pragma unroll
      for (int offset = 4; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
      __syncwarp();
      if (part == 0) {
        const float rescale = __expf(old_max - new_max);  // 0 on the first tile (old_max = -inf)
        s.row_scale[row] = rescale;
        s.row_sum[row] = s.row_sum[row] * rescale + sum;
        s.row_max[row] = new_max;
      }
    }
    __syncthreads();

    // acc = acc * rescale + P . V over this warp's output columns.
    const float scale_lo = s.row_scale[g], scale_hi = s.row_scale[g + 8];
#pragma unroll
    for (int n = 0; n < S::kColTiles; ++n) {
      acc[n][0] *= scale_lo;
      acc[n][1] *= scale_lo;
      acc[n][2] *= scale_hi;
      acc[n][3] *= scale_hi;
    }
#pragma unroll
    for (int k = 0; k < kTileTokens; k += 16) {
      const uint32_t a[4] = {LoadPair(&s.p[g][k + 2 * t]), LoadPair(&s.p[g + 8][k + 2 * t]),
                             LoadPair(&s.p[g][k + 2 * t + 8]), LoadPair(&s.p[g + 8][k + 2 * t + 8])};
#pragma unroll
      for (int n = 0; n < S::kColTiles; ++n) {
        const int c = warp * S::kColsPerWarp + n * 8 + g;
        const uint32_t b[2] = {PackBf16(kv[k + 2 * t][c], kv[k + 2 * t + 1][c]),
                               PackBf16(kv[k + 2 * t + 8][c], kv[k + 2 * t + 9][c])};
        MmaBf16(acc[n], a, b);
      }
    }
    __syncthreads();  // the next iteration's copy reuses this buffer
  }

  // Rows g and g + 8 of this lane: normalise and store.
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = g + 8 * half, head = head0 + row;
    if (head >= p.heads) continue;
    const float sum = s.row_sum[row];
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    if (p.num_splits == 1) {
      __nv_bfloat16* out = p.out + (static_cast<int64_t>(query) * p.heads + head) * kRank;
#pragma unroll
      for (int n = 0; n < S::kColTiles; ++n) {
        const int c = warp * S::kColsPerWarp + n * 8 + 2 * t;
        out[c] = __float2bfloat16(acc[n][2 * half] * inv);
        out[c + 1] = __float2bfloat16(acc[n][2 * half + 1] * inv);
      }
    } else {
      const int64_t partial = (static_cast<int64_t>(query) * p.num_splits + split) * p.heads + head;
      float* out = p.partial_out + partial * kRank;
#pragma unroll
      for (int n = 0; n < S::kColTiles; ++n) {
        const int c = warp * S::kColsPerWarp + n * 8 + 2 * t;
        out[c] = acc[n][2 * half] * inv;
        out[c + 1] = acc[n][2 * half + 1] * inv;
      }
      if (warp == 0 && t == 0) p.partial_lse[partial] = sum > 0.0f ? s.row_max[row] + __logf(sum) : -INFINITY;
    }
  }
}

// out[q, h, :] = sum over splits of exp(lse_s - lse) * partial_s, lse = log sum exp(lse_s). One
// warp turns the splits' log-sum-exps into weights; then every thread sums 4 columns.
constexpr int kMaxSplits = 64;

__global__ void __launch_bounds__(128) MlaCombineKernel(MlaDecodeParams p) {
  __shared__ float weight[kMaxSplits];
  const int query = blockIdx.x, head = blockIdx.y;
  const int64_t first = static_cast<int64_t>(query) * p.num_splits * p.heads + head;
  if (threadIdx.x < 32) {
    float lse[kMaxSplits / 32], max_lse = -INFINITY;
#pragma unroll
    for (int j = 0; j < kMaxSplits / 32; ++j) {
      const int s = threadIdx.x + 32 * j;
      lse[j] = s < p.num_splits ? p.partial_lse[first + s * p.heads] : -INFINITY;
      max_lse = fmaxf(max_lse, lse[j]);
    }
    max_lse = WarpMax(max_lse);
    float e[kMaxSplits / 32], total = 0.0f;
#pragma unroll
    for (int j = 0; j < kMaxSplits / 32; ++j) {
      e[j] = lse[j] == -INFINITY ? 0.0f : __expf(lse[j] - max_lse);
      total += e[j];
    }
    total = WarpSum(total);
#pragma unroll
    for (int j = 0; j < kMaxSplits / 32; ++j) weight[threadIdx.x + 32 * j] = e[j] / total;
  }
  __syncthreads();
  __nv_bfloat16* out = p.out + (static_cast<int64_t>(query) * p.heads + head) * p.kv_lora_rank;
  for (int c = threadIdx.x * 4; c < p.kv_lora_rank; c += blockDim.x * 4) {
    float4 sum = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (int s = 0; s < p.num_splits; ++s) {
      const float w = weight[s];
      const float4 v = *reinterpret_cast<const float4*>(p.partial_out + (first + s * p.heads) * p.kv_lora_rank + c);
      sum.x += w * v.x;
      sum.y += w * v.y;
      sum.z += w * v.z;
      sum.w += w * v.w;
    }
    out[c] = __float2bfloat16(sum.x);
    out[c + 1] = __float2bfloat16(sum.y);
    out[c + 2] = __float2bfloat16(sum.z);
    out[c + 3] = __float2bfloat16(sum.w);
  }
}

template <int kRank, int kRope>
cudaError_t Launch(const MlaDecodeParams& p, cudaStream_t stream) {
  const int smem = sizeof(typename Shape<kRank, kRope>::Smem);
  static const cudaError_t configured =
      cudaFuncSetAttribute(MlaDecodeKernel<kRank, kRope>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (configured != cudaSuccess) return configured;
  const dim3 grid(p.num_splits, (p.heads + kHeadsPerBlock - 1) / kHeadsPerBlock, p.num_queries);
  MlaDecodeKernel<kRank, kRope><<<grid, kThreads, smem, stream>>>(p);
  if (p.num_splits > 1) MlaCombineKernel<<<dim3(p.num_queries, p.heads), 128, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

int64_t MlaSplitWorkspaceFloats(int queries, int num_splits, int heads, int kv_lora_rank) {
  if (num_splits <= 1) return 0;
  const int64_t partials = static_cast<int64_t>(queries) * num_splits * heads;
  return partials * kv_lora_rank + partials;
}

cudaError_t LaunchMlaDecode(const MlaDecodeParams& p, cudaStream_t stream) {
  if (p.num_queries == 0) return cudaSuccess;
  if (p.num_splits < 1 || p.num_splits > kMaxSplits || p.num_queries > 65535 || p.block_size <= 0) {
    return cudaErrorInvalidValue;
  }
  if (p.num_splits > 1 && (p.partial_out == nullptr || p.partial_lse == nullptr)) return cudaErrorInvalidValue;
  // Queries are copied in 16-byte pieces.
  const auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  if (!aligned(p.q_latent) || !aligned(p.q_rope) || p.q_rope_row_stride % 8 != 0 || p.q_rope_head_stride % 8 != 0) {
    return cudaErrorInvalidValue;
  }
  if (p.kv_lora_rank == 512 && p.rope_dim == 64) return Launch<512, 64>(p, stream);
  if (p.kv_lora_rank == 64 && p.rope_dim == 16) return Launch<64, 16>(p, stream);
  if (p.kv_lora_rank == 32 && p.rope_dim == 8) return Launch<32, 8>(p, stream);
  return cudaErrorInvalidValue;
}

}  // namespace cohort::kernels
