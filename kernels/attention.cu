#include "kernels/attention.h"

#include "kernels/launch_setup.h"
#include "kernels/mma.cuh"
#include "kernels/wgmma.cuh"

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

// Flash attention for a prefill chunk on wgmma: a block takes 128 queries of one head, 64 to each
// of its two warpgroups, and walks the key tiles of 64 its queries can see, the tiles after it
// copied in (cp.async, three stages) while this one's are used. Per tile, a warpgroup forms its 64 x 64
// scores with wgmma reading the queries and keys from shared memory, runs the online softmax on the
// accumulators, and adds P V with wgmma taking P from registers (the accumulators' layout is the A
// fragments') and the transposed values from shared memory. Every operand is stored as blocks of 64
// values a row with the 128-byte swizzle (wgmma.cuh); query and key values past nope + rope, and
// value dimensions past v_dim, are zeros.
template <int QK_BLOCKS>  // 64-value blocks of nope + rope: 1 (heads of up to 64) or 3 (up to 192)
struct FlashTiles {
  static constexpr int kRows = 128;      // queries a block, 64 a warpgroup
  static constexpr int kKeys = 64;       // keys a tile
  static constexpr int kValueDims = 128;  // v_dim padded
  static constexpr int kThreads = 256;
  static constexpr int kChunks = QK_BLOCKS * 8;  // 16-byte chunks of a query or key row
  static constexpr int kQBytes = QK_BLOCKS * kRows * 128;
  static constexpr int kKBytes = QK_BLOCKS * kKeys * 128;
  static constexpr int kVBytes = kValueDims * kKeys * 2;
  static constexpr int kStageBytes = kKBytes + kVBytes;
  static constexpr int kStages = 3;  // tile t's values and t + 1's keys in use while t + 2 is copied in
  static constexpr int kSmemBytes = kQBytes + kStages * kStageBytes;
};

// Keys [key0, key0 + 64) of `head` (nope then rope values) and their values (transposed) into one
// stage; zeros past the context and the head sizes.
template <class T>
__device__ __forceinline__ void LoadKeyTile(const FlashPrefillParams& p, int head, int key0, uint32_t keys,
                                            uint32_t values) {
  for (int i = threadIdx.x; i < T::kKeys * T::kChunks; i += T::kThreads) {
    const int row = i / T::kChunks, chunk = i % T::kChunks, d = chunk * 8, key = key0 + row;
    const __nv_bfloat16* src = p.k;  // any valid address where nothing is read
    int bytes = 0;
    if (key < p.keys && d < p.nope) {
      src = p.k + key * p.k_row_stride + head * p.k_head_stride + d;
      bytes = 16;
    } else if (key < p.keys && d < p.nope + p.rope) {
      src = p.k_rope + key * p.k_rope_row_stride + (d - p.nope);
      bytes = 16;
    }
    CpAsyncBytes(keys + (chunk / 8) * T::kKeys * 128 + SwizzledOffset<64>(row, chunk % 8), src, bytes);
  }
  for (int i = threadIdx.x; i < T::kValueDims * 8; i += T::kThreads) {
    const int dim = i / 8, chunk = i % 8, key = key0 + chunk * 8;
    const int bytes = dim < p.v_dim && key < p.keys ? 2 * min(8, p.keys - key) : 0;
    const __nv_bfloat16* src = bytes > 0 ? p.v_t + head * p.v_t_head_stride + dim * p.v_t_row_stride + key : p.v_t;
    CpAsyncBytes(values + SwizzledOffset<64>(dim, chunk), src, bytes);
  }
}

