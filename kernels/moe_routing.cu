// Gate (expert choice), align (rows grouped by expert, GEMM tile map) and combine of the MoE path.
// Contracts in moe.h.
#include <cuda_bf16.h>

#include <climits>
#include <cstdint>
#include <type_traits>

#include "kernels/bf16.cuh"
#include "kernels/moe.h"
#include "kernels/pdl.cuh"
#include "kernels/reduce.cuh"
#include "kernels/rms_norm.cuh"

namespace cohort {
namespace {

using kernels::Bf16x8ToFloat;
using kernels::LaunchPdl;
using kernels::PdlLaunchDependents;
using kernels::PdlWait;

constexpr unsigned kFullMask = 0xffffffffu;

// ------------------------------------------------------------------------------------------- gate

constexpr int kGateWarps = 4;

// A gate's warp holds the logits of experts lane, lane + 32, ...: kPerLane of them a lane. The route of
// a few tokens (MoeRouteWarpKernel) is compiled for two sizes, so that a model of up to 64 experts
// (DeepSeek-V2-Lite) does not run the per-lane loops of one of 256 (V3), predicated off: 30 KB of
// code instead of 47. It sits on the decode step's critical path, and its one block usually starts on
// an SM whose instruction cache holds other kernels' code (docs/cuda_backend_rounds.md, fifteenth round).
constexpr int kGateSmallPerLane = 2;
constexpr int kGatePerLane = kMoeMaxExperts / 32;
static_assert(kGateSmallPerLane <= kGatePerLane);

// The CPU's order: larger value first, then lower expert index.
__device__ __forceinline__ bool Precedes(float a, int ia, float b, int ib) {
  return a > b || (a == b && ia < ib);
}

// A float's bits as an unsigned that orders like the float (not NaN; -0 counts as +0, equal as they
// compare).
__device__ __forceinline__ unsigned OrderedBits(float v) {
  const unsigned bits = __float_as_uint(v == 0.0f ? 0.0f : v);
  return (bits & 0x80000000u) != 0 ? ~bits : bits | 0x80000000u;
}

// Whether `token` is a padding row: at or past its group's count in num_valid (one count for all
// tokens when group_rows is 0, else one per group of group_rows consecutive tokens).
__device__ __forceinline__ bool IsPadding(int64_t token, const int32_t* __restrict__ num_valid, int64_t group_rows) {
  if (num_valid == nullptr) return false;
  if (group_rows == 0) return token >= *num_valid;
  const int64_t group = token / group_rows;
  return token - group * group_rows >= num_valid[group];
}

struct GateArgs {
  const float* logits;  // [T, E], or nullptr with a fold
  const float* bias;
  int64_t num_tokens;
  const int32_t* num_valid;
  int64_t valid_group_rows;
  MoeGateParams params;
  int32_t* topk_ids;
  float* topk_weights;
  MoeRouterFold fold;  // from_attention null: no fold
};

// Whether `token` is a padding row (IsPadding); if so, gives it ids -1 and weights 0: ids outside
// [0, E) get no row in the align, so padding rows of a captured graph read no expert. Called by a
// whole warp.
__device__ __forceinline__ bool GatePadding(const GateArgs& g, int64_t token) {
  if (!IsPadding(token, g.num_valid, g.valid_group_rows)) return false;
  const int lane = threadIdx.x & 31;
  if (lane < g.params.top_k) {
    g.topk_ids[token * g.params.top_k + lane] = -1;
    g.topk_weights[token * g.params.top_k + lane] = 0.0f;
  }
  return true;
}

// A token's logits from a folded router's parts (MoeRouterFold), a warp's lane holding experts lane,
// lane + 32, ...: the part over the layer's input with the input norm's scale, which the input
// projection and the input norm wrote, and the part over the attention, o_proj's, each loaded when
// the caller knows it is ready; then, in explicitly rounded steps (a correctly rounded reciprocal, one
// fma, one product), logit = fma(from_input, 1 / inv_rms_in, from_attention) * inv_rms_post.
template <int kPerLane>
struct FoldedLogits {
  float from_input[kPerLane];
  float from_attention[kPerLane];
  float rms_in;

  __device__ __forceinline__ void LoadInput(const MoeRouterFold& f, int64_t token, int num_experts) {
    const int lane = threadIdx.x & 31;
    const float* row = f.from_input + token * f.input_stride;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) from_input[i] = lane + 32 * i < num_experts ? row[lane + 32 * i] : 0.0f;
    rms_in = __frcp_rn(f.inv_rms_in[token]);
  }
  __device__ __forceinline__ void LoadAttention(const MoeRouterFold& f, int64_t token, int num_experts) {
    const int lane = threadIdx.x & 31;
    const float* row = f.from_attention + token * num_experts;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      from_attention[i] = lane + 32 * i < num_experts ? row[lane + 32 * i] : 0.0f;
    }
  }
  __device__ __forceinline__ void Logits(float inv_rms_post, int num_experts, float (&logit)[kPerLane]) const {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      logit[i] = lane + 32 * i < num_experts
                     ? __fmul_rn(__fmaf_rn(from_input[i], rms_in, from_attention[i]), inv_rms_post)
                     : -INFINITY;
    }
  }
};

// Chooses the experts of a token that is not padding from its logits (lane holding experts lane,
// lane + 32, ...; -inf past num_experts); called by a whole warp. `choice_smem` is this warp's scratch
// of kMoeMaxExperts floats. Returns, to lane r < top_k, the id written for slot r (-1 to the others).
// Needs num_experts <= 32 * kPerLane.
template <int kPerLane>
__device__ __forceinline__ int ChooseExperts(const GateArgs& g, int64_t token, const float (&logit)[kPerLane],
                                             float* choice_smem) {
  const MoeGateParams& p = g.params;
  int32_t* __restrict__ topk_ids = g.topk_ids;
  float* __restrict__ topk_weights = g.topk_weights;
  const float* __restrict__ bias = g.bias;
  const int lane = threadIdx.x & 31;
  const int num_experts = p.num_experts;
  float score[kPerLane];
  float choice[kPerLane];
  if (p.scoring == MoeScoring::kSigmoid) {
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) score[i] = 1.0f / (1.0f + expf(-logit[i]));
  } else {
    float max = -INFINITY;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) max = fmaxf(max, logit[i]);
    max = kernels::WarpMax(max);
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      score[i] = lane + 32 * i < num_experts ? expf(logit[i] - max) : 0.0f;
      sum += score[i];
    }
    sum = kernels::WarpSum(sum);
    // One correctly rounded reciprocal instead of a division per expert (whose slow path made ptxas
    // spill): the scores keep the order of their exponentials, and differ from the CPU's by an ulp.
    const float inverse_sum = __frcp_rn(sum);
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) score[i] *= inverse_sum;
  }
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int e = lane + 32 * i;
    choice[i] = (bias != nullptr && e < num_experts) ? score[i] + bias[e] : score[i];
  }

  if (p.method != MoeTopkMethod::kGreedy && p.topk_group < p.n_group) {
    const int per_group = num_experts / p.n_group;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int e = lane + 32 * i;
      if (e < num_experts) choice_smem[e] = choice[i];
    }
    __syncwarp();
    float group_score = -INFINITY;
    if (lane < p.n_group) {
      const float* group = &choice_smem[lane * per_group];
      float best = -INFINITY;
      float second = -INFINITY;
      for (int i = 0; i < per_group; ++i) {
        const float v = group[i];
        if (v > best) {
          second = best;
          best = v;
        } else if (v > second) {
          second = v;
        }
      }
      group_score = p.method == MoeTopkMethod::kNoAuxTc ? best + second : best;
    }
    // A group is kept when fewer than topk_group groups precede it.
    int rank = 0;
