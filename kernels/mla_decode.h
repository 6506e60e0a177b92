// MLA attention over the compressed latent cache, DeepSeek's decode form: kv_b_proj's key half has
// been absorbed into the query (q_latent = q_nope . W_uk per head) and its value half is applied
// after the attention (o = o_latent . W_uv^T; by this launch's merge when value_weights is set),
// so attention reads only the cache: one latent row (kv_lora_rank values) plus one rope key
// (qk_rope_head_dim values) per token, shared by all heads.
//
// Each query attends to positions [0, query_position] of its sequence, read through the sequence's
// block table; a query may be a decode token or a prefill token (causal by position). Work splits
// over (group of 16 heads, context split, query); with num_splits > 1 each split writes a partial
// result and a second kernel of the same launch merges them (flash-decoding), so a small batch
// still fills the GPU.
//
// Tensor cores (mma.sync m16n8k16, bf16 in, fp32 accumulate): 16 heads are the M dimension; the
// scores split the cached width over the block's warps, P . V splits the latent columns; operands
// come from shared memory through ldmatrix (values transposed by ldmatrix.trans).
// Supported (kv_lora_rank, qk_rope_head_dim): (512, 64) as in DeepSeek-V2/V3, (64, 16) and (32, 8)
// for the small test checkpoints; others return cudaErrorInvalidValue.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace cohort::kernels {

struct MlaDecodeParams {
  const __nv_bfloat16* q_latent = nullptr;  // [queries, heads, kv_lora_rank]
  // Element (q, h, i) at q_rope[q * q_rope_row_stride + h * q_rope_head_stride + i]. Both query
  // pointers 16-byte aligned, both strides multiples of 8.
  const __nv_bfloat16* q_rope = nullptr;
  int64_t q_rope_row_stride = 0;
  int q_rope_head_stride = 0;
  const __nv_bfloat16* cache = nullptr;     // one layer: [blocks, block_size, kv_lora_rank + qk_rope_head_dim]
  const int32_t* block_tables = nullptr;    // every sequence's block table, concatenated
  const int32_t* table_offsets = nullptr;   // [sequences]: where each sequence's table starts
  int block_size = 0;
  const int32_t* query_sequence = nullptr;  // [queries]: the query's sequence
  const int32_t* query_position = nullptr;  // [queries]: attends to positions 0..query_position
  int num_queries = 0;
  int heads = 0;
  int kv_lora_rank = 0;
  int rope_dim = 0;
  float softmax_scale = 1.0f;
  int num_splits = 1;  // 1..64
  // At least the most tokens any one sequence has in this step (1 in a decode step), or 0. A query's
  // cache rows below query_position + 1 - step_tokens_bound were written by earlier steps, so those
  // of its first tile are copied before the wait for the kernel that writes this step's rows (the
  // copy overlaps that kernel); 0: every row is copied after the wait.
  int step_tokens_bound = 0;
  __nv_bfloat16* out = nullptr;  // [queries, heads, kv_lora_rank]
  // Workspace when num_splits > 1 (sizes from MlaSplitWorkspaceFloats).
  float* partial_out = nullptr;  // [queries, num_splits, heads, kv_lora_rank]
  float* partial_lse = nullptr;  // [queries, num_splits, heads]

  // Optional, with num_splits > 1: the merge of the splits also applies kv_b_proj's value half, and
  // writes attn[q, h, i] = sum over j of bf16(o_latent[q, h, j]) * W_uv[h][i, j] (fp32, rounded to
  // bf16) for i < v_head_dim instead of `out` (one launch instead of a product after it; for few
  // queries, since every block of a head merges its row again). W_uv[h] is the [v_head_dim,
  // kv_lora_rank] matrix at value_weights + h * value_head_stride, 16-byte aligned.
  const __nv_bfloat16* value_weights = nullptr;
  int64_t value_head_stride = 0;
  int v_head_dim = 0;
  __nv_bfloat16* attn = nullptr;  // [queries, heads, v_head_dim]
};

// Floats of workspace (partial_out and partial_lse together) for `queries` x `num_splits` (0 for
// one split).
int64_t MlaSplitWorkspaceFloats(int queries, int num_splits, int heads, int kv_lora_rank);

// Runs the attention (and the merge of splits when num_splits > 1). Launched as programmatic
// dependents (kernels/pdl.cuh): they wait for the stream's earlier kernels before reading anything.
cudaError_t LaunchMlaDecode(const MlaDecodeParams& params, cudaStream_t stream);

// Blocks of the attention kernel one SM holds at once, for choosing num_splits: (queries x head
// groups of 16 x splits) blocks fill the GPU in one wave when they are at most SMs x this. (A grid
// of at most one block an SM runs in larger blocks, one an SM; this counts the smaller ones.)
cudaError_t MlaDecodeResidentBlocks(int kv_lora_rank, int rope_dim, int* blocks_per_sm);

// num_splits for `queries` queries of `heads` heads whose longest context is `max_context` tokens
// (0: not known), on a GPU that holds `resident_blocks` attention blocks at once (SMs x
// MlaDecodeResidentBlocks), with split workspace for `max_pairs` (query, split) pairs: enough to fill
// one wave of blocks, or for batches past one wave unsplit (past half of one at contexts over 2048
// tokens), the splits that fill the last wave best for the merge they cost.
int MlaDecodeSplits(int queries, int heads, int64_t max_context, int64_t resident_blocks, int64_t max_pairs);

}  // namespace cohort::kernels
