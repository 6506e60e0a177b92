#include "kernels/attention.h"

#include "kernels/launch_setup.h"
#include "kernels/mma.cuh"

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

// Flash attention for a prefill chunk: a block takes 128 queries of one head (16 a warp, in
// registers as mma A fragments), walks the key tiles of 64 its queries can see with the next tile's
// keys and values copied in (cp.async) while this one's are used, and keeps the scores in
// registers: S = Q K^T, the online softmax, then O += P V with P's accumulators reused as the A
// fragments. Head sizes are padded with zeros to QK (nope + rope) and V.
//
// attention_bench on an H200 (V2-Lite heads, causal TFLOP/s), 8 warps against 4 (64 queries a
// block, two blocks an SM): 4096 tokens 154 against 132, 16384 tokens 208 against 170, a 1024-token
// chunk after 3072 165 against 139. Warps of two m16 tiles (each key fragment read once for both,
// the queries then read from shared memory for want of registers), in another call: 238 at 16384
// tokens, but 151 at 4096 and 58 at 1024 (this kernel 84).
template <int QK, int V>
struct FlashTiles {
  static constexpr int kWarps = 8;
  static constexpr int kRows = 16 * kWarps;  // queries a block
  static constexpr int kKeys = 64;           // keys a tile
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kQkChunks = QK / 8, kVChunks = V / 8;  // 16-byte chunks a row
  static constexpr int kSmemBytes = (kRows * QK + 2 * kKeys * (QK + V)) * 2;
  static_assert(QK % 16 == 0 && V % 16 == 0, "whole k16 / 2 x n8 mma steps");
  static_assert((kQkChunks % 8 == 0 || 8 % kQkChunks == 0) && (kVChunks % 8 == 0 || 8 % kVChunks == 0),
                "the swizzle permutes chunks within groups of up to 8");
};

// Element offset of 16-byte chunk `chunk` of row `row` in a tile of kChunks chunks a row: chunk c
// of row r sits at c ^ (r % 8) within its group of 8, so the eight rows an ldmatrix reads at one
// chunk fall in different banks.
template <int kChunks>
__device__ __forceinline__ int SwizzledChunk(int row, int chunk) {
  constexpr int kMask = (kChunks < 8 ? kChunks : 8) - 1;
  return (row * kChunks + (chunk ^ (row & kMask))) * 8;
}

// Keys and values [key0, key0 + 64) of `head` into one stage, zero past the context and the head sizes.
template <class T>
__device__ __forceinline__ void LoadKeyTile(const FlashPrefillParams& p, int head, int key0, __nv_bfloat16* keys,
                                            __nv_bfloat16* values) {
  for (int i = threadIdx.x; i < T::kKeys * T::kQkChunks; i += T::kThreads) {
    const int row = i / T::kQkChunks, d = i % T::kQkChunks * 8, key = key0 + row;
    const __nv_bfloat16* src = p.kv;  // any valid address where the chunk is zero-filled
    bool valid = false;
    if (key < p.keys && d < p.nope) {
      src = p.kv + key * p.kv_row_stride + head * p.kv_head_stride + d;
      valid = true;
    } else if (key < p.keys && d < p.nope + p.rope) {
      src = p.k_rope + key * p.k_rope_row_stride + (d - p.nope);
      valid = true;
    }
    CpAsync16(keys + SwizzledChunk<T::kQkChunks>(row, d / 8), src, valid);
  }
  for (int i = threadIdx.x; i < T::kKeys * T::kVChunks; i += T::kThreads) {
    const int row = i / T::kVChunks, d = i % T::kVChunks * 8, key = key0 + row;
    const bool valid = key < p.keys && d < p.v_dim;
    const __nv_bfloat16* src = valid ? p.kv + key * p.kv_row_stride + head * p.kv_head_stride + p.nope + d : p.kv;
    CpAsync16(values + SwizzledChunk<T::kVChunks>(row, d / 8), src, valid);
  }
}