#pragma unroll
    for (int g = 0; g < kMoeMaxGroups; ++g) {
      const float other = __shfl_sync(kFullMask, group_score, g);
      if (g < p.n_group && Precedes(other, g, group_score, lane)) ++rank;
    }
    const unsigned kept = __ballot_sync(kFullMask, lane < p.n_group && rank < p.topk_group);
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int e = lane + 32 * i;
      if (e < num_experts && !((kept >> (e / per_group)) & 1u)) choice[i] = -INFINITY;
    }
  }

  // k rounds of a warp arg-max; `taken` marks this lane's experts already chosen (or absent). Each
  // round takes two warp reductions (redux.sync) instead of three shuffles at each of five levels:
  // the largest value as ordered bits, then the lowest expert index among the lanes holding it.
  unsigned taken = 0;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    if (lane + 32 * i >= num_experts) taken |= 1u << i;
  }
  int chosen[kMoeMaxTopK];
  float weight[kMoeMaxTopK];
#pragma unroll
  for (int r = 0; r < kMoeMaxTopK; ++r) {
    chosen[r] = 0;
    weight[r] = 0.0f;
    if (r >= p.top_k) continue;
    // This lane's best untaken expert in the CPU's order (its experts come in increasing index).
    float best_value = -INFINITY;
    int best_expert = INT_MAX;
    float best_score = 0.0f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int e = lane + 32 * i;
      if (!((taken >> i) & 1u) && Precedes(choice[i], e, best_value, best_expert)) {
        best_value = choice[i];
        best_expert = e;
        best_score = score[i];
      }
    }
    // A lane with no expert left (key 0) loses to any lane with one, even one at -inf.
    const unsigned key = best_expert == INT_MAX ? 0u : OrderedBits(best_value);
    const unsigned best_key = __reduce_max_sync(kFullMask, key);
    const int expert = __reduce_min_sync(kFullMask, key == best_key ? best_expert : INT_MAX);
    best_score = __shfl_sync(kFullMask, best_score, expert & 31);  // that lane's own best
    if ((expert & 31) == lane) taken |= 1u << (expert >> 5);
    chosen[r] = expert;
    weight[r] = best_score;
  }

  // Same order of operations as the CPU: sequential sum, normalise, scale. Lane r < top_k does slot r:
  // one division a lane, not one per slot.
  float sum = 0.0f;
  float w = 0.0f;
  int mine = -1;
#pragma unroll
  for (int r = 0; r < kMoeMaxTopK; ++r) {
    if (r < p.top_k) sum += weight[r];
    if (r == lane) {
      w = weight[r];
      mine = chosen[r];
    }
  }
  if (lane >= p.top_k) return -1;
  if (p.norm_topk_prob) w /= sum + 1e-20f;
  w *= p.routed_scaling_factor;
  topk_ids[token * p.top_k + lane] = mine;
  topk_weights[token * p.top_k + lane] = w;
  return mine;
}

// Chooses the experts of one token from the stored logits or a fold's parts (GateArgs); called by a
// whole warp. `choice_smem` is this warp's scratch of kMoeMaxExperts floats. A padding token gets ids
// -1 and weights 0 (GatePadding). Returns, to lane r < top_k, the id written for slot r.
template <int kPerLane>
__device__ __forceinline__ int GateToken(const GateArgs& g, int64_t token, float* choice_smem) {
  if (GatePadding(g, token)) return -1;
  const int num_experts = g.params.num_experts;
  float logit[kPerLane];
  if (g.fold.from_attention != nullptr) {
    FoldedLogits<kPerLane> folded;
    folded.LoadInput(g.fold, token, num_experts);
    folded.LoadAttention(g.fold, token, num_experts);
    folded.Logits(g.fold.inv_rms_post[token], num_experts, logit);
  } else {
    const int lane = threadIdx.x & 31;
    const float* x = g.logits + token * num_experts;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) logit[i] = lane + 32 * i < num_experts ? x[lane + 32 * i] : -INFINITY;
  }
  return ChooseExperts<kPerLane>(g, token, logit, choice_smem);
}

// One warp per token.
__global__ void __launch_bounds__(kGateWarps * 32) MoeGateKernel(const GateArgs a) {
  __shared__ float choice_smem[kGateWarps][kMoeMaxExperts];
  PdlWait();  // the router logits (or a fold's parts and scales) come from earlier kernels
  PdlLaunchDependents();
  const int warp = threadIdx.x >> 5;
  const int64_t token = static_cast<int64_t>(blockIdx.x) * kGateWarps + warp;
  if (token >= a.num_tokens) return;  // whole warps only; no block barrier in GateToken
  GateToken<kGatePerLane>(a, token, choice_smem[warp]);
}

// ------------------------------------------------------------------------------------------ align

constexpr int kAlignThreads = 1024;
constexpr int kAlignWarps = kAlignThreads / 32;

// Exclusive prefix sum of one value per thread over the whole block, in thread order; *total gets the
// sum. Every thread of the block calls it.
__device__ int BlockExclusiveScan(int value, int* warp_sums, int* total) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int inclusive = kernels::WarpInclusiveSum(value);
  if (lane == 31) warp_sums[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    const int sum = warp_sums[lane];
    const int warp_inclusive = kernels::WarpInclusiveSum(sum);
    warp_sums[lane] = warp_inclusive - sum;
    if (lane == 31) *total = warp_inclusive;
  }
  __syncthreads();
  const int result = warp_sums[warp] + inclusive - value;
  __syncthreads();  // warp_sums is reused by the next scan
  return result;
}

struct AlignArgs {
  const int32_t* topk_ids;
  int32_t num_pairs;  // T*k
  int32_t num_tokens;
  int32_t top_k;
  int32_t num_experts;
  int32_t first_expert;  // topk id of expert 0
  int32_t num_shared;
  int32_t tile_rows;
  int32_t max_tiles;
  int32_t* expert_offsets;
  int32_t* row_token;
  int32_t* slot_row;
  int32_t* tile_expert;
  int32_t* tile_row;
  int32_t* num_tiles;
  int32_t* item_counters;
  int32_t* experts_used;
  int32_t* chunk_counts;
};

// The shared memory of an align block.
struct AlignSmem {
  int warp_counts[kAlignWarps][kMoeMaxExperts];
  int first_row[kMoeMaxExperts];
  int warp_sums[32];
  int totals[3];  // routed rows, routed tiles, routed experts used
};

// The end of a routing, once the routed experts have their rows and tiles: shared expert s takes
// rows [routed_rows + s*T, + T), row routed_rows + s*T + t from token t, in shared_tiles tiles
// after the routed ones; then the tile count, the experts used, and the unused tiles up to
// max_tiles marked empty. Run by `threads` threads, this one numbered `tid`. The loops run once or a
// few times a thread: kept rolled, they take the warp route's code from 33 to 30 KB.
__device__ __forceinline__ void FinishRouting(const AlignArgs& p, int routed_rows, int routed_tiles,
                                              int routed_experts, int shared_tiles, int tid, int threads) {
  const int num_tokens = p.num_tokens;
  const int all_tiles = routed_tiles + p.num_shared * shared_tiles;
  if (tid <= p.num_shared) p.expert_offsets[p.num_experts + tid] = routed_rows + tid * num_tokens;
#pragma unroll 1
  for (int i = tid; i < p.num_shared * shared_tiles; i += threads) {
    const int s = i / shared_tiles;
    const int t = i - s * shared_tiles;
    p.tile_expert[routed_tiles + i] = p.num_experts + s;
    p.tile_row[routed_tiles + i] = routed_rows + s * num_tokens + t * p.tile_rows;
  }
#pragma unroll 1
  for (int i = tid; i < p.num_shared * num_tokens; i += threads) p.row_token[routed_rows + i] = i % num_tokens;
  if (tid == 0) {
    *p.num_tiles = all_tiles;
    p.item_counters[0] = 0;
    p.item_counters[1] = 0;
    if (p.experts_used != nullptr) atomicAdd(p.experts_used, routed_experts);
  }
#pragma unroll 1
  for (int t = all_tiles + tid; t < p.max_tiles; t += threads) {
    p.tile_expert[t] = -1;
    p.tile_row[t] = 0;
  }
}

