// Small memory-bound kernels around the matrix products of a DeepSeek layer: embedding gather,
// RMSNorm (with the residual add fused in), rotary embedding of the queries, and the write of new
// latents into the paged KV cache. One launch each, no allocation, capturable in a CUDA graph; the
// kernels of a step are programmatic dependents (kernels/pdl.cuh) that wait for the kernels before them.
//
// Layout conventions: row-major, a row per token; `ld` arguments are row strides in elements.
// Positions and token ids are int32 on the device.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace cohort::kernels {

// Rotary embedding parameters shared by queries and keys (worker/model/rope.h computes them).
struct RopeParams {
  const float* inv_freq = nullptr;  // [rope_dim / 2], device
  int rope_dim = 0;
  float attention_factor = 1.0f;    // multiplies cos and sin (YaRN)
  bool interleave = true;           // rotate pairs (2i, 2i+1); else (i, i + rope_dim/2)
};

// hidden[t, :] = float(embedding[tokens[t], :]).
cudaError_t LaunchEmbedding(const __nv_bfloat16* embedding, const int32_t* tokens, int num_tokens, int hidden,
                            float* out, cudaStream_t stream);

// For each row: when `delta` is not null, residual += delta (in place); then
// out = bf16(residual * rsqrt(mean(residual^2) + eps) * weight). dim <= 8192. When `inv_rms` is not
// null it receives each row's rsqrt(mean(residual^2) + eps), fp32 [rows] (for a router folded into
// the projections around it, DeviceLayer::router_folded, worker/model/cuda/device_weights.h).
cudaError_t LaunchAddRmsNorm(float* residual, const __nv_bfloat16* delta, const __nv_bfloat16* weight, int rows,
                             int dim, float eps, __nv_bfloat16* out, cudaStream_t stream, float* inv_rms = nullptr);
// The same with an fp32 delta (a sum across GPUs), rounded to bf16 before it joins the residual,
// so that it changes the residual exactly as the same delta stored in bf16 would.
cudaError_t LaunchAddRmsNorm(float* residual, const float* delta, const __nv_bfloat16* weight, int rows, int dim,
                             float eps, __nv_bfloat16* out, cudaStream_t stream, float* inv_rms = nullptr);

// out[r, :] = bf16(rmsnorm(in[r, :]) * weight) for an fp32 input with row stride `ld_in`.
cudaError_t LaunchRmsNorm(const float* in, int ld_in, const __nv_bfloat16* weight, int rows, int dim, float eps,
                          __nv_bfloat16* out, int ld_out, cudaStream_t stream);

// Rotates the rope part (the last rope_dim values of each head's qk_dim) of q [rows, heads, qk_dim]
// in place, each row at positions[row].
cudaError_t LaunchRopeQueries(__nv_bfloat16* q, int rows, int heads, int qk_dim, const int32_t* positions,
                              const RopeParams& rope, cudaStream_t stream);

// Where new cache entries go: token t of the step is position positions[t] of sequence
// sequence_of_token[t], whose block table starts at block_tables + table_offsets[sequence].
struct CacheWriteParams {
  const int32_t* positions = nullptr;
  const int32_t* sequence_of_token = nullptr;
  const int32_t* block_tables = nullptr;   // every sequence's table, concatenated
  const int32_t* table_offsets = nullptr;  // [sequences]
  int block_size = 0;
};

// Queries to rotate in the same launch as the cache write: q [rows, heads, qk_dim], as LaunchRopeQueries.
// With `source`, q is written rather than rotated in place: q = bf16(source row) with the rope part
// rotated in fp32 (the queries of a product that wrote them in fp32 beside the latent).
struct QueryRopeParams {
  __nv_bfloat16* q = nullptr;  // null: no queries
  int heads = 0;
  int qk_dim = 0;
  const float* source = nullptr;  // [rows, heads * qk_dim] with row stride source_row_stride, or null
  int64_t source_row_stride = 0;
};