template <int QK, int V>
__global__ void __launch_bounds__(FlashTiles<QK, V>::kThreads) FlashPrefillKernel(FlashPrefillParams p) {
  using T = FlashTiles<QK, V>;
  extern __shared__ __align__(128) unsigned char flash_smem[];
  __nv_bfloat16* const queries = reinterpret_cast<__nv_bfloat16*>(flash_smem);
  __nv_bfloat16* const keys = queries + T::kRows * QK;     // two stages of [kKeys, QK]
  __nv_bfloat16* const values = keys + 2 * T::kKeys * QK;  // two stages of [kKeys, V]
  // The last query tiles see the most keys: they start first, so the short ones fill the tail.
  const int q0 = (gridDim.x - 1 - blockIdx.x) * T::kRows, head = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int last_query = min(p.queries, q0 + T::kRows) - 1;
  const int visible = min(p.keys, p.first_position + last_query + 1);
  const int tiles = (visible + T::kKeys - 1) / T::kKeys;

  for (int i = threadIdx.x; i < T::kRows * T::kQkChunks; i += T::kThreads) {
    const int row = i / T::kQkChunks, d = i % T::kQkChunks * 8;
    const bool valid = q0 + row < p.queries && d < p.nope + p.rope;
    const __nv_bfloat16* src = valid ? p.q + (q0 + row) * p.q_row_stride + head * p.q_head_stride + d : p.q;
    CpAsync16(queries + SwizzledChunk<T::kQkChunks>(row, d / 8), src, valid);
  }
  LoadKeyTile<T>(p, head, 0, keys, values);
  CpAsyncCommit();

  // ldmatrix x4 addressing: lane l gives row l % 8 of matrix l / 8.
  const int matrix = lane / 8, matrix_row = lane % 8;
  uint32_t q_frag[QK / 16][4];
  float out[V / 8][4] = {};
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};  // rows g and g + 8
  const float scale_log2 = p.softmax_scale * 1.4426950408889634f;
  const int first_row_position = p.first_position + q0 + warp * 16;  // of the warp's row 0

  for (int tile = 0; tile < tiles; ++tile) {
    const int stage = tile & 1, key0 = tile * T::kKeys;
    if (tile + 1 < tiles) {
      LoadKeyTile<T>(p, head, key0 + T::kKeys, keys + (stage ^ 1) * T::kKeys * QK, values + (stage ^ 1) * T::kKeys * V);
    }
    CpAsyncCommit();
    CpAsyncWait<1>();
    __syncthreads();
    if (tile == 0) {
      for (int kk = 0; kk < QK / 16; ++kk) {
        const int row = warp * 16 + (matrix % 2) * 8 + matrix_row;
        LdMatrixX4(q_frag[kk], queries + SwizzledChunk<T::kQkChunks>(row, 2 * kk + matrix / 2));
      }
    }
    // A warp whose queries all precede the tile has nothing to add (the diagonal's last tile).
    if (key0 <= first_row_position + 15) {
      const __nv_bfloat16* k_tile = keys + stage * T::kKeys * QK;
      const __nv_bfloat16* v_tile = values + stage * T::kKeys * V;

      // S = Q K^T: 16 queries x 64 keys a warp, as 8 n8 fragments.
      float s[T::kKeys / 8][4] = {};
#pragma unroll
      for (int kk = 0; kk < QK / 16; ++kk) {
#pragma unroll
        for (int pair = 0; pair < T::kKeys / 16; ++pair) {
          uint32_t b[4];
          const int row = pair * 16 + (matrix / 2) * 8 + matrix_row;
          LdMatrixX4(b, k_tile + SwizzledChunk<T::kQkChunks>(row, 2 * kk + matrix % 2));
          MmaBf16(s[2 * pair], q_frag[kk], {b[0], b[1]});
          MmaBf16(s[2 * pair + 1], q_frag[kk], {b[2], b[3]});
        }
      }
      // Keys past a row's position (the tiles on the diagonal) or past the context.
      if (key0 + T::kKeys - 1 > first_row_position || key0 + T::kKeys > p.keys) {
#pragma unroll
        for (int n = 0; n < T::kKeys / 8; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int key = key0 + n * 8 + 2 * t + (e & 1), position = first_row_position + g + (e / 2) * 8;
            if (key > position || key >= p.keys) s[n][e] = -INFINITY;
          }
        }
      }
      // Online softmax in base 2; each row's values lie in the quad of lanes 4g..4g+3.
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float tile_max = -INFINITY;
#pragma unroll
        for (int n = 0; n < T::kKeys / 8; ++n) tile_max = fmaxf(tile_max, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
        const float new_max = fmaxf(row_max[r], tile_max * scale_log2);
        const float base = new_max == -INFINITY ? 0.0f : new_max;  // a row that has seen no key yet
        const float rescale = exp2f(row_max[r] - base);
        row_max[r] = new_max;
        row_sum[r] *= rescale;
#pragma unroll
        for (int n = 0; n < V / 8; ++n) {
          out[n][2 * r] *= rescale;
          out[n][2 * r + 1] *= rescale;
        }
#pragma unroll
        for (int n = 0; n < T::kKeys / 8; ++n) {
          s[n][2 * r] = exp2f(s[n][2 * r] * scale_log2 - base);
          s[n][2 * r + 1] = exp2f(s[n][2 * r + 1] * scale_log2 - base);
          row_sum[r] += s[n][2 * r] + s[n][2 * r + 1];
        }
      }
      // O += P V: the accumulators of key fragments 2j and 2j + 1 are the A fragment of k-step j.
#pragma unroll
      for (int j = 0; j < T::kKeys / 16; ++j) {
        const uint32_t a[4] = {PackBf16(__float2bfloat16(s[2 * j][0]), __float2bfloat16(s[2 * j][1])),
                               PackBf16(__float2bfloat16(s[2 * j][2]), __float2bfloat16(s[2 * j][3])),
                               PackBf16(__float2bfloat16(s[2 * j + 1][0]), __float2bfloat16(s[2 * j + 1][1])),
                               PackBf16(__float2bfloat16(s[2 * j + 1][2]), __float2bfloat16(s[2 * j + 1][3]))};
#pragma unroll
        for (int pair = 0; pair < V / 16; ++pair) {
          uint32_t b[4];
          const int row = j * 16 + (matrix % 2) * 8 + matrix_row;
          LdMatrixX4Trans(b, v_tile + SwizzledChunk<T::kVChunks>(row, 2 * pair + matrix / 2));
          MmaBf16(out[2 * pair], a, {b[0], b[1]});
          MmaBf16(out[2 * pair + 1], a, {b[2], b[3]});
        }
      }
    }
    __syncthreads();  // every warp is done with this stage before the next tile's copy refills it
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float sum = row_sum[r];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    const int query = q0 + warp * 16 + g + r * 8;
    if (query >= p.queries) continue;
    __nv_bfloat16* row = p.out + query * p.out_row_stride + head * p.out_head_stride;