// A warp walks its segment of (token, slot) pairs in rounds of 32, one pair a lane, and loads the ids
// of kAlignRoundsAtOnce rounds together: a block's 32 warps take at most 2048 pairs (kAlignChunkPairs),
// 64 a warp, so each pass waits for its ids once.
constexpr int kAlignRoundsAtOnce = 2;

// The ids, less first_expert, of pairs base + lane + 32 j of a segment ending at `end` (0 past it).
__device__ __forceinline__ void LoadAlignIds(const AlignArgs& p, int base, int end, int (&ids)[kAlignRoundsAtOnce]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int j = 0; j < kAlignRoundsAtOnce; ++j) {
    const int i = base + lane + 32 * j;
    ids[j] = i < end ? p.topk_ids[i] - p.first_expert : 0;
  }
}

// Calls visit(i, id, in_range) for each pair i of this warp's segment of [begin, end) (the w-th of
// kAlignWarps contiguous ones), round by round, the whole warp together: lane l takes pair base + l of
// each round, `id` its id less first_expert, `in_range` false past the segment's end (the last
// round's tail, or a whole round past it).
template <class Visit>
__device__ __forceinline__ void ForEachPairOfSegment(const AlignArgs& p, int begin, int end, Visit&& visit) {
  const int size = (end - begin + kAlignWarps - 1) / kAlignWarps;
  const int first = begin + static_cast<int>(threadIdx.x >> 5) * size, last = min(end, first + size);
  const int lane = threadIdx.x & 31;
  for (int base = first; base < last; base += 32 * kAlignRoundsAtOnce) {
    int ids[kAlignRoundsAtOnce];
    LoadAlignIds(p, base, last, ids);
#pragma unroll
    for (int j = 0; j < kAlignRoundsAtOnce; ++j) {
      const int i = base + lane + 32 * j;
      visit(i, ids[j], i < last);
    }
  }
}

// How the rows of routed experts are placed. Each warp owns a contiguous segment of a block's
// (token, slot) pairs. Pass 1 (CountPairs) counts per (warp, expert) and turns the counts into each
// (warp, expert)'s rows in earlier segments; with the rows of the expert before the block's pairs
// (first_row), pass 2 (PlacePairs) places each pair at that row plus its rank among the warp's equal
// ids (__match_any_sync), walking the segment in order, so rows within an expert follow the pair order
// whatever the atomics did. Shared experts need no counting: each takes the next T rows, one per
// token in token order. Run by whole blocks of kAlignThreads threads; `smem` is the block's AlignSmem.

// Pass 1 over the block's pairs [begin, end); returns, to thread e < E, the block's rows of expert e.
__device__ int CountPairs(const AlignArgs& p, int begin, int end, AlignSmem& smem) {
  auto& warp_counts = smem.warp_counts;
  const int tid = threadIdx.x, warp = tid >> 5;
  for (int i = tid; i < kAlignWarps * kMoeMaxExperts; i += kAlignThreads) (&warp_counts[0][0])[i] = 0;
  __syncthreads();
  ForEachPairOfSegment(p, begin, end, [&](int, int id, bool in_range) {
    if (in_range && id >= 0 && id < p.num_experts) atomicAdd(&warp_counts[warp][id], 1);
  });
  __syncthreads();
  int count = 0;
  if (tid < p.num_experts) {
    for (int w = 0; w < kAlignWarps; ++w) {
      const int c = warp_counts[w][tid];
      warp_counts[w][tid] = count;  // now: rows of this expert in earlier segments
      count += c;
    }
  }
  return count;
}

// Pass 2 over the block's pairs [begin, end), once smem.first_row holds, for each expert, its rows
// before the block's pairs, and a barrier has passed since CountPairs.
__device__ void PlacePairs(const AlignArgs& p, int begin, int end, AlignSmem& smem) {
  auto& warp_counts = smem.warp_counts;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned lanes_before = (1u << lane) - 1u;
  ForEachPairOfSegment(p, begin, end, [&](int i, int id, bool in_range) {
    const bool valid = in_range && id >= 0 && id < p.num_experts;
    const unsigned peers = __match_any_sync(kFullMask, valid ? id : -1);
    if (valid) {
      const int row = smem.first_row[id] + warp_counts[warp][id] + __popc(peers & lanes_before);
      p.row_token[row] = i / p.top_k;
      p.slot_row[i] = row;
    } else if (in_range) {
      p.slot_row[i] = -1;
    }
    __syncwarp();
    if (valid && (peers >> lane) == 1u) warp_counts[warp][id] += __popc(peers);  // the last peer
    __syncwarp();
  });
}

// The experts' rows and tiles from each expert's row count (`count` of thread e < E): the scans, the
// first rows of the experts in smem.first_row (plus `rows_before_block`, the expert's rows in earlier
// blocks' pairs), and, with `write`, the offsets, the tile map and FinishRouting. Ends in a barrier.
__device__ void LayOutExperts(const AlignArgs& p, int count, int rows_before_block, bool write, AlignSmem& smem) {
  const int tid = threadIdx.x;
  int* totals = smem.totals;
  const int tiles = (count + p.tile_rows - 1) / p.tile_rows;
  const int rows_before = BlockExclusiveScan(count, smem.warp_sums, &totals[0]);
  const int tiles_before = BlockExclusiveScan(tiles, smem.warp_sums, &totals[1]);
  BlockExclusiveScan(count > 0 ? 1 : 0, smem.warp_sums, &totals[2]);  // ends in a barrier: totals visible
  if (tid < p.num_experts) smem.first_row[tid] = rows_before + rows_before_block;
  if (write) {
    if (tid < p.num_experts) {
      p.expert_offsets[tid] = rows_before;
      for (int t = 0; t < tiles; ++t) {
        p.tile_expert[tiles_before + t] = tid;
        p.tile_row[tiles_before + t] = rows_before + t * p.tile_rows;
      }
    }
    const int shared_tiles = (p.num_tokens + p.tile_rows - 1) / p.tile_rows;  // per shared expert
    FinishRouting(p, totals[0], totals[1], totals[2], shared_tiles, tid, kAlignThreads);
  }
  __syncthreads();
}

// The whole align in one block.
__device__ void AlignBlock(const AlignArgs& p, AlignSmem& smem) {
  const int count = CountPairs(p, 0, p.num_pairs, smem);
  LayOutExperts(p, count, 0, /*write=*/true, smem);
  PlacePairs(p, 0, p.num_pairs, smem);
}

__global__ void __launch_bounds__(kAlignThreads) MoeAlignKernel(const AlignArgs p) {
  __shared__ AlignSmem smem;
  PdlWait();  // before topk_ids are read and the routing buffers (read by the last layer) written
  PdlLaunchDependents();
  AlignBlock(p, smem);
}

// More than kAlignChunkPairs pairs (prefill, large decode batches) are aligned by two launches of a
// block per chunk of that many pairs, so that the stores of row_token, scattered over the rows, leave
// from many SMs (one block took 38 us a layer at 4096 tokens, H200). The first counts each chunk's
// rows per expert; the second sums the counts of every chunk and places its chunk's pairs after those
// of the chunks before it, which gives the rows the one-block align gives.
constexpr int kAlignChunkPairs = 2048;

int64_t AlignChunks(int64_t num_pairs) { return (num_pairs + kAlignChunkPairs - 1) / kAlignChunkPairs; }

