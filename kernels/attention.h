// The prefill half of MLA: a chunk of a sequence's new tokens attends over its whole context with
// keys and values expanded from the latent cache through kv_b_proj (cuBLAS expands them; these
// kernels gather the cache and attend). Decode uses the absorbed form instead (mla_decode.h).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace cohort::kernels {

// out[i, :] = the cache row of position i of one sequence, for i in [0, length): the sequence's
// context as a contiguous [length, width] bf16 matrix (latent then rope key).
cudaError_t LaunchGatherCache(const __nv_bfloat16* layer_cache, const int32_t* block_table, int block_size,
                              int width, int length, __nv_bfloat16* out, cudaStream_t stream);

// Causal attention of prefill chunks over keys and values expanded from the latent, in one launch:
// scores, online softmax and the value product stay on chip (flash attention on wgmma; no scores in
// memory). The buffers hold rows for every chunk of the launch; chunk c's query r is row
// c.first_query + r of q and out, at position c.first_position + r, and sees the chunk's keys 0..
// c.first_position + r (and < c.keys), key j being row c.first_key + j of k and k_rope and column
// c.first_key + j of v_t. For head h:
//   query row i [nope | rope] at q + i * q_row_stride + h * q_head_stride;
//   key row i   nope values at k + i * k_row_stride + h * k_head_stride, then the rope key shared by
//               all heads at k_rope + i * k_rope_row_stride;
//   value col i transposed: value d at v_t + h * v_t_head_stride + d * v_t_row_stride + i (each value
//               dimension's keys contiguous, as the product reads them);
//   output row i v_dim values at out + i * out_row_stride + h * out_head_stride.
struct FlashChunk {
  int first_query = 0, queries = 0;  // rows of q and out
  int first_position = 0;            // of the first query
  int first_key = 0, keys = 0;       // rows of k and k_rope, columns of v_t (a multiple of 8): its context
};
struct FlashPrefillParams {
  const __nv_bfloat16* q = nullptr;
  int64_t q_row_stride = 0, q_head_stride = 0;
  const __nv_bfloat16* k = nullptr;
  int64_t k_row_stride = 0, k_head_stride = 0;
  const __nv_bfloat16* k_rope = nullptr;
  int64_t k_rope_row_stride = 0;
  const __nv_bfloat16* v_t = nullptr;
  int64_t v_t_head_stride = 0, v_t_row_stride = 0;
  __nv_bfloat16* out = nullptr;
  int64_t out_row_stride = 0, out_head_stride = 0;
  const FlashChunk* chunks = nullptr;  // host memory, read while the launch is made
  int num_chunks = 0;
  int heads = 0, nope = 0, rope = 0, v_dim = 0;
  float softmax_scale = 0.0f;
};

// Whether LaunchFlashPrefill takes these head sizes: nope, rope and v_dim multiples of 8 with
// nope + rope <= 192 and v_dim <= 128 (DeepSeek-V2/V3: 128 + 64 and 128; smaller heads are padded
// with zeros, to 64 query values where they fit).
bool FlashPrefillSupports(int nope, int rope, int v_dim);

// Keys past a chunk's `keys` are masked. Their values are still multiplied (by probabilities of
// zero) up to the end of the 64-key tile that holds the chunk's last key, so the rows and columns
// between one chunk's keys and the next's must hold finite numbers (the engine's hold zeros or
// rows of earlier contexts); past the furthest chunk's keys (the largest first_key + keys) nothing is
// read. cudaErrorInvalidValue for unsupported head sizes, strides and pointers that are not whole
// 16-byte chunks, or a chunk with a negative field, with queries but no key, with a first_key that is
// not a multiple of 8 or (on DeepSeek's heads) with more than 2^23 queries.
cudaError_t LaunchFlashPrefill(const FlashPrefillParams& p, cudaStream_t stream);

}  // namespace cohort::kernels