// MLA decode's absorbed queries, formed in the cache-write launch for a few rows: for rows r <
// rows, heads h and j < rank, q_latent[r, h, j] = sum over d < nope of bf16(q_nope[r, h, d]) *
// absorbed_keys[h, j, d] in fp32, rounded to bf16, where q_nope is the first nope values of the
// row's head in QueryRopeParams (its fp32 source, or q). One launch instead of a product after it;
// each block loads its share of the weights before it waits for the kernel before it. Up to
// kMaxRowAbsorbRows rows, blocks of a row and a head each take some latent values on CUDA cores;
// more rows take the head GEMM's tiles (kernels/head_gemm.cuh: 16 rows and 64 latent values of a
// head a block, on tensor cores) in the same launch. Past kMaxAbsorbRows each tile's own read of its
// head's weights costs more than the launch saves (V2-Lite decode on an H200: batch 40-64 0.6-1.2%
// faster with the tiles than with cuBLAS after the launch, 128-512 up to 3% slower).
inline constexpr int kMaxRowAbsorbRows = 8;
inline constexpr int kMaxAbsorbRows = 64;
struct QueryAbsorbParams {
  const __nv_bfloat16* absorbed_keys = nullptr;  // [heads, rank, nope]; null: nothing to absorb
  __nv_bfloat16* q_latent = nullptr;             // [rows, heads, rank]
  int rows = 0;                                  // 1..kMaxAbsorbRows, the first rows of the launch
  int rank = 0;
};

// Whether LaunchWriteKvCache takes `absorb` with these queries: 1..kMaxAbsorbRows rows, and
// 16-byte aligned pieces of weights and queries; up to kMaxRowAbsorbRows rows nope (qk_dim -
// rope_dim) a power of two from 8 to 128 (each 16-byte piece of a weight row goes to one lane, a
// row to at most 16 lanes), past them nope a multiple of 16 up to 256 and rank a multiple of 8.
bool CanAbsorbQueries(const QueryRopeParams& queries, int rope_dim, const QueryAbsorbParams& absorb);

// kv [rows, kv_lora_rank + rope_dim] fp32 (kv_a_proj_with_mqa's output; rows kv_row_stride apart) ->
// for each row, the latent part RMS-normalised with `latent_norm` (eps 1e-6) and the rope key
// rotated, written as bf16 into layer_cache [num_blocks, block_size, kv_lora_rank + rope_dim] at the
// row's slot; with `queries`, the row's queries are rotated at the same position, and with `absorb`
// also multiplied into the latent space (one launch instead of two or three). kv_lora_rank <= 1024.
// Up to kCacheWriteSpreadMaxRows rows (decode batches) each row's work is spread over several blocks;
// more rows (prefill) take a warp for each piece of a row's work (its latent, or one head's queries).
inline constexpr int kCacheWriteSpreadMaxRows = 512;
cudaError_t LaunchWriteKvCache(const float* kv, int64_t kv_row_stride, int rows, int kv_lora_rank,
                               const __nv_bfloat16* latent_norm,
                               float latent_eps, const RopeParams& rope, const CacheWriteParams& where,
                               __nv_bfloat16* layer_cache, cudaStream_t stream, const QueryRopeParams& queries = {},
                               const QueryAbsorbParams& absorb = {});

// out[r, :] = in[rows[r], :] for bf16 rows of `dim` values.
cudaError_t LaunchGatherRows(const __nv_bfloat16* in, const int32_t* rows, int num_rows, int dim,
                             __nv_bfloat16* out, cudaStream_t stream);

// out[b][c][r] = in[b * in_batch_stride + r * cols + c] for r < rows, c < cols, b < batch: each
// [rows, cols] matrix of a batch transposed into a dense [cols, rows] one.
cudaError_t LaunchTranspose(const __nv_bfloat16* in, int rows, int cols, int64_t in_batch_stride, int batch,
                            __nv_bfloat16* out, cudaStream_t stream);

// Fills `count` bf16 values with uniform numbers in [-scale, scale) from a counter-based hash of
// (seed, index): the same seed gives the same weights on any GPU. For synthetic models.
cudaError_t LaunchFillRandom(__nv_bfloat16* out, int64_t count, uint64_t seed, float scale, cudaStream_t stream);
cudaError_t LaunchFillRandomFloat(float* out, int64_t count, uint64_t seed, float scale, cudaStream_t stream);
cudaError_t LaunchFillConstant(__nv_bfloat16* out, int64_t count, float value, cudaStream_t stream);

}  // namespace cohort::kernels
