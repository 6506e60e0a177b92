// MLA attention over the compressed latent cache, DeepSeek's decode form: kv_b_proj's key half has
// been absorbed into the query (q_latent = q_nope . W_uk per head) and its value half is applied
// after the attention (o = o_latent . W_uv^T; by this launch's merge when value_weights is set),
// so attention reads only the cache: one latent row (kv_lora_rank values) plus one rope key
// (qk_rope_head_dim values) per token, shared by all heads.
//
// Each query attends to the first `context` tokens of its sequence, read through the sequence's
// block table; a query may be a decode token or a prefill token (causal by position). The work is a
// list of items planned on the host (MlaDecodePlanner), one block each per group of 16 heads (or, in a
// packed plan, several one after another on one block): a range of a query's context tiles, with
// what the block needs to find them. A query cut into several
// items has each write a partial result, and a second kernel of the same launch merges them
// (flash-decoding), so a small batch still fills the GPU, and the long contexts of a batch whose
// contexts differ are spread over many blocks instead of holding up the step on a few.
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
#include <vector>

namespace cohort::kernels {

// Tokens of a cache tile, the unit a work item's range counts in.
inline constexpr int kMlaTileTokens = 32;

// One block's share of the attention (for each group of 16 heads): tiles [tile_begin, tile_end) of
// query `query`'s context. partial < 0: the share is the query's whole context and is written to
// `out`; else it is written to row `partial` of the split workspace for the merge. 32 bytes, two
// loads side by side: the block's first cache row is two dependent loads from here.
struct alignas(16) MlaWorkItem {
  int32_t query = -1;  // -1: a slot with no work
  int32_t tile_begin = 0;
  int32_t tile_end = 0;  // > tile_begin
  int32_t partial = -1;
  int32_t context = 0;       // tokens the query attends to: positions [0, context) of its sequence
  int32_t table_offset = 0;  // where its sequence's block table starts in block_tables
  // In launches with room for uneven plans, a block may take several items one after another (a
  // packed plan): its own and the `more` after it, whose own blocks leave at once (`taken`).
  int32_t more = 0;
  int32_t taken = 0;
};

// A query cut into several items: the merge sums its partial rows [first_partial, + splits).
struct alignas(16) MlaMergeRow {
  int32_t query = -1;  // -1: a row with nothing to merge
  int32_t first_partial = 0;
  int32_t splits = 0;
  int32_t unused = 0;
};

// What an attention launch is sized for, fixed when a decode graph is captured; each step's work is
// planned into it (MlaDecodePlanner).
struct MlaDecodeShape {
  int queries = 0;  // rows of q_latent, q_rope and out
  int heads = 0;
  int splits = 1;      // items a query's context is cut into unless the step is planned otherwise
  int max_splits = 1;  // partials a merge row sums at once (the merge's width); 1: no merge
  // Room for uneven plans (MlaDecodeShapeFor): a merge row may hold more than max_splits partials,
  // which the merge takes in rounds.
  bool uneven = false;
  int work_slots = 0;  // work items the launch has blocks for (per group of 16 heads)
  int merge_rows = 0;  // queries the merge can take
  int64_t resident_blocks = 0;  // attention blocks the GPU holds at once
  int64_t max_partials = 0;     // rows of the split workspace
};

struct MlaDecodeParams {
  const __nv_bfloat16* q_latent = nullptr;  // [queries, heads, kv_lora_rank]
  // Element (q, h, i) at q_rope[q * q_rope_row_stride + h * q_rope_head_stride + i]. Both query
  // pointers 16-byte aligned, both strides multiples of 8.
  const __nv_bfloat16* q_rope = nullptr;
  int64_t q_rope_row_stride = 0;
  int q_rope_head_stride = 0;
  const __nv_bfloat16* cache = nullptr;   // one layer: [blocks, block_size, kv_lora_rank + qk_rope_head_dim]
  const int32_t* block_tables = nullptr;  // every sequence's block table, concatenated
  int block_size = 0;
  int heads = 0;
  int kv_lora_rank = 0;
  int rope_dim = 0;
  float softmax_scale = 1.0f;
  // The step's plan (MlaDecodePlanner), read on the device: shape.work_slots items and
  // shape.merge_rows merge rows (16-byte aligned).
  MlaDecodeShape shape;
  const MlaWorkItem* work = nullptr;
  const MlaMergeRow* merges = nullptr;
  // At least the most tokens any one sequence has in this step (1 in a decode step), or 0. A query's
  // cache rows below its context - step_tokens_bound were written by earlier steps, so those
  // of its first tile are copied before the wait for the kernel that writes this step's rows (the
  // copy overlaps that kernel); 0: every row is copied after the wait.
  int step_tokens_bound = 0;
  __nv_bfloat16* out = nullptr;  // [queries, heads, kv_lora_rank]
  // Workspace when shape.max_splits > 1 (MlaSplitWorkspaceFloats of shape.max_partials rows).
  float* partial_out = nullptr;  // [partial rows, heads, kv_lora_rank]
  float* partial_lse = nullptr;  // [partial rows, heads]

