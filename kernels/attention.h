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

// Causal attention of a prefill chunk over keys and values expanded from the latent, in one launch:
// scores, online softmax and the value product stay on chip (flash attention on wgmma; no scores in
// memory). Query r of the chunk is at position first_position + r and sees keys
// 0..first_position + r. For head h:
//   query r     [nope | rope] at q + r * q_row_stride + h * q_head_stride;
//   key j       nope values at k + j * k_row_stride + h * k_head_stride, then the rope key shared by
//               all heads at k_rope + j * k_rope_row_stride;
//   value j     transposed: value d of key j at v_t + h * v_t_head_stride + d * v_t_row_stride + j
//               (each value dimension's keys contiguous, as the product reads them);
//   output r    v_dim values at out + r * out_row_stride + h * out_head_stride.
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
  int queries = 0, keys = 0, first_position = 0, heads = 0;
  int nope = 0, rope = 0, v_dim = 0;
  float softmax_scale = 0.0f;
};

// Whether LaunchFlashPrefill takes these head sizes: nope, rope and v_dim multiples of 8 with
// nope + rope <= 192 and v_dim <= 128 (DeepSeek-V2/V3: 128 + 64 and 128; smaller heads are padded
// with zeros, to 64 query values where they fit).
bool FlashPrefillSupports(int nope, int rope, int v_dim);

// Keys past `keys` (the context's length) are masked, and never read. cudaErrorInvalidValue for
// unsupported head sizes, or strides and pointers that are not whole 16-byte chunks.
cudaError_t LaunchFlashPrefill(const FlashPrefillParams& p, cudaStream_t stream);

}  // namespace cohort::kernels