__global__ void __launch_bounds__(kAlignThreads) MoeAlignCountKernel(const AlignArgs p) {
  __shared__ AlignSmem smem;
  PdlWait();  // the ids come from the gate
  PdlLaunchDependents();
  const int begin = static_cast<int>(blockIdx.x) * kAlignChunkPairs;
  const int count = CountPairs(p, begin, min(p.num_pairs, begin + kAlignChunkPairs), smem);
  if (static_cast<int>(threadIdx.x) < p.num_experts) {
    p.chunk_counts[static_cast<int64_t>(blockIdx.x) * p.num_experts + threadIdx.x] = count;
  }
}

__global__ void __launch_bounds__(kAlignThreads) MoeAlignPlaceKernel(const AlignArgs p) {
  __shared__ AlignSmem smem;
  PdlWait();  // the counts come from MoeAlignCountKernel; the routing buffers were read by the last layer
  PdlLaunchDependents();
  const int tid = threadIdx.x, chunk = blockIdx.x;
  int count = 0, before = 0;  // expert tid's rows in all chunks, and in those before this one
  if (tid < p.num_experts) {
    for (int c = 0; c < static_cast<int>(gridDim.x); ++c) {
      const int rows = p.chunk_counts[static_cast<int64_t>(c) * p.num_experts + tid];
      count += rows;
      before += c < chunk ? rows : 0;
    }
  }
  const int begin = chunk * kAlignChunkPairs, end = min(p.num_pairs, begin + kAlignChunkPairs);
  LayOutExperts(p, count, before, /*write=*/chunk == 0, smem);
  CountPairs(p, begin, end, smem);
  __syncthreads();  // the warps' offsets written
  PlacePairs(p, begin, end, smem);
}

static_assert(kMoeFusedRouteTokens <= kAlignWarps, "one warp gates one token");

// Gate and align of up to kMoeFusedRouteTokens tokens in one block: warp t chooses token t's experts,
// then the block aligns them. The gate's scratch shares memory with the align's counts.
__global__ void __launch_bounds__(kAlignThreads) MoeRouteKernel(const GateArgs g, const AlignArgs p) {
  __shared__ union {
    float choice[kAlignWarps][kMoeMaxExperts];
    AlignSmem align;
  } smem;
  PdlWait();  // the router logits (or a fold's parts and scales) come from earlier kernels
  PdlLaunchDependents();
  const int warp = threadIdx.x >> 5;
  if (warp < g.num_tokens) {
    GateToken<kGatePerLane>(g, warp, smem.choice[warp]);
  }
  __syncthreads();  // topk_ids (global) visible to the block, the scratch free
  AlignBlock(p, smem.align);
}

// Gate and align of 1..kMoeWarpRouteTokens tokens (the decode steps of one to a few sequences, where
// the route sits on the critical path between the router product and the expert products): warp t
// gates token t, then warp 0 alone aligns the at most 32 (token, slot) pairs, one a lane, with warp
// votes and shuffles: no block barrier past the one that hands it the ids, no counts in shared
// memory and no read of the ids back from global memory. Every expert that gets rows gets fewer than
// tile_rows (T <= 4 < 16), so one tile. Writes exactly what AlignBlock writes.
static_assert(kMoeWarpRouteTokens * kMoeMaxTopK <= 32, "one lane a (token, slot) pair");
static_assert(kMoeWarpRouteTokens <= 16, "an expert's rows fit one tile of the smallest tile_rows");
static_assert(kMoeMaxShared < 32, "one lane a shared expert (and one for the offset past them)");

// Warp 0's align of the route of 1..kMoeWarpRouteTokens tokens, from the chosen ids in pair_ids
// (shared memory, visible to warp 0: written before a block barrier, or by warp 0 itself).
template <int kPerLane>
__device__ __forceinline__ void WarpAlign(const AlignArgs& p, const int32_t* pair_ids) {
  const int lane = threadIdx.x & 31;
  const int num_experts = p.num_experts;
  const int num_pairs = p.num_pairs;
  const int id = lane < num_pairs ? pair_ids[lane] - p.first_expert : -1;
  const bool valid = lane < num_pairs && id >= 0 && id < num_experts;
  const unsigned peers = __match_any_sync(kFullMask, valid ? id : -1);
  const unsigned lanes_before = (1u << lane) - 1u;
  const bool first_of_expert = valid && (peers & lanes_before) == 0;
  const unsigned valid_lanes = __ballot_sync(kFullMask, valid);
  const unsigned first_lanes = __ballot_sync(kFullMask, first_of_expert);
  const int routed_rows = __popc(valid_lanes);
  const int routed_tiles = __popc(first_lanes);  // = routed experts that get rows

  // Rows of the experts below this pair's, and tiles (= experts with rows) below it; and for each of
  // this lane's experts e = lane + 32 i, the rows of the experts below e (expert_offsets).
  const int key = valid ? id : INT_MAX;
  int rows_below = 0;
  int tiles_below = 0;
  int offsets[kPerLane] = {};
  for (int q = 0; q < num_pairs; ++q) {
    const int other = __shfl_sync(kFullMask, key, q);
    rows_below += other < key;
    tiles_below += ((first_lanes >> q) & 1u) != 0 && other < key;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) offsets[i] += other < lane + 32 * i;  // INT_MAX: never below
  }
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    if (lane + 32 * i < num_experts) p.expert_offsets[lane + 32 * i] = offsets[i];
  }
  if (first_of_expert) {
    p.tile_expert[tiles_below] = id;
    p.tile_row[tiles_below] = rows_below;
  }
  if (valid) {
    const int row = rows_below + __popc(peers & lanes_before);
    p.row_token[row] = lane / p.top_k;
    p.slot_row[lane] = row;
  } else if (lane < num_pairs) {
    p.slot_row[lane] = -1;
  }

  FinishRouting(p, routed_rows, routed_tiles, routed_tiles, /*shared_tiles=*/1, lane, 32);
}

template <int kPerLane>
__global__ void __launch_bounds__(kMoeWarpRouteTokens * 32) MoeRouteWarpKernel(const GateArgs g, const AlignArgs p) {
  __shared__ int32_t pair_ids[kMoeWarpRouteTokens * kMoeMaxTopK];
  __shared__ float choice[kMoeWarpRouteTokens][kMoeMaxExperts];
  PdlWait();  // the router logits (or a fold's parts and scales) come from earlier kernels
  PdlLaunchDependents();
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  if (warp < p.num_tokens) {
    const int chosen = GateToken<kPerLane>(g, warp, choice[warp]);
    if (lane < p.top_k) pair_ids[warp * p.top_k + lane] = chosen;
  }
  __syncthreads();
  if (warp == 0) WarpAlign<kPerLane>(p, pair_ids);
}

// The route of one token with the post-attention norm before it (MoeRouteNorm): the block, the
// norm's threads, normalises the row as AddRmsNormKernel does (kernels/rms_norm.cuh), then warp 0
// gates the token with the row's scale as the fold's inv_rms_post, and aligns. Before the wait: the
// norm's weights, and what kernels two or more launches back wrote (the residual, the fold's part over
// the layer's input and the input norm's scale); after it only o_proj's outputs (delta and the fold's
// part over the attention).
//
// The block must fit on an SM beside o_proj's (the skinny GEMM's holds half an SM's registers), or it
// starts only when o_proj's blocks end. A first form of up to four tokens, every row's values in
// registers, took 206 registers a thread and made batch 1-4 steps 1-3% slower than the norm launch
// (H200); with the rows' loads out of branches it was 0.3% either side of it at batch 3-4, and one
// token is where the launch is worth saving. Rows of kRouteNormFullDim values (V2-Lite's) fill
// every thread of the norm (kFull): offsets are constants and no load has a bound check.
constexpr int kRouteNormFullThreads = 256;
constexpr int kRouteNormFullDim = kRouteNormFullThreads * kernels::kNormValuesPerThread;
static_assert(kernels::RmsNormThreads(kRouteNormFullDim) == kRouteNormFullThreads);
static_assert(kMoeRouteNormMaxDim == kernels::kNormMaxDim, "any row the norm launch takes");