  // Optional, with shape.max_splits > 1: the merge also applies kv_b_proj's value half, and
  // writes attn[q, h, i] = sum over j of bf16(o_latent[q, h, j]) * W_uv[h][i, j] (fp32, rounded to
  // bf16) for i < v_head_dim instead of `out` (one launch instead of a product after it; for few
  // queries, since every block of a head merges its row again). W_uv[h] is the [v_head_dim,
  // kv_lora_rank] matrix at value_weights + h * value_head_stride, 16-byte aligned.
  const __nv_bfloat16* value_weights = nullptr;
  int64_t value_head_stride = 0;
  int v_head_dim = 0;
  __nv_bfloat16* attn = nullptr;  // [queries, heads, v_head_dim]
};

// Bytes of a launch's plan: its merge rows and work items (16-byte aligned each).
inline int64_t MlaPlanBytes(const MlaDecodeShape& shape) {
  return int64_t{shape.merge_rows} * sizeof(MlaMergeRow) + int64_t{shape.work_slots} * sizeof(MlaWorkItem);
}

// Floats of workspace (partial_out and partial_lse together) for `partials` partial rows.
int64_t MlaSplitWorkspaceFloats(int64_t partials, int heads, int kv_lora_rank);

// Runs the attention (and the merge when shape.max_splits > 1 or value weights are set). Launched
// as programmatic dependents (kernels/pdl.cuh): they wait for the stream's earlier kernels before
// reading anything but the plan and the step inputs (positions, block tables).
cudaError_t LaunchMlaDecode(const MlaDecodeParams& params, cudaStream_t stream);

// Blocks of the attention kernel one SM holds at once, for choosing splits: (queries x head groups
// of 16 x splits) blocks fill the GPU in one wave when they are at most SMs x this. (A grid of at
// most one block an SM runs in larger blocks, one an SM; this counts the smaller ones.)
cudaError_t MlaDecodeResidentBlocks(int kv_lora_rank, int rope_dim, int* blocks_per_sm);

// Items to cut each query's context into (the even plan's), for `queries` queries of `heads` heads
// whose longest context is `max_context` tokens (0: not known), on a GPU that holds
// `resident_blocks` attention blocks at once (SMs x MlaDecodeResidentBlocks), with split workspace
// for `max_pairs` (query, split) pairs: enough to fill one wave of blocks, or for batches past one
// wave unsplit (past half of one at contexts over 2048 tokens), the splits that fill the last wave
// best for the merge they cost.
int MlaDecodeSplits(int queries, int heads, int64_t max_context, int64_t resident_blocks, int64_t max_pairs);

// The launch for `queries` queries of `heads` heads whose contexts are cut into `splits` items each
// by default (MlaDecodeSplits), on a GPU that holds `resident_blocks` attention blocks at once, with
// `max_partials` rows of split workspace: exactly the even plan's (!uneven), or with room for an
// uneven one (a wave of items more, and a merge for every query where the even plan cuts them all,
// else for as many as a wave holds items, taking a row's partials in rounds). The room costs a little
// in every step (a wider merge, or one where the even plan has none), so a CUDA graph of each is
// worth having.
MlaDecodeShape MlaDecodeShapeFor(int queries, int heads, int splits, int64_t resident_blocks, int64_t max_partials,
                                 bool uneven);

// Plans each step's attention on the host: Choose decides the plan, Write lays it out for the
// launch. Keeps its scratch between steps, so that planning allocates nothing once the largest
// step has been planned.
class MlaDecodePlanner {
 public:
  // Query q < shape.queries attends to positions [0, positions[q]]. The even plan cuts each query's
  // context into shape.splits items of equal tiles, so a batch of equal contexts runs as
  // MlaDecodeSplits chose. When the contexts differ so much that the longest queries' items would
  // hold up the step (one long request in a batch of short ones, or a batch of contexts spread
  // wide), an uneven plan cuts every query into items of one common size instead: the size whose
  // items end soonest, block by block, with the merge they cost (MlaDecodeSplits' measure), if that
  // beats the even plan and fits `shape` (a launch with room for uneven plans). Or a packed plan:
  // every block a wave's share of all the tiles (at least two), taken across query boundaries, where
  // that ends sooner still (a second wave of items of one size, equal contexts past a wave, or even
  // items that leave part of a wave idle: one query of 32768 tokens in 64 splits, 96 queries of 4096
  // in two). Every plan hands out the longest queries' items first.
  // every_query_merged: each query goes through the merge (value weights applied there), even when
  // it is one item. Returns whether the plan is uneven or packed: then it needs `shape`; an even one
  // runs in the launch without room.
  bool Choose(const MlaDecodeShape& shape, const int32_t* positions, bool every_query_merged);