#pragma unroll
    for (int n = 0; n < V / 8; ++n) {
      const int d = n * 8 + 2 * t;
      if (d < p.v_dim) {
        *reinterpret_cast<__nv_bfloat162*>(row + d) = __floats2bfloat162_rn(out[n][2 * r] * inv, out[n][2 * r + 1] * inv);
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
  if (nope <= 0 || rope < 0 || v_dim <= 0 || nope % 8 != 0 || rope % 8 != 0 || v_dim % 8 != 0) return false;
  return (nope + rope <= 192 && v_dim <= 128);
}

namespace {

template <int QK, int V>
cudaError_t LaunchFlash(const FlashPrefillParams& p, cudaStream_t stream) {
  using T = FlashTiles<QK, V>;
  auto kernel = FlashPrefillKernel<QK, V>;
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
      !Chunked(p.q, p.q_row_stride) || p.q_head_stride % 8 != 0 || !Chunked(p.kv, p.kv_row_stride) ||
      p.kv_head_stride % 8 != 0 || !Chunked(p.k_rope, p.k_rope_row_stride) || p.out_row_stride % 2 != 0 ||
      p.out_head_stride % 2 != 0 || reinterpret_cast<uintptr_t>(p.out) % 4 != 0) {
    return cudaErrorInvalidValue;
  }
  if (p.nope + p.rope <= 32 && p.v_dim <= 16) return LaunchFlash<32, 16>(p, stream);
  return LaunchFlash<192, 128>(p, stream);
}

}  // namespace cohort::kernels