template <int kPerLane, bool kFull>
__global__ void __launch_bounds__(kFull ? kRouteNormFullThreads : kernels::RmsNormThreads(kMoeRouteNormMaxDim))
    MoeNormRouteKernel(const GateArgs g, const AlignArgs p, const MoeRouteNorm n) {
  __shared__ int32_t pair_ids[kMoeMaxTopK];
  __shared__ float choice[kMoeMaxExperts];
  __shared__ float scratch[32];
  const int x = static_cast<int>(threadIdx.x);
  const int warp = x >> 5;
  const int num_experts = g.params.num_experts;
  using Slice = std::conditional_t<kFull, kernels::FullNormSlice, kernels::NormSlice>;
  Slice slice;
  if constexpr (kFull) {
    slice = {x, kRouteNormFullThreads};
  } else {
    slice = {x, static_cast<int>(blockDim.x), n.dim};
  }
  float w[kernels::kNormValuesPerThread];
  float v[kernels::kNormValuesPerThread];
  kernels::LoadNormWeights(n.weight, slice, w);
  kernels::LoadResidual(n.residual, slice, v);
  FoldedLogits<kPerLane> folded;
  if (warp == 0) folded.LoadInput(g.fold, 0, num_experts);
  PdlWait();  // delta and the fold's part over the attention come from o_proj
  PdlLaunchDependents();
  if (warp == 0) folded.LoadAttention(g.fold, 0, num_experts);
  const float sum_sq = kernels::BlockSum(kernels::AddDelta(n.delta, slice, v), scratch);
  const float inv_rms = kernels::InvRms(sum_sq, n.dim, n.eps);
  kernels::StoreNormRow(slice, v, w, inv_rms, n.residual, n.out);
  if (warp != 0) return;
  int chosen = -1;
  if (!GatePadding(g, 0)) {
    float logit[kPerLane];
    folded.Logits(inv_rms, num_experts, logit);
    chosen = ChooseExperts<kPerLane>(g, 0, logit, choice);
  }
  if ((x & 31) < p.top_k) pair_ids[x & 31] = chosen;
  __syncwarp();
  WarpAlign<kPerLane>(p, pair_ids);
}

// ---------------------------------------------------------------------------------------- combine

constexpr int kCombineThreads = 256;

template <typename Out>
struct CombineArgs {
  const __nv_bfloat16* expert_out;
  const float* topk_weights;
  const int32_t* slot_row;
  const int32_t* shared_first_row;  // &expert_offsets[E]: the first row of shared expert 0
  const __nv_bfloat16* add;         // add_count matrices [T, H], one after another; may alias a bf16 out
  Out* out;
  int64_t num_tokens;
  int32_t add_count;
  int32_t top_k;
  int32_t num_shared;
  int32_t hidden;
};

// Where a token's combine reads: its routed rows (-1: none) with their weights, and the first row of
// shared expert 0.
struct CombineSlots {
  int32_t row[kMoeMaxTopK];
  float weight[kMoeMaxTopK];
  int64_t shared_first_row;
};

template <typename Out>
__device__ __forceinline__ CombineSlots LoadCombineSlots(const CombineArgs<Out>& p, int64_t token) {
  CombineSlots slots;
#pragma unroll
  for (int j = 0; j < kMoeMaxTopK; ++j) {
    slots.row[j] = j < p.top_k ? p.slot_row[token * p.top_k + j] : -1;
    slots.weight[j] = j < p.top_k ? p.topk_weights[token * p.top_k + j] : 0.0f;
  }
  slots.shared_first_row = p.num_shared > 0 ? *p.shared_first_row : 0;
  return slots;
}

// acc = sum_j topk_weights[t, j] * expert_out[slot_row[t*k + j], col + i] + the shared experts' rows
// + each added matrix's [t, col + i], for the 8 values i of one chunk.
template <typename Out>
__device__ __forceinline__ void CombineChunk(const CombineArgs<Out>& p, const CombineSlots& slots, int64_t token,
                                             int col, float (&acc)[8]) {
  const int hidden = p.hidden;
#pragma unroll
  for (int e = 0; e < 8; ++e) acc[e] = 0.0f;
#pragma unroll
  for (int j = 0; j < kMoeMaxTopK; ++j) {
    if (slots.row[j] < 0) continue;
    float v[8];
    Bf16x8ToFloat(*reinterpret_cast<const uint4*>(p.expert_out + static_cast<int64_t>(slots.row[j]) * hidden + col), v);
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[e] = fmaf(slots.weight[j], v[e], acc[e]);
  }
  for (int s = 0; s < p.num_shared; ++s) {
    const int64_t row = slots.shared_first_row + s * p.num_tokens + token;
    float v[8];
    Bf16x8ToFloat(*reinterpret_cast<const uint4*>(p.expert_out + row * hidden + col), v);
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[e] += v[e];
  }
  for (int a = 0; a < p.add_count; ++a) {
    float v[8];
    Bf16x8ToFloat(*reinterpret_cast<const uint4*>(p.add + (a * p.num_tokens + token) * hidden + col), v);
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[e] += v[e];
  }
}

__device__ __forceinline__ void StoreChunk(const float (&acc)[8], __nv_bfloat16* out) {
  uint4 packed;
  __nv_bfloat162* pairs = reinterpret_cast<__nv_bfloat162*>(&packed);
#pragma unroll
  for (int i = 0; i < 4; ++i) pairs[i] = __floats2bfloat162_rn(acc[2 * i], acc[2 * i + 1]);
  *reinterpret_cast<uint4*>(out) = packed;
}