  // Writes the chosen plan into `shape`'s work items and merge rows (all shape.work_slots items and
  // shape.merge_rows rows), the sequence of query q's block table starting at table_offsets[q]
  // (positions as given to Choose). `shape` has the splits Choose was given. Returns false, writing
  // nothing, where the plan does not fit it.
  bool Write(const MlaDecodeShape& shape, const int32_t* positions, const int32_t* table_offsets, MlaWorkItem* work,
             MlaMergeRow* merges) const;

 private:
  // What a plan asks of a launch.
  struct Tally {
    int64_t items = 0, cut = 0, partials = 0;
  };
  // Tiles an item of query q holds at most: `chunk`, or (chunk 0, the even plan) its tiles over splits_.
  int64_t ItemTiles(int q, int64_t chunk) const { return chunk > 0 ? chunk : (tiles_[q] + splits_ - 1) / splits_; }
  Tally Count(int64_t chunk) const;
  // A packed plan of `budget` tiles a block (each block takes the next pieces of the queries, longest
  // first, up to its budget): what it asks of a launch, and in `end` when its last block ends in tile
  // times, an item after a block's first counted kPackedItemTiles late.
  Tally Pack(int64_t budget, double& end) const;
  static bool Fits(const MlaDecodeShape& shape, const Tally& t) {
    return t.items <= shape.work_slots && t.cut <= shape.merge_rows && t.partials <= shape.max_partials;
  }

  std::vector<int64_t> tiles_;  // of each query
  std::vector<int64_t> ends_;   // of a simulated plan: blocks free from each tile time on
  std::vector<int> order_;      // of the queries: by tiles, longest first (every plan's order)
  std::vector<int64_t> candidates_;  // item sizes an uneven plan may take
  int splits_ = 1;
  bool every_query_merged_ = false;
  int64_t chunk_ = 0;   // the chosen plan's item tiles; 0: the even plan
  int64_t budget_ = 0;  // > 0: the chosen plan is packed, this many tiles a block
  Tally chosen_;        // what the chosen plan asks of a launch
};

}  // namespace cohort::kernels
