#include "kernels/attention.h"

#include <algorithm>
#include <utility>
#include <vector>

#include "kernels/launch_setup.h"
#include "kernels/mma.cuh"
#include "kernels/tma.cuh"
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

// Flash attention for prefill chunks on wgmma. A block takes 128 queries of one head, 64 to each of
// two warpgroups, and walks the key tiles of 64 its queries can see. Per tile, a warpgroup forms its
// 64 x 64 scores with wgmma reading the queries and keys from shared memory, runs the online softmax
// on the accumulators, and adds P V with wgmma taking P from registers (the accumulators' layout is
// the A fragments') and the transposed values from shared memory. Every operand is stored as blocks
// of 64 values a row with the 128-byte swizzle (wgmma.cuh); query and key values past nope + rope,
// and value dimensions past v_dim, are zeros. Two kernels share that arithmetic (FlashRows) and
// differ in how the tiles reach shared memory:
// - FlashPrefillWsKernel, DeepSeek's heads (nope and rope whole blocks of 64, 192 values in all):
//   a producer warp copies the queries and every tile with TMA into a ring of stages, and the two
//   warpgroups take the tiles as they land, with no block barrier in the loop;
// - FlashPrefillKernel, any other head: every thread copies with cp.async, two block barriers a tile.
constexpr int kFlashRows = 128;      // queries a block, 64 a warpgroup
constexpr int kFlashKeys = 64;       // keys a tile
constexpr int kFlashValueDims = 128;  // v_dim padded