__device__ __forceinline__ void StoreChunk(const float (&acc)[8], float* out) {
  reinterpret_cast<float4*>(out)[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
  reinterpret_cast<float4*>(out)[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
}

// One thread per 8 consecutive outputs of one token.
template <typename Out>
__global__ void __launch_bounds__(kCombineThreads) MoeCombineKernel(const CombineArgs<Out> p) {
  PdlWait();  // the expert rows come from the down GEMM
  PdlLaunchDependents();
  const int chunks_per_token = p.hidden / 8;
  const int64_t total = p.num_tokens * chunks_per_token;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * kCombineThreads + threadIdx.x; c < total;
       c += static_cast<int64_t>(gridDim.x) * kCombineThreads) {
    const int64_t token = c / chunks_per_token;
    const int col = static_cast<int>(c - token * chunks_per_token) * 8;
    float acc[8];
    CombineChunk(p, LoadCombineSlots(p, token), token, col, acc);
    StoreChunk(acc, p.out + token * p.hidden + col);
  }
}

struct NormArgs {
  float* residual;
  const __nv_bfloat16* weight;
  float eps;
  __nv_bfloat16* out;
  float* inv_rms;  // or nullptr
};

// One block per token, one thread per 8 values: the combined row, rounded to bf16 as LaunchMoeCombine
// stores it, joins the residual, which is then normalised.
//
// The routing and the residual come from kernels at least two launches back (the route or align
// kernel, then the attention's norm), complete when this one starts (kernels/pdl.cuh), so they are
// read before the wait, with the norm's weights; only the expert rows and the added matrices after it.
__global__ void __launch_bounds__(1024) MoeCombineAddRmsNormKernel(const CombineArgs<__nv_bfloat16> p,
                                                                   const NormArgs n) {
  __shared__ float scratch[32];
  const int64_t token = blockIdx.x;
  const int col = threadIdx.x * 8;
  const bool active = col < p.hidden;
  const CombineSlots slots = LoadCombineSlots(p, token);
  float* h = n.residual + token * p.hidden + col;
  const float4 h0 = active ? *reinterpret_cast<const float4*>(h) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  const float4 h1 = active ? *reinterpret_cast<const float4*>(h + 4) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  const uint4 norm_weights = active ? *reinterpret_cast<const uint4*>(n.weight + col) : make_uint4(0, 0, 0, 0);
  PdlWait();  // the expert rows come from the down GEMM
  PdlLaunchDependents();
  float v[8] = {};
  float sum_sq = 0.0f;
  if (active) {
    CombineChunk(p, slots, token, col, v);
    const float before[8] = {h0.x, h0.y, h0.z, h0.w, h1.x, h1.y, h1.z, h1.w};
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      v[e] = before[e] + __bfloat162float(__float2bfloat16(v[e]));
      sum_sq += v[e] * v[e];
    }
    *reinterpret_cast<float4*>(h) = make_float4(v[0], v[1], v[2], v[3]);
    *reinterpret_cast<float4*>(h + 4) = make_float4(v[4], v[5], v[6], v[7]);
  }
  const float inv_rms = rsqrtf(kernels::BlockSum(sum_sq, scratch) / p.hidden + n.eps);
  if (n.inv_rms != nullptr && threadIdx.x == 0) n.inv_rms[token] = inv_rms;
  if (!active) return;
  float w[8];
  Bf16x8ToFloat(norm_weights, w);
  uint4 packed;
  __nv_bfloat162* pairs = reinterpret_cast<__nv_bfloat162*>(&packed);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    pairs[i] = __floats2bfloat162_rn(v[2 * i] * inv_rms * w[2 * i], v[2 * i + 1] * inv_rms * w[2 * i + 1]);
  }
  *reinterpret_cast<uint4*>(n.out + token * p.hidden + col) = packed;
}

bool Aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

int64_t Align4(int64_t ints) { return (ints + 3) / 4 * 4; }  // 16-byte boundaries

// The ints of a routing layout, in carving order.
struct RoutingLayout {
  int64_t offsets, rows, pairs, tiles, count, item_counters, chunk_counts;
  int64_t total() const {
    return Align4(offsets) + Align4(rows) + Align4(pairs) + 2 * Align4(tiles) + Align4(count) + Align4(item_counters) +
           Align4(chunk_counts);
  }
};

RoutingLayout Layout(int64_t num_tokens, int32_t top_k, int32_t num_experts, int32_t num_shared,
                     int32_t tile_rows) {
  const int64_t rows = num_tokens * (top_k + num_shared), pairs = num_tokens * top_k;
  const int64_t chunks = AlignChunks(pairs);
  return {num_experts + num_shared + 1, rows, pairs, MoeMaxTiles(rows, num_experts + num_shared, tile_rows), 1, 2,
          chunks > 1 ? chunks * num_experts : 0};
}

bool ValidRoutingShape(int64_t num_tokens, int32_t top_k, int32_t num_experts, int32_t num_shared) {
  return num_tokens >= 0 && top_k >= 1 && top_k <= kMoeMaxTopK && num_experts >= 1 &&
         num_experts <= kMoeMaxExperts && num_shared >= 0 && num_shared <= kMoeMaxShared &&
         num_tokens <= INT32_MAX / 2 / (top_k + num_shared);
}

bool ValidTileRows(int32_t tile_rows) { return tile_rows == 16 || tile_rows == 64 || tile_rows == 128; }

bool ValidGate(const MoeGateParams& p) {
  const bool grouped = p.method != MoeTopkMethod::kGreedy && p.topk_group < p.n_group;
  return p.num_experts >= 1 && p.num_experts <= kMoeMaxExperts && p.top_k >= 1 && p.top_k <= kMoeMaxTopK &&
         p.top_k <= p.num_experts && p.n_group >= 1 && p.n_group <= kMoeMaxGroups && p.num_experts % p.n_group == 0 &&
         p.topk_group >= 1 && p.topk_group <= p.n_group &&
         !(grouped && p.method == MoeTopkMethod::kNoAuxTc && p.num_experts / p.n_group < 2);
}

bool ValidRouting(const MoeRouting& r) {
  return ValidRoutingShape(r.num_tokens, r.top_k, r.num_experts, r.num_shared) && ValidTileRows(r.tile_rows) &&
         r.first_expert >= 0 && r.first_expert <= kMoeMaxExperts - r.num_experts && r.expert_offsets != nullptr && r.row_token != nullptr && r.slot_row != nullptr &&
         r.tile_expert != nullptr && r.tile_row != nullptr && r.num_tiles != nullptr && r.item_counters != nullptr &&
         (AlignChunks(r.num_pairs()) <= 1 || r.chunk_counts != nullptr);
}

AlignArgs MakeAlignArgs(const int32_t* topk_ids, const MoeRouting& routing, int32_t* experts_used) {
  AlignArgs args;
  args.topk_ids = topk_ids;
  args.num_pairs = static_cast<int32_t>(routing.num_pairs());
  args.num_tokens = static_cast<int32_t>(routing.num_tokens);
  args.top_k = routing.top_k;
  args.num_experts = routing.num_experts;
  args.first_expert = routing.first_expert;
  args.num_shared = routing.num_shared;
  args.tile_rows = routing.tile_rows;
  args.max_tiles = static_cast<int32_t>(routing.max_tiles());
  args.expert_offsets = routing.expert_offsets;
  args.row_token = routing.row_token;
  args.slot_row = routing.slot_row;
  args.tile_expert = routing.tile_expert;
  args.tile_row = routing.tile_row;
  args.num_tiles = routing.num_tiles;
  args.item_counters = routing.item_counters;
  args.experts_used = experts_used;
  args.chunk_counts = routing.chunk_counts;
  return args;
}

template <typename Out>
CombineArgs<Out> MakeCombineArgs(const __nv_bfloat16* expert_out, const float* topk_weights,
                                 const MoeRouting& routing, const MoeCombineAdd& add, int64_t hidden, Out* out) {
  CombineArgs<Out> args;
  args.expert_out = expert_out;
  args.topk_weights = topk_weights;
  args.slot_row = routing.slot_row;
  args.shared_first_row = routing.expert_offsets + routing.num_experts;
  args.add = add.rows;
  args.out = out;
  args.num_tokens = routing.num_tokens;
  args.add_count = add.count;
  args.top_k = routing.top_k;
  args.num_shared = routing.num_shared;
  args.hidden = static_cast<int32_t>(hidden);
  return args;
}

bool ValidCombine(const __nv_bfloat16* expert_out, const float* topk_weights, const MoeRouting& routing,
                  const MoeCombineAdd& add, int64_t hidden) {
  return ValidRouting(routing) && hidden > 0 && hidden % 8 == 0 && hidden <= INT32_MAX && expert_out != nullptr &&
         topk_weights != nullptr && Aligned16(expert_out) && add.count >= 0 &&
         (add.count == 0 || (add.rows != nullptr && Aligned16(add.rows)));
}

template <typename Out>
cudaError_t LaunchCombine(const __nv_bfloat16* expert_out, const float* topk_weights, const MoeRouting& routing,
                          const MoeCombineAdd& add, int64_t hidden, Out* out, cudaStream_t stream) {
  if (!ValidCombine(expert_out, topk_weights, routing, add, hidden) || out == nullptr || !Aligned16(out)) {
    return cudaErrorInvalidValue;
  }
  const int64_t chunks = routing.num_tokens * (hidden / 8);
  if (chunks == 0) return cudaSuccess;
  const int64_t blocks = (chunks + kCombineThreads - 1) / kCombineThreads;
  const unsigned grid = static_cast<unsigned>(blocks < 65536 ? blocks : 65536);
  return LaunchPdl(MoeCombineKernel<Out>, dim3(grid), dim3(kCombineThreads), 0, stream,
                   MakeCombineArgs(expert_out, topk_weights, routing, add, hidden, out));
}

}  // namespace