template <int QK_BLOCKS>
__global__ void __launch_bounds__(256) FlashPrefillKernel(FlashPrefillParams p) {
  using T = FlashTiles<QK_BLOCKS>;
  extern __shared__ __align__(1024) unsigned char flash_smem[];
  const uint32_t queries = SmemAddress(flash_smem);
  const uint32_t stages = queries + T::kQBytes;  // kStages of [keys | values]
  const auto stage_of = [&](int tile) { return stages + (tile % T::kStages) * T::kStageBytes; };
  // The last query tiles see the most keys: they start first, so the short ones fill the tail.
  const int q0 = (gridDim.x - 1 - blockIdx.x) * T::kRows, head = blockIdx.y;
  const int warpgroup = threadIdx.x / 128, warp = threadIdx.x / 32 % 4, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int last_query = min(p.queries, q0 + T::kRows) - 1;
  const int visible = min(p.keys, p.first_position + last_query + 1);
  const int tiles = (visible + T::kKeys - 1) / T::kKeys;
  const int group_position = p.first_position + q0 + warpgroup * 64;  // of the warpgroup's first row
  const int first_row_position = group_position + warp * 16;          // of the warp's first row
  const uint32_t group_queries = queries + warpgroup * 64 * 128;

  for (int i = threadIdx.x; i < T::kRows * T::kChunks; i += T::kThreads) {
    const int row = i / T::kChunks, chunk = i % T::kChunks, d = chunk * 8;
    const bool valid = q0 + row < p.queries && d < p.nope + p.rope;
    const __nv_bfloat16* src = valid ? p.q + (q0 + row) * p.q_row_stride + head * p.q_head_stride + d : p.q;
    CpAsyncBytes(queries + (chunk / 8) * T::kRows * 128 + SwizzledOffset<64>(row, chunk % 8), src, valid ? 16 : 0);
  }
  for (int tile = 0; tile < T::kStages - 1; ++tile) {  // one group a tile, empty past the last
    if (tile < tiles) LoadKeyTile<T>(p, head, tile * T::kKeys, stage_of(tile), stage_of(tile) + T::kKBytes);
    CpAsyncCommit();
  }

  float s[8][4];                 // a tile's scores, then its probabilities
  uint32_t probs[4][4];          // the probabilities as bf16 A fragments of P V's four k-steps
  float out[16][4] = {};
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};  // rows g and g + 8
  float rescale[2];              // of out, once the product in flight is done
  const float scale_log2 = p.softmax_scale * 1.4426950408889634f;

  // S = Q K^T for `tile`, 64 x 64 a warpgroup, issued and committed (not waited for).
  const auto issue_scores = [&](int tile) {
    const uint32_t keys = stage_of(tile);
#pragma unroll
    for (int kk = 0; kk < QK_BLOCKS * 4; ++kk) {
      const uint32_t offset = 32 * (kk % 4);  // the k-step within its block of 64 values
      WgmmaBf16<64>(s, SwizzledDescriptor(group_queries + (kk / 4) * T::kRows * 128 + offset),
                    SwizzledDescriptor(keys + (kk / 4) * T::kKeys * 128 + offset), kk > 0);
    }
    WgmmaCommit();
  };
  // The online softmax of `tile`'s scores (base 2; each row's values lie in the quad of lanes
  // 4g..4g+3): s becomes the probabilities, row_sum their sums, and rescale what out needs.
  const auto softmax = [&](int tile) {
    const int key0 = tile * T::kKeys;
    if (key0 + T::kKeys - 1 > first_row_position || key0 + T::kKeys > p.keys) {
#pragma unroll
      for (int n = 0; n < 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = key0 + n * 8 + 2 * t + (e & 1), position = first_row_position + g + (e / 2) * 8;
          if (key > position || key >= p.keys) s[n][e] = -INFINITY;
        }
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float tile_max = -INFINITY;
#pragma unroll
      for (int n = 0; n < 8; ++n) tile_max = fmaxf(tile_max, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
      const float new_max = fmaxf(row_max[r], tile_max * scale_log2);
      const float base = new_max == -INFINITY ? 0.0f : new_max;  // a row that has seen no key yet
      rescale[r] = exp2f(row_max[r] - base);
      row_max[r] = new_max;
      row_sum[r] *= rescale[r];
#pragma unroll
      for (int n = 0; n < 8; ++n) {
        s[n][2 * r] = exp2f(s[n][2 * r] * scale_log2 - base);
        s[n][2 * r + 1] = exp2f(s[n][2 * r + 1] * scale_log2 - base);
        row_sum[r] += s[n][2 * r] + s[n][2 * r + 1];
      }
    }
  };
  // out *= rescale, and the probabilities into A fragments: the accumulators of key fragments 2j
  // and 2j + 1 are the A fragment of k-step j.
  const auto take_probabilities = [&]() {
#pragma unroll
    for (int n = 0; n < 16; ++n) {
      out[n][0] *= rescale[0];
      out[n][1] *= rescale[0];
      out[n][2] *= rescale[1];
      out[n][3] *= rescale[1];
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      probs[j][0] = PackBf16(__float2bfloat16(s[2 * j][0]), __float2bfloat16(s[2 * j][1]));
      probs[j][1] = PackBf16(__float2bfloat16(s[2 * j][2]), __float2bfloat16(s[2 * j][3]));
      probs[j][2] = PackBf16(__float2bfloat16(s[2 * j + 1][0]), __float2bfloat16(s[2 * j + 1][1]));
      probs[j][3] = PackBf16(__float2bfloat16(s[2 * j + 1][2]), __float2bfloat16(s[2 * j + 1][3]));
    }
  };

  // O += P V for `tile`, issued and committed.
  const auto issue_values = [&](int tile) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      WgmmaBf16RegA128(out, probs[j], SwizzledDescriptor(stage_of(tile) + T::kKBytes + 32 * j), 1);
    }
    WgmmaCommit();
  };

  // Tile 0's scores and probabilities first; then each round issues the next tile's scores and this
  // tile's P V together, and runs the next tile's softmax while P V is still on the tensor cores.
  // Every warpgroup multiplies every tile (no branch around wgmma, which would serialise it): on the
  // diagonal's last tile a warpgroup whose queries all precede it gets probabilities of 0.
  CpAsyncWait<T::kStages - 2>();
  FenceProxyAsync();
  __syncthreads();
  WgmmaFence();
  issue_scores(0);
  WgmmaWait<0>();
  softmax(0);
  take_probabilities();
  for (int tile = 0; tile + 1 < tiles; ++tile) {
    // Every warpgroup is done with tile - 1's stage: it takes tile + kStages - 1.
    __syncthreads();
    const int refill = tile + T::kStages - 1;
    if (refill < tiles) LoadKeyTile<T>(p, head, refill * T::kKeys, stage_of(refill), stage_of(refill) + T::kKBytes);
    CpAsyncCommit();
    CpAsyncWait<T::kStages - 2>();  // tile + 1 landed
    FenceProxyAsync();
    __syncthreads();
    WgmmaFence();
    issue_scores(tile + 1);
    issue_values(tile);
    WgmmaWait<1>();  // the scores (committed first) are done; P V may still run
    softmax(tile + 1);
    WgmmaWait<0>();
    take_probabilities();
  }
  WgmmaFence();
  issue_values(tiles - 1);
  WgmmaWait<0>();

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float sum = row_sum[r];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    const int query = q0 + warpgroup * 64 + warp * 16 + g + r * 8;
    if (query >= p.queries) continue;
    __nv_bfloat16* row = p.out + query * p.out_row_stride + head * p.out_head_stride;