// One warpgroup's 64 query rows through the key tiles: a tile's scores, then its probabilities, the
// output accumulators and the online softmax's state of each of the thread's two rows (g and g + 8
// of its warp's 16).
template <int QK_BLOCKS>  // 64-value blocks of nope + rope
struct FlashRows {
  float s[8][4];         // a tile's scores, then its probabilities
  uint32_t probs[4][4];  // the probabilities as bf16 A fragments of P V's four k-steps
  float out[16][4] = {};
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};
  float rescale[2];  // of out, once the product in flight is done

  // S = Q K^T, 64 x 64, issued and committed (not waited for). `queries`: the warpgroup's first row
  // in the block's queries (blocks of 64 values, kFlashRows rows each); `keys`: the tile's.
  __device__ __forceinline__ void IssueScores(uint32_t queries, uint32_t keys) {
#pragma unroll
    for (int kk = 0; kk < QK_BLOCKS * 4; ++kk) {
      const uint32_t offset = 32 * (kk % 4);  // the k-step within its block of 64 values
      WgmmaBf16<64>(s, SwizzledDescriptor(queries + (kk / 4) * kFlashRows * 128 + offset),
                    SwizzledDescriptor(keys + (kk / 4) * kFlashKeys * 128 + offset), kk > 0);
    }
    WgmmaCommit();
  }

  // The online softmax (base 2; each row's values lie in the quad of lanes 4g..4g+3) of the tile of
  // keys from key0 of a chunk of `keys`, for a warp whose first row is at first_row_position: s
  // becomes the probabilities, row_sum their sums, and rescale what out needs.
  __device__ __forceinline__ void Softmax(int keys, int key0, int first_row_position, float scale_log2) {
    const int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
    if (key0 + kFlashKeys - 1 > first_row_position || key0 + kFlashKeys > keys) {
#pragma unroll
      for (int n = 0; n < 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = key0 + n * 8 + 2 * t + (e & 1), position = first_row_position + g + (e / 2) * 8;
          if (key > position || key >= keys) s[n][e] = -INFINITY;
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
  }

  // out *= rescale, and the probabilities into A fragments: the accumulators of key fragments 2j
  // and 2j + 1 are the A fragment of k-step j.
  __device__ __forceinline__ void TakeProbabilities() {
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
  }

  // O += P V for the tile whose transposed values are at `values`, issued and committed.
  __device__ __forceinline__ void IssueValues(uint32_t values) {
#pragma unroll
    for (int j = 0; j < 4; ++j) WgmmaBf16RegA128(out, probs[j], SwizzledDescriptor(values + 32 * j), 1);
    WgmmaCommit();
  }

  // The walk over a chunk's key tiles, the same in both kernels: tile 0's scores and probabilities
  // first; then each round issues the next tile's scores and this tile's P V together, and runs the
  // next tile's softmax while P V is still on the tensor cores. landed(t) returns once tile t is in
  // shared memory (its keys at stage_of(t), its values values_offset bytes after them); released(t)
  // is told when this warpgroup has multiplied tile t's values. Every warpgroup multiplies every tile
  // (no branch around wgmma, which would serialise it): on the diagonal's last tile a warpgroup whose
  // queries all precede it gets probabilities of 0.
  template <class StageOf, class Landed, class Released>
  __device__ __forceinline__ void Walk(int tiles, int keys, int first_row_position, float scale_log2, uint32_t queries,
                                       StageOf stage_of, uint32_t values_offset, Landed landed, Released released) {
    landed(0);
    WgmmaFence();
    IssueScores(queries, stage_of(0));
    WgmmaWait<0>();
    Softmax(keys, 0, first_row_position, scale_log2);
    TakeProbabilities();
    for (int tile = 0; tile + 1 < tiles; ++tile) {
      landed(tile + 1);
      WgmmaFence();
      IssueScores(queries, stage_of(tile + 1));
      IssueValues(stage_of(tile) + values_offset);
      WgmmaWait<1>();  // the scores (committed first) are done; P V may still run
      Softmax(keys, (tile + 1) * kFlashKeys, first_row_position, scale_log2);
      WgmmaWait<0>();
      released(tile);
      TakeProbabilities();
    }
    WgmmaFence();
    IssueValues(stage_of(tiles - 1) + values_offset);
    WgmmaWait<0>();
  }

  // out / row sum -> the output rows of `head` of chunk c, for a warpgroup whose first row is the
  // chunk's query `query0`.
  __device__ __forceinline__ void Store(const FlashPrefillParams& p, const FlashChunk& c, int query0, int head) {
    const int warp = threadIdx.x / 32 % 4, g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float sum = row_sum[r];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
      const int query = query0 + warp * 16 + g + r * 8;
      if (query >= c.queries) continue;
      __nv_bfloat16* row = p.out + (c.first_query + query) * p.out_row_stride + head * p.out_head_stride;
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
};

// Keys the queries [q0, q0 + kFlashRows) of chunk c see (the launcher orders blocks by them), and
// the key tiles that hold them.
__host__ __device__ __forceinline__ int VisibleKeys(const FlashChunk& c, int q0) {
  const int last_query = std::min(c.queries, q0 + kFlashRows) - 1;
  return std::min(c.keys, c.first_position + last_query + 1);
}
__device__ __forceinline__ int VisibleTiles(const FlashChunk& c, int q0) {
  return (VisibleKeys(c, q0) + kFlashKeys - 1) / kFlashKeys;
}

// ---------------------------------------------------------------- DeepSeek heads: producer warp, TMA

struct FlashWsTiles {
  static constexpr int kQkBlocks = 3;  // nope + rope = 192
  static constexpr int kThreads = 384;  // a producer warpgroup, then two consumer warpgroups
  static constexpr int kConsumerWarps = 8;
  static constexpr int kQBytes = kQkBlocks * kFlashRows * 128;
  static constexpr int kKBytes = kQkBlocks * kFlashKeys * 128;
  static constexpr int kVBytes = kFlashValueDims * kFlashKeys * 2;
  static constexpr int kStageBytes = kKBytes + kVBytes;  // keys, then values transposed
  static constexpr int kStages = 4;
  static constexpr int kBarrierOffset = kQBytes + kStages * kStageBytes;  // full[], empty[], queries
  static constexpr int kSmemBytes = kBarrierOffset + 8 * (2 * kStages + 1);
  // Registers a thread: the producer's 128 threads give theirs to the consumers' accumulators.
  static constexpr int kProducerRegisters = 40, kConsumerRegisters = 232;
};

// A launch's chunks and its blocks' work, in kernel parameters: item i (chunk << 16 | query tile) is
// blocks [i * heads, (i + 1) * heads), one a head. The launcher orders the items by the keys they
// see, most first, so the short ones fill the tail (the device starts blocks about in the
// order of their index).
constexpr int kFlashMaxChunks = 32;  // a launch's; the launcher makes more launches for more
constexpr int kFlashMaxItems = 512;
struct FlashWork {
  FlashChunk chunks[kFlashMaxChunks];
  uint32_t items[kFlashMaxItems];
};

// The maps (tma.cuh), all of 128-byte rows: queries [rows][heads][nope + rope] in boxes of 64 values
// x kFlashRows queries; keys [rows][heads][nope] and rope keys [rows][rope] in boxes of 64 values x
// kFlashKeys keys; values [heads][v_dim][columns] in boxes of kFlashKeys keys x 128 dims. Rows past
// the furthest chunk's and dimensions past v_dim arrive as zeros.
__global__ void __launch_bounds__(FlashWsTiles::kThreads, 1)
    FlashPrefillWsKernel(const FlashPrefillParams p, const __grid_constant__ FlashWork work,
                         const __grid_constant__ CUtensorMap q_map, const __grid_constant__ CUtensorMap k_map,
                         const __grid_constant__ CUtensorMap rope_map, const __grid_constant__ CUtensorMap v_map) {
  using T = FlashWsTiles;
  extern __shared__ __align__(1024) unsigned char flash_smem[];
  const uint32_t queries = SmemAddress(flash_smem);
  const uint32_t stages = queries + T::kQBytes;
  const uint32_t full = queries + T::kBarrierOffset;
  const uint32_t empty = full + 8 * T::kStages;
  const uint32_t queries_full = empty + 8 * T::kStages;
  const auto stage_of = [&](int tile) { return stages + (tile % T::kStages) * T::kStageBytes; };
  const uint32_t item = work.items[blockIdx.x / p.heads];
  const FlashChunk& c = work.chunks[item >> 16];
  const int q0 = static_cast<int>(item & 0xffffu) * kFlashRows, head = blockIdx.x % p.heads;
  const int tiles = VisibleTiles(c, q0);
  if (threadIdx.x == 0) {
    for (int s = 0; s < T::kStages; ++s) {
      MbarrierInit(full + 8 * s, 1);
      MbarrierInit(empty + 8 * s, T::kConsumerWarps);
    }
    MbarrierInit(queries_full, 1);
    FenceBarrierInit();
  }
  __syncthreads();

  if (threadIdx.x < 128) {
    ReleaseRegisters<T::kProducerRegisters>();
    if (threadIdx.x != 0) return;
    MbarrierArriveExpectTx(queries_full, T::kQBytes);
    for (int k = 0; k < T::kQkBlocks; ++k) {
      TmaLoad(queries + k * kFlashRows * 128, &q_map, queries_full, 64 * k, head, c.first_query + q0);
    }
    const int nope_blocks = p.nope / 64;
    for (int tile = 0; tile < tiles; ++tile) {
      MbarrierWait(empty + 8 * (tile % T::kStages), (tile / T::kStages & 1) ^ 1);  // its last tile used
      const uint32_t keys = stage_of(tile), bar = full + 8 * (tile % T::kStages);
      const int key0 = c.first_key + tile * kFlashKeys;
      MbarrierArriveExpectTx(bar, T::kStageBytes);
      for (int k = 0; k < T::kQkBlocks; ++k) {
        if (k < nope_blocks) {
          TmaLoad(keys + k * kFlashKeys * 128, &k_map, bar, 64 * k, head, key0);
        } else {
          TmaLoad(keys + k * kFlashKeys * 128, &rope_map, bar, 64 * (k - nope_blocks), key0);
        }
      }
      TmaLoad(keys + T::kKBytes, &v_map, bar, key0, 0, head);
    }
    return;
  }

  ClaimRegisters<T::kConsumerRegisters>();
  const int group = threadIdx.x / 128 - 1, warp = threadIdx.x / 32 % 4;
  const int first_row_position = c.first_position + q0 + group * 64 + warp * 16;
  const uint32_t group_queries = queries + group * 64 * 128;
  const float scale_log2 = p.softmax_scale * 1.4426950408889634f;
  FlashRows<T::kQkBlocks> rows;
  MbarrierWait(queries_full, 0);
  rows.Walk(
      tiles, c.keys, first_row_position, scale_log2, group_queries, stage_of, T::kKBytes,
      [&](int tile) { MbarrierWait(full + 8 * (tile % T::kStages), tile / T::kStages & 1); },
      [&](int tile) {  // each consumer warp hands the stage back
        if (threadIdx.x % 32 == 0) MbarrierArrive(empty + 8 * (tile % T::kStages));
      });
  rows.Store(p, c, q0 + group * 64, head);
}

// ------------------------------------------------------------------ any other head: cp.async copies

template <int QK_BLOCKS>  // 64-value blocks of nope + rope: 1 (heads of up to 64) or 3 (up to 192)
struct FlashTiles {
  static constexpr int kThreads = 256;
  static constexpr int kChunks = QK_BLOCKS * 8;  // 16-byte chunks of a query or key row
  static constexpr int kQBytes = QK_BLOCKS * kFlashRows * 128;
  static constexpr int kKBytes = QK_BLOCKS * kFlashKeys * 128;
  static constexpr int kVBytes = kFlashValueDims * kFlashKeys * 2;
  static constexpr int kStageBytes = kKBytes + kVBytes;
  static constexpr int kStages = 3;  // tile t's values and t + 1's keys in use while t + 2 is copied in
  static constexpr int kSmemBytes = kQBytes + kStages * kStageBytes;
};

// Keys [key0, key0 + 64) of chunk c's `head` (nope then rope values) and their values (transposed)
// into one stage; zeros past the chunk's keys and the head sizes.
template <class T>
__device__ __forceinline__ void LoadKeyTile(const FlashPrefillParams& p, const FlashChunk& c, int head, int key0,
                                            uint32_t keys, uint32_t values) {
  for (int i = threadIdx.x; i < kFlashKeys * T::kChunks; i += T::kThreads) {
    const int row = i / T::kChunks, chunk = i % T::kChunks, d = chunk * 8, key = key0 + row;
    const int64_t at = c.first_key + key;
    const __nv_bfloat16* src = p.k;  // any valid address where nothing is read
    int bytes = 0;
    if (key < c.keys && d < p.nope) {
      src = p.k + at * p.k_row_stride + head * p.k_head_stride + d;
      bytes = 16;
    } else if (key < c.keys && d < p.nope + p.rope) {
      src = p.k_rope + at * p.k_rope_row_stride + (d - p.nope);
      bytes = 16;
    }
    CpAsyncBytes(keys + (chunk / 8) * kFlashKeys * 128 + SwizzledOffset<64>(row, chunk % 8), src, bytes);
  }
  for (int i = threadIdx.x; i < kFlashValueDims * 8; i += T::kThreads) {
    const int dim = i / 8, chunk = i % 8, key = key0 + chunk * 8;
    const int bytes = dim < p.v_dim && key < c.keys ? 2 * min(8, c.keys - key) : 0;
    const __nv_bfloat16* src =
        bytes > 0 ? p.v_t + head * p.v_t_head_stride + dim * p.v_t_row_stride + c.first_key + key : p.v_t;
    CpAsyncBytes(values + SwizzledOffset<64>(dim, chunk), src, bytes);
  }
}

// One launch a chunk, grid (query tiles, heads); every head's longest query tiles start first. The
// block's threads copy tile t + 2 (cp.async, three stages) while tile t's values and t + 1's keys
// are in use.
template <int QK_BLOCKS>
__global__ void __launch_bounds__(256) FlashPrefillKernel(const FlashPrefillParams p, const FlashChunk c) {
  using T = FlashTiles<QK_BLOCKS>;
  extern __shared__ __align__(1024) unsigned char flash_smem[];
  const uint32_t queries = SmemAddress(flash_smem);
  const uint32_t stages = queries + T::kQBytes;  // kStages of [keys | values]
  const auto stage_of = [&](int tile) { return stages + (tile % T::kStages) * T::kStageBytes; };
  const int linear = blockIdx.x + blockIdx.y * gridDim.x;
  const int q0 = (gridDim.x - 1 - linear / gridDim.y) * kFlashRows, head = linear % gridDim.y;
  const int tiles = VisibleTiles(c, q0);
  const int warpgroup = threadIdx.x / 128, warp = threadIdx.x / 32 % 4;
  const int first_row_position = c.first_position + q0 + warpgroup * 64 + warp * 16;
  const uint32_t group_queries = queries + warpgroup * 64 * 128;

  for (int i = threadIdx.x; i < kFlashRows * T::kChunks; i += T::kThreads) {
    const int row = i / T::kChunks, chunk = i % T::kChunks, d = chunk * 8;
    const bool valid = q0 + row < c.queries && d < p.nope + p.rope;
    const int64_t at = c.first_query + q0 + row;
    const __nv_bfloat16* src = valid ? p.q + at * p.q_row_stride + head * p.q_head_stride + d : p.q;
    CpAsyncBytes(queries + (chunk / 8) * kFlashRows * 128 + SwizzledOffset<64>(row, chunk % 8), src, valid ? 16 : 0);
  }
  for (int tile = 0; tile < T::kStages - 1; ++tile) {  // one group a tile, empty past the last
    if (tile < tiles) LoadKeyTile<T>(p, c, head, tile * kFlashKeys, stage_of(tile), stage_of(tile) + T::kKBytes);
    CpAsyncCommit();
  }

  const float scale_log2 = p.softmax_scale * 1.4426950408889634f;
  FlashRows<QK_BLOCKS> rows;
  const auto landed = [&](int tile) {
    if (tile > 0) {
      // Every warpgroup is done with tile - 2's stage: it takes tile + kStages - 2.
      __syncthreads();
      const int refill = tile + T::kStages - 2;
      if (refill < tiles) {
        LoadKeyTile<T>(p, c, head, refill * kFlashKeys, stage_of(refill), stage_of(refill) + T::kKBytes);
      }
      CpAsyncCommit();
    }
    CpAsyncWait<T::kStages - 2>();  // tile landed
    FenceProxyAsync();
    __syncthreads();
  };
  rows.Walk(tiles, c.keys, first_row_position, scale_log2, group_queries, stage_of, T::kKBytes, landed, [](int) {});
  rows.Store(p, c, q0 + warpgroup * 64, head);
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
  for (int i = 0; i < p.num_chunks; ++i) {
    const FlashChunk& c = p.chunks[i];
    if (c.queries == 0) continue;
    kernel<<<dim3((c.queries + kFlashRows - 1) / kFlashRows, p.heads), T::kThreads, T::kSmemBytes, stream>>>(p, c);
    if (const cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

// Whether FlashPrefillWsKernel takes these heads: its tiles are whole 64-value blocks of nope, then
// of rope, 192 values in all.
bool WsHeads(const FlashPrefillParams& p) {
  return p.nope % 64 == 0 && p.rope % 64 == 0 && p.nope + p.rope == 64 * FlashWsTiles::kQkBlocks;
}

// One launch for up to kFlashMaxChunks chunks and kFlashMaxItems query tiles (more take further
// launches), its items ordered by the keys they see.
cudaError_t LaunchFlashWs(const FlashPrefillParams& p, cudaStream_t stream) {
  using T = FlashWsTiles;
  static_assert(sizeof(FlashPrefillParams) + sizeof(FlashWork) + 4 * sizeof(CUtensorMap) <= 4096,
                "kernel parameters are at most 4 KB");
  int64_t query_rows = 0, key_rows = 0;
  for (int i = 0; i < p.num_chunks; ++i) {
    const FlashChunk& c = p.chunks[i];
    // An item holds a query tile in 16 bits.
    if ((int64_t{c.queries} + kFlashRows - 1) / kFlashRows > 0x10000) return cudaErrorInvalidValue;
    query_rows = std::max<int64_t>(query_rows, int64_t{c.first_query} + c.queries);
    key_rows = std::max<int64_t>(key_rows, int64_t{c.first_key} + c.keys);
  }
  if (query_rows == 0) return cudaSuccess;  // no chunk has a query (and a map needs rows)
  const auto u = [](int64_t v) { return static_cast<uint64_t>(v); };
  CUtensorMap q_map{}, k_map{}, rope_map{}, v_map{};
  const uint64_t q_dims[3] = {u(p.nope + p.rope), u(p.heads), u(query_rows)};
  const uint64_t q_strides[2] = {u(p.q_head_stride * 2), u(p.q_row_stride * 2)};
  const uint32_t q_box[3] = {64, 1, kFlashRows};
  const uint64_t k_dims[3] = {u(p.nope), u(p.heads), u(key_rows)};
  const uint64_t k_strides[2] = {u(p.k_head_stride * 2), u(p.k_row_stride * 2)};
  const uint32_t k_box[3] = {64, 1, kFlashKeys};
  const uint64_t v_dims[3] = {u(key_rows), u(p.v_dim), u(p.heads)};
  const uint64_t v_strides[2] = {u(p.v_t_row_stride * 2), u(p.v_t_head_stride * 2)};
  const uint32_t v_box[3] = {kFlashKeys, kFlashValueDims, 1};
  cudaError_t e = EncodeBf16TensorMap(&q_map, p.q, 3, q_dims, q_strides, q_box);
  if (e == cudaSuccess) e = EncodeBf16TensorMap(&k_map, p.k, 3, k_dims, k_strides, k_box);
  if (e == cudaSuccess) e = EncodeBf16TensorMap(&v_map, p.v_t, 3, v_dims, v_strides, v_box);
  if (e == cudaSuccess && p.rope > 0) {  // without a rope part the kernel never reads its map
    const uint64_t rope_dims[2] = {u(p.rope), u(key_rows)};
    const uint64_t rope_strides[1] = {u(p.k_rope_row_stride * 2)};
    const uint32_t rope_box[2] = {64, kFlashKeys};
    e = EncodeBf16TensorMap(&rope_map, p.k_rope, 2, rope_dims, rope_strides, rope_box);
  }
  if (e != cudaSuccess) return e;
  static LaunchSetUp setup;
  LaunchInfo info;
  if (e = setup.Get(FlashPrefillWsKernel, T::kThreads, T::kSmemBytes, &info); e != cudaSuccess) return e;

  FlashWork work;
  std::vector<std::pair<int, uint32_t>> items;  // (keys seen, item)
  for (int first = 0; first < p.num_chunks; first += kFlashMaxChunks) {
    const int chunks = std::min(kFlashMaxChunks, p.num_chunks - first);
    items.clear();
    for (int i = 0; i < chunks; ++i) {
      const FlashChunk& c = work.chunks[i] = p.chunks[first + i];
      for (int tile = 0; tile * kFlashRows < c.queries; ++tile) {
        items.emplace_back(VisibleKeys(c, tile * kFlashRows), static_cast<uint32_t>(i) << 16 | tile);
      }
    }
    std::stable_sort(items.begin(), items.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
    for (size_t begin = 0; begin < items.size(); begin += kFlashMaxItems) {
      const size_t count = std::min<size_t>(kFlashMaxItems, items.size() - begin);
      for (size_t i = 0; i < count; ++i) work.items[i] = items[begin + i].second;
      FlashPrefillWsKernel<<<static_cast<unsigned>(count * p.heads), T::kThreads, T::kSmemBytes, stream>>>(
          p, work, q_map, k_map, rope_map, v_map);
      if (e = cudaGetLastError(); e != cudaSuccess) return e;
    }
  }
  return cudaSuccess;
}

bool Chunked(const void* pointer, int64_t stride) {
  return reinterpret_cast<uintptr_t>(pointer) % 16 == 0 && stride % 8 == 0;
}

bool ValidChunk(const FlashChunk& c) {
  return c.first_query >= 0 && c.queries >= 0 && c.first_position >= 0 && c.first_key >= 0 && c.first_key % 8 == 0 &&
         c.keys >= 0 && (c.queries == 0 || c.keys > 0);
}

}  // namespace

cudaError_t LaunchFlashPrefill(const FlashPrefillParams& p, cudaStream_t stream) {
  if (p.num_chunks == 0 || p.heads == 0) return cudaSuccess;
  if (!FlashPrefillSupports(p.nope, p.rope, p.v_dim) || p.num_chunks < 0 || p.chunks == nullptr || p.heads < 0 ||
      !std::all_of(p.chunks, p.chunks + p.num_chunks, ValidChunk) || !Chunked(p.q, p.q_row_stride) ||
      p.q_head_stride % 8 != 0 || !Chunked(p.k, p.k_row_stride) || p.k_head_stride % 8 != 0 ||
      !Chunked(p.k_rope, p.k_rope_row_stride) || !Chunked(p.v_t, p.v_t_row_stride) || p.v_t_head_stride % 8 != 0 ||
      p.out_row_stride % 2 != 0 || p.out_head_stride % 2 != 0 || reinterpret_cast<uintptr_t>(p.out) % 4 != 0) {
    return cudaErrorInvalidValue;
  }
  if (WsHeads(p)) return LaunchFlashWs(p, stream);
  return p.nope + p.rope <= 64 ? LaunchFlash<1>(p, stream) : LaunchFlash<3>(p, stream);
}

}  // namespace cohort::kernels