int64_t MoeRouting::max_tiles() const { return MoeMaxTiles(num_rows(), num_experts + num_shared, tile_rows); }

int64_t MoeMaxTiles(int64_t num_rows, int32_t num_experts, int32_t tile_rows) {
  return (num_rows + tile_rows - 1) / tile_rows + num_experts;
}

int32_t MoeDefaultTileRows(int64_t num_tokens, int32_t top_k, int32_t num_experts, int32_t num_shared) {
  // Each tile of rows streams its expert's weights again (what L2 does not catch), so small tiles win
  // only while the experts' rows fit about one. The shared experts take every token: past a few tiles
  // of theirs, 64-row tiles win whatever the routed experts get. On an H200 (V2-Lite: E=64, k=6, 2
  // shared experts), 16- against 64-row tiles:
  // - moe_bench, us per layer (two runs, one at 16 tokens): 16 tokens 217 against 224; 32 tokens
  //   274 / 264 against 268 / 255; 48 and 64 within 1%; 80 -1.0 to -1.5%, 96 -3.4 to -3.9%, 128 -7%
  //   (304 against 282), 160 -13% (333 against 288) for 64-row tiles;
  // - decode steps (cohort bench step, three runs, contexts 1024 / 4096): 24 to 96 sequences within
  //   1.3% either way, 128 -2.7 / -4.4% and 160 -7.3 / -6.3% for 64-row tiles.
  // So with shared experts 16-row tiles up to 96 tokens, where steps measured no difference.
  // Then the rows per expert that gets any, if routing is even (T*k routed rows over min(T*k, E)
  // experts, T rows for each shared one): 64 beats 128 at 62 rows (328 against 349 at 512 tokens)
  // and 128 beats 64 at 93 (388 against 460 at 768). Without shared experts, 16-row tiles won at 12
  // rows and 64 at 24 (the first round's moe_bench, before the 64-row tiles ran on wgmma).
  constexpr int64_t kSharedSmallTileMaxTokens = 96;
  const int64_t routed_rows = num_tokens * top_k;
  const int64_t experts = (routed_rows < num_experts ? routed_rows : num_experts) + (num_tokens > 0 ? num_shared : 0);
  const int64_t rows_per_expert = experts > 0 ? (routed_rows + num_tokens * num_shared) / experts : 0;
  if (num_shared > 0 ? num_tokens <= kSharedSmallTileMaxTokens : rows_per_expert <= 20) return 16;
  if (rows_per_expert <= 64) return 64;
  return 128;
}

int64_t MoeRoutingWorkspaceBytes(int64_t max_tokens, int32_t top_k, int32_t num_experts, int32_t num_shared) {
  return Layout(max_tokens, top_k, num_experts, num_shared, /*tile_rows=*/16).total() *
         static_cast<int64_t>(sizeof(int32_t));
}

cudaError_t CarveMoeRouting(void* workspace, int64_t workspace_bytes, int64_t num_tokens, int32_t top_k,
                            int32_t num_experts, int32_t num_shared, int32_t tile_rows, MoeRouting* routing) {
  if (routing == nullptr || workspace == nullptr || !Aligned16(workspace) ||
      !ValidRoutingShape(num_tokens, top_k, num_experts, num_shared) || !ValidTileRows(tile_rows)) {
    return cudaErrorInvalidValue;
  }
  const RoutingLayout layout = Layout(num_tokens, top_k, num_experts, num_shared, tile_rows);
  if (layout.total() * static_cast<int64_t>(sizeof(int32_t)) > workspace_bytes) return cudaErrorInvalidValue;
  int32_t* next = static_cast<int32_t*>(workspace);
  auto take = [&](int64_t ints) {
    int32_t* p = next;
    next += Align4(ints);
    return p;
  };
  MoeRouting r;
  r.num_tokens = num_tokens;
  r.top_k = top_k;
  r.num_experts = num_experts;
  r.num_shared = num_shared;
  r.tile_rows = tile_rows;
  r.expert_offsets = take(layout.offsets);
  r.row_token = take(layout.rows);
  r.slot_row = take(layout.pairs);
  r.tile_expert = take(layout.tiles);
  r.tile_row = take(layout.tiles);
  r.num_tiles = take(layout.count);
  r.item_counters = take(layout.item_counters);
  r.chunk_counts = layout.chunk_counts > 0 ? take(layout.chunk_counts) : nullptr;
  *routing = r;
  return cudaSuccess;
}

