// The prefill half of MLA: a chunk of a sequence's new tokens attends over its whole context with
// keys and values expanded from the latent cache through kv_b_proj (cuBLAS does the products; these
// kernels do what lies between them). Decode uses the absorbed form instead (mla_decode.h).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace cohort::kernels {

// out[i, :] = the cache row of position i of one sequence, for i in [0, length): the sequence's
// context as a contiguous [length, width] bf16 matrix (latent then rope key).
cudaError_t LaunchGatherCache(const __nv_bfloat16* layer_cache, const int32_t* block_table, int block_size,
                              int width, int length, __nv_bfloat16* out, cudaStream_t stream);

// Causal softmax of scores [heads, rows, keys] fp32 (row r of each head is the query at position
// first_position + r, which sees keys 0..first_position + r) times `scale`, written as bf16 with the
// same shape; masked keys get probability 0.
cudaError_t LaunchCausalSoftmax(const float* scores, int heads, int rows, int keys, int first_position, float scale,
                                __nv_bfloat16* probs, cudaStream_t stream);

}  // namespace cohort::kernels