#pragma unroll
    for (int n = 0; n < 16; ++n) {
      const int d = n * 8 + 2 * t;
      if (d < p.v_dim) {
        *reinterpret_cast<__nv_bfloat162*>(row + d) =
            __floats2bfloat162_rn(out[n][2 * r] * inv, out[n][2 * r + 1] * inv);
      }
    }
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

bool FlashPrefillSupports(int nope, int rope, int v_dim) {
  return nope > 0 && rope >= 0 && v_dim > 0 && nope % 8 == 0 && rope % 8 == 0 && v_dim % 8 == 0 &&
         nope + rope <= 192 && v_dim <= 128;
}

namespace {

template <int QK_BLOCKS>
cudaError_t LaunchFlash(const FlashPrefillParams& p, cudaStream_t stream) {
  using T = FlashTiles<QK_BLOCKS>;
  auto kernel = FlashPrefillKernel<QK_BLOCKS>;
  static LaunchSetUp setup;
  LaunchInfo info;
  if (const cudaError_t e = setup.Get(kernel, T::kThreads, T::kSmemBytes, &info); e != cudaSuccess) return e;
  const dim3 grid((p.queries + T::kRows - 1) / T::kRows, p.heads);
  kernel<<<grid, T::kThreads, T::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

bool Chunked(const void* pointer, int64_t stride) {
  return reinterpret_cast<uintptr_t>(pointer) % 16 == 0 && stride % 8 == 0;
}

}  // namespace

cudaError_t LaunchFlashPrefill(const FlashPrefillParams& p, cudaStream_t stream) {
  if (p.queries == 0 || p.heads == 0) return cudaSuccess;
  if (!FlashPrefillSupports(p.nope, p.rope, p.v_dim) || p.queries < 0 || p.heads < 0 || p.keys <= 0 ||
      !Chunked(p.q, p.q_row_stride) || p.q_head_stride % 8 != 0 || !Chunked(p.k, p.k_row_stride) ||
      p.k_head_stride % 8 != 0 || !Chunked(p.k_rope, p.k_rope_row_stride) || !Chunked(p.v_t, p.v_t_row_stride) ||
      p.v_t_head_stride % 8 != 0 || p.out_row_stride % 2 != 0 || p.out_head_stride % 2 != 0 ||
      reinterpret_cast<uintptr_t>(p.out) % 4 != 0) {
    return cudaErrorInvalidValue;
  }
  return p.nope + p.rope <= 64 ? LaunchFlash<1>(p, stream) : LaunchFlash<3>(p, stream);
}

}  // namespace cohort::kernels