cudaError_t LaunchMoeGate(const float* router_logits, const float* correction_bias, int64_t num_tokens,
                          const MoeGateParams& p, int32_t* topk_ids, float* topk_weights, cudaStream_t stream) {
  if (!ValidGate(p) || num_tokens < 0 || router_logits == nullptr || topk_ids == nullptr || topk_weights == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (num_tokens == 0) return cudaSuccess;
  const int64_t blocks = (num_tokens + kGateWarps - 1) / kGateWarps;
  if (blocks > INT32_MAX) return cudaErrorInvalidValue;
  return LaunchPdl(MoeGateKernel, dim3(static_cast<unsigned>(blocks)), dim3(kGateWarps * 32), 0, stream,
                   GateArgs{router_logits, correction_bias, num_tokens, nullptr, 0, p, topk_ids, topk_weights, {}});
}

// One block, or two launches of a block per chunk of pairs.
cudaError_t LaunchAlign(const AlignArgs& a, cudaStream_t stream) {
  const int64_t chunks = AlignChunks(a.num_pairs);
  if (chunks <= 1) return LaunchPdl(MoeAlignKernel, dim3(1), dim3(kAlignThreads), 0, stream, a);
  const dim3 grid(static_cast<unsigned>(chunks));
  const cudaError_t error = LaunchPdl(MoeAlignCountKernel, grid, dim3(kAlignThreads), 0, stream, a);
  if (error != cudaSuccess) return error;
  return LaunchPdl(MoeAlignPlaceKernel, grid, dim3(kAlignThreads), 0, stream, a);
}

cudaError_t LaunchMoeAlign(const int32_t* topk_ids, const MoeRouting& routing, int32_t* experts_used,
                           cudaStream_t stream) {
  if (!ValidRouting(routing) || (topk_ids == nullptr && routing.num_pairs() > 0)) return cudaErrorInvalidValue;
  return LaunchAlign(MakeAlignArgs(topk_ids, routing, experts_used), stream);
}

cudaError_t LaunchMoeRoute(const float* router_logits, const float* correction_bias, const MoeGateParams& gate,
                           const int32_t* num_valid, int32_t* topk_ids, float* topk_weights, const MoeRouting& routing,
                           int32_t* experts_used, cudaStream_t stream, int64_t valid_group_rows,
                           const MoeRouterFold& fold, const MoeRouteNorm& norm) {
  const int64_t num_tokens = routing.num_tokens;
  const bool folded = fold.from_attention != nullptr;
  const bool normed = norm.residual != nullptr;
  if (!ValidGate(gate) || !ValidRouting(routing) || routing.first_expert + routing.num_experts > gate.num_experts ||
      gate.top_k != routing.top_k || (router_logits == nullptr && !folded) || topk_ids == nullptr ||
      topk_weights == nullptr || valid_group_rows < 0 ||
      (folded && (fold.from_input == nullptr || fold.inv_rms_in == nullptr ||
                  (fold.inv_rms_post == nullptr && !normed) || fold.input_stride < gate.num_experts)) ||
      (normed && (!folded || num_tokens != 1 || valid_group_rows != 0 ||
                  norm.delta == nullptr || norm.weight == nullptr || norm.out == nullptr || norm.dim <= 0 ||
                  norm.dim > kMoeRouteNormMaxDim))) {
    return cudaErrorInvalidValue;
  }
  const GateArgs g{folded ? nullptr : router_logits, correction_bias, num_tokens, num_valid, valid_group_rows, gate,
                   topk_ids, topk_weights, fold};
  const AlignArgs a = MakeAlignArgs(topk_ids, routing, experts_used);
  if (normed) {
    const bool small = gate.num_experts <= 32 * kGateSmallPerLane, full = norm.dim == kRouteNormFullDim;
    const auto kernel = small ? (full ? MoeNormRouteKernel<kGateSmallPerLane, true>
                                      : MoeNormRouteKernel<kGateSmallPerLane, false>)
                              : (full ? MoeNormRouteKernel<kGatePerLane, true>
                                      : MoeNormRouteKernel<kGatePerLane, false>);
    const int threads = kernels::RmsNormThreads(norm.dim);
    return LaunchPdl(kernel, dim3(1), dim3(threads), 0, stream, g, a, norm);
  }
  if (num_tokens >= 1 && num_tokens <= kMoeWarpRouteTokens) {
    const auto kernel = gate.num_experts <= 32 * kGateSmallPerLane ? MoeRouteWarpKernel<kGateSmallPerLane>
                                                                   : MoeRouteWarpKernel<kGatePerLane>;
    return LaunchPdl(kernel, dim3(1), dim3(kMoeWarpRouteTokens * 32), 0, stream, g, a);
  }
  if (num_tokens <= kMoeFusedRouteTokens) {
    return LaunchPdl(MoeRouteKernel, dim3(1), dim3(kAlignThreads), 0, stream, g, a);
  }
  const int64_t blocks = (num_tokens + kGateWarps - 1) / kGateWarps;
  if (blocks > INT32_MAX) return cudaErrorInvalidValue;
  const cudaError_t error =
      LaunchPdl(MoeGateKernel, dim3(static_cast<unsigned>(blocks)), dim3(kGateWarps * 32), 0, stream, g);
  if (error != cudaSuccess) return error;
  return LaunchAlign(a, stream);
}

cudaError_t LaunchMoeCombine(const __nv_bfloat16* expert_out, const float* topk_weights,
                             const MoeRouting& routing, const MoeCombineAdd& add, int64_t hidden,
                             __nv_bfloat16* out, cudaStream_t stream) {
  return LaunchCombine(expert_out, topk_weights, routing, add, hidden, out, stream);
}

namespace {

constexpr int kFoldThreads = 256;

// from_attention[e, a] = bf16(sum_j router[e, j] * g_post[j] * o_proj[j, a]): block (column tile,
// expert), a thread a column; the expert's scaled router row in shared memory, o_proj's rows read
// across the block (coalesced).
__global__ void __launch_bounds__(kFoldThreads) FoldRouterThroughOutputKernel(
    const __nv_bfloat16* __restrict__ router, const __nv_bfloat16* __restrict__ g_post,
    const __nv_bfloat16* __restrict__ o_proj, int hidden, int width, __nv_bfloat16* __restrict__ out) {
  extern __shared__ float scaled_row[];
  const int64_t e = blockIdx.y;
  for (int j = threadIdx.x; j < hidden; j += blockDim.x) {
    scaled_row[j] = __bfloat162float(router[e * hidden + j]) * __bfloat162float(g_post[j]);
  }
  __syncthreads();
  const int a = static_cast<int>(blockIdx.x) * kFoldThreads + static_cast<int>(threadIdx.x);
  if (a >= width) return;
  float sum = 0.0f;
  for (int j = 0; j < hidden; ++j) sum += scaled_row[j] * __bfloat162float(o_proj[static_cast<int64_t>(j) * width + a]);
  out[e * width + a] = __float2bfloat16(sum);
}

// from_input[e, j] = bf16(router[e, j] * g_post[j] / g_in[j]).
__global__ void __launch_bounds__(kFoldThreads) FoldRouterThroughInputKernel(
    const __nv_bfloat16* __restrict__ router, const __nv_bfloat16* __restrict__ g_in,
    const __nv_bfloat16* __restrict__ g_post, int64_t experts, int hidden, __nv_bfloat16* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kFoldThreads + threadIdx.x;
  if (i >= experts * hidden) return;
  const int j = static_cast<int>(i % hidden);
  out[i] = __float2bfloat16(__bfloat162float(router[i]) * __bfloat162float(g_post[j]) / __bfloat162float(g_in[j]));
}

}  // namespace

cudaError_t LaunchFoldRouter(const __nv_bfloat16* router, const __nv_bfloat16* g_in, const __nv_bfloat16* g_post,
                             const __nv_bfloat16* o_proj, int64_t experts, int64_t hidden, int64_t width,
                             __nv_bfloat16* from_input, __nv_bfloat16* from_attention, cudaStream_t stream) {
  if (router == nullptr || g_in == nullptr || g_post == nullptr || o_proj == nullptr || from_input == nullptr ||
      from_attention == nullptr || experts < 1 || experts > kMoeMaxExperts || hidden < 1 || hidden > 8 * 1024 ||
      width < 1 || width > INT32_MAX) {
    return cudaErrorInvalidValue;
  }
  const dim3 output_grid(static_cast<unsigned>((width + kFoldThreads - 1) / kFoldThreads),
                         static_cast<unsigned>(experts));
  FoldRouterThroughOutputKernel<<<output_grid, kFoldThreads, hidden * sizeof(float), stream>>>(
      router, g_post, o_proj, static_cast<int>(hidden), static_cast<int>(width), from_attention);
  if (const cudaError_t error = cudaGetLastError(); error != cudaSuccess) return error;
  const int64_t blocks = (experts * hidden + kFoldThreads - 1) / kFoldThreads;
  FoldRouterThroughInputKernel<<<static_cast<unsigned>(blocks), kFoldThreads, 0, stream>>>(
      router, g_in, g_post, experts, static_cast<int>(hidden), from_input);
  return cudaGetLastError();
}

cudaError_t LaunchMoeCombine(const __nv_bfloat16* expert_out, const float* topk_weights,
                             const MoeRouting& routing, const MoeCombineAdd& add, int64_t hidden, float* out,
                             cudaStream_t stream) {
  return LaunchCombine(expert_out, topk_weights, routing, add, hidden, out, stream);
}

cudaError_t LaunchMoeCombineAddRmsNorm(const __nv_bfloat16* expert_out, const float* topk_weights,
                                       const MoeRouting& routing, const MoeCombineAdd& add, int64_t hidden,
                                       float* residual, const __nv_bfloat16* norm_weight, float eps,
                                       __nv_bfloat16* out, cudaStream_t stream, float* inv_rms) {
  if (!ValidCombine(expert_out, topk_weights, routing, add, hidden) || hidden > 8 * 1024 || residual == nullptr ||
      norm_weight == nullptr || out == nullptr || !Aligned16(residual) || !Aligned16(norm_weight) ||
      !Aligned16(out) || routing.num_tokens > INT32_MAX) {
    return cudaErrorInvalidValue;
  }
  if (routing.num_tokens == 0) return cudaSuccess;
  const int threads = static_cast<int>((hidden / 8 + 31) / 32 * 32);
  return LaunchPdl(MoeCombineAddRmsNormKernel, dim3(static_cast<unsigned>(routing.num_tokens)), dim3(threads), 0,
                   stream, MakeCombineArgs<__nv_bfloat16>(expert_out, topk_weights, routing, add, hidden, nullptr),
                   NormArgs{residual, norm_weight, eps, out, inv_rms});
}

}  // namespace cohort
