// Sampling kernels. See sampling.h for the contract and worker/sampling/sampler.cc for the
// semantics reproduced here.
//
// Two work splits, chosen per launch from the number of rows (LaunchSampling says when):
//
// Cluster split (few rows). A row belongs to a cluster of C blocks of 1024 threads (C = 1..8), one
// block per SM. Block r copies the slice [r*S, r*S + S) of the row into its shared memory once and
// works there from then on: every later pass (selects, weights, the draw) reads shared memory, not
// the row in global memory. Few rows get C = 8, so that a one-row step still spreads over 8 SMs;
// more rows get the smallest C whose slices fit. Whole-row questions combine the blocks' partial
// results through distributed shared memory, always in block-rank order, so that every block
// computes bit-identical sums and takes the same decisions. Weights are computed once per token,
// in place of the logits in shared memory.
//
// Row split (many rows: more clusters than the device holds at once). A row belongs to one block
// of 512 threads, two per SM, that keeps nothing of the row in shared memory: each pass streams it
// from global memory. Penalised tokens are marked in a shared bitmap, left out of the stream and
// visited again from their penalty entries with their penalised logits; weights are computed on
// the fly, and the logits are never written. Passes are few, and each select gathers the few
// tokens that can still matter into shared memory in id order (the list, at most kListCapacity),
// where the rest of it, the weights, top-p and the draw work as on a slice:
//   - the first pass computes the log-sum-exp, the argmax and each thread's largest value; the k-th
//     largest of those bounds top-k's (or the top logprobs') cut from below, and one pass gathers
//     the values above it (GatherAboveTops);
//   - top-p's first level gathers as it goes: only the tokens weighing at least 2^-10 of the best
//     enter its histogram and the list, and a peaked row's cut lies among them
//     (TopPLevelGathering);
//   - otherwise (too many candidates) a select's first digit over the row usually leaves few
//     enough to gather, and where not, the select and the draw stream the row.
//
// Both splits run the same selects, weights and draw, templated on where the values live (a
// slice, the list, or the row in global memory):
//   - every "best k" question (top-k over penalised logits, the top logprobs over raw logits, the
//     top-p cut over weights) is a radix select on order-preserving keys, 11-bit digits, three
//     levels. Each block histograms its values (lanes with equal digits combined before the
//     atomics); a cluster's blocks then read each other's 64 super-bin sums and the 32 bins of the
//     chosen super-bin: two small reads per digit rather than 2048 bins per block. Ties at a cut go
//     to the lowest ids through a second select on the ids.
//   - the draw: each block sums its kept weight in 128-token chunks; the block whose range holds
//     the target finds the chunk, and one warp the token.
//
// Exchanges (cluster split). Cluster-wide steps alternate between two slots and each ends with one
// cluster barrier: step e fills slot e % 2 after barrier e - 1, which every block reached only
// after reading what step e - 2 left in that slot. Small results (row summaries, draw masses,
// top-logprob lists) are pushed into the other blocks' slots before the barrier, so after the last
// step no block reads another's memory and each may exit at once. A row block runs the same steps
// with block barriers.
//
// Greedy-only launches use a lighter kernel: one streaming pass over global memory per row slice,
// the argmax and log-sum-exp combined in the cluster, nothing kept in shared memory; one plain
// block per row once the rows alone fill the device.
//
// Weights are floats like the CPU's std::exp on float: evaluated in double and rounded once
// (ExpNonPositive), they are the correctly rounded exponential, which glibc's expf (0.502 ulp)
// differs from in the last bit for about 1 input in 2000. Sums are in double like the CPU's, in a
// different order (differences near 1e-16 relative), which also differs between the splits and
// cluster sizes, and between runs where double atomics add (the top-p histograms' weights; in the
// row split, penalised tokens' weights in the draw's chunk sums). Either only matters where a
// cumulative sum lands within about 1e-8 of its target: near-ties, where the device may pick the
// neighbour.
#include "kernels/sampling.h"

#include <cuda_pipeline.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "kernels/launch_setup.h"
#include "kernels/pdl.cuh"
#include "kernels/reduce.cuh"

namespace cohort {

// The sample kernels' dynamic shared memory: SharedStorage, then the cluster split's slice of the
// row, or the row split's RowScratch and penalty bitmap.
extern __shared__ __align__(16) unsigned char sampling_shared_memory[];

namespace {

constexpr int kClusterThreads = 1024;  // a cluster block: one per SM, its slice in shared memory
constexpr int kRowThreads = 512;       // a row block: two per SM, its row in global memory
constexpr int kRowUnroll = 4;          // float4 loads in flight per thread in a row pass
constexpr int kGreedyThreads = 512;
constexpr int kGreedyUnroll = 8;  // float4 loads in flight per thread
constexpr int kMaxCluster = 8;    // the portable cluster size
constexpr int kDigitBits = 11;
constexpr int kBins = 1 << kDigitBits;
constexpr int kSuperBins = 64;
constexpr int kBinsPerSuper = kBins / kSuperBins;
constexpr int kIdBits = 18;
constexpr uint32_t kIdMask = (1u << kIdBits) - 1;
constexpr int kChunk = 128;       // tokens per draw chunk: one float4 per lane of a warp
constexpr int kMaxSlice = 40960;  // floats of a row per cluster block: with SharedStorage, within 227 KiB
constexpr int kMaxSliceChunks = kMaxSlice / kChunk;
constexpr int kMaxRowChunks = kSamplingMaxVocab / kChunk;
constexpr int kMinSlice = 2048;      // rows are not split into smaller slices than this
constexpr int kListCapacity = 2048;  // the row split's candidates in shared memory
constexpr unsigned kFullMask = 0xffffffffu;
static_assert(kSamplingMaxVocab == (1 << kIdBits), "token ids are kIdBits wide");
static_assert(kMaxSlice * kMaxCluster >= kSamplingMaxVocab, "the largest vocabulary fits in one cluster");
static_assert(kMaxSlice % kChunk == 0 && kListCapacity % kChunk == 0, "whole draw chunks");
static_assert(kListCapacity / kChunk <= kMaxSliceChunks, "the list's draw chunks fit SharedStorage's");
static_assert(kBins % kClusterThreads == 0 && kBins % kRowThreads == 0, "each thread clears and sums whole bins");
static_assert(kSuperBins == 64 && kBinsPerSuper == 32, "two super-bins per lane, one bin per lane");
static_assert(kBinsPerSuper % (kBins / kRowThreads) == 0, "a super-bin's bins belong to whole threads");
static_assert(kChunk == 4 * 32, "a chunk is one float4 per lane");

__device__ __forceinline__ int MinInt(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ int MaxInt(int a, int b) { return a > b ? a : b; }
__device__ __forceinline__ int Lane() { return static_cast<int>(threadIdx.x) & 31; }
__device__ __forceinline__ int Warp() { return static_cast<int>(threadIdx.x) >> 5; }

// The same object in the shared memory of block `rank` of this block's cluster; a block outside a
// cluster (rank 0) has only its own.
template <bool kCluster, class T>
__device__ __forceinline__ T* AtRank(T* local, int rank) {
  if constexpr (kCluster) {
    return static_cast<T*>(__cluster_map_shared_rank(local, static_cast<unsigned>(rank)));
  } else {
    return local;
  }
}

// ---------------------------------------------------------------------------------------------
// Keys and weights

// Order-preserving key of a float: a larger float has a larger key, equal floats (0 and -0
// included) the same key.
__device__ __forceinline__ uint32_t OrderedKey(float f) {
  uint32_t bits = __float_as_uint(f);
  if (bits == 0x80000000u) bits = 0;
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// The float of an OrderedKey (0 for both zeros' key).
__device__ __forceinline__ float KeyValue(uint32_t key) {
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// exp(x) for x <= 0, rounded to float from a double evaluation accurate to ~1e-15: table of
// 2^(i/32), Cody-Waite reduction, degree-5 polynomial.
__device__ __forceinline__ float ExpNonPositive(float x, const double* exp_table) {
  if (!(x > -105.0f)) return x != x ? x : 0.0f;  // exp(-105) is below half the smallest subnormal
  constexpr double kInvLn2x32 = 46.16624130844683;
  constexpr double kLn2Over32Hi = 0.02166084939249829;
  constexpr double kLn2Over32Lo = 7.247021293269686e-19;
  const double xd = static_cast<double>(x);
  const double k = rint(xd * kInvLn2x32);
  const double g = fma(-k, kLn2Over32Lo, fma(-k, kLn2Over32Hi, xd));  // |g| <= ln2/64
  double poly = 1.0 / 120.0;
  poly = fma(poly, g, 1.0 / 24.0);
  poly = fma(poly, g, 1.0 / 6.0);
  poly = fma(poly, g, 0.5);
  poly = fma(poly, g, 1.0);
  poly = fma(poly, g, 1.0);
  const int ki = static_cast<int>(k);
  const double scale = __longlong_as_double(static_cast<long long>(1023 + (ki >> 5)) << 52);
  return __double2float_rn(poly * exp_table[ki & 31] * scale);
}

// Sampler::Draw's weight: std::exp((logit - best) / temperature) in float.
__device__ __forceinline__ float Weight(float w, float best, float temperature, const double* exp_table) {
  return ExpNonPositive(__fdiv_rn(__fsub_rn(w, best), temperature), exp_table);
}

// Sampler::ApplyPenalties for one history token.
__device__ __forceinline__ float PenalisedLogit(float logit, const SamplingPenaltyToken& pt,
                                                const SamplingRowParams& p) {
  if (p.repetition_penalty != 1.0f && pt.in_history != 0) {
    logit = logit > 0.0f ? __fdiv_rn(logit, p.repetition_penalty) : __fmul_rn(logit, p.repetition_penalty);
  }
  if (pt.generated_count > 0) {
    const float count = static_cast<float>(pt.generated_count);
    logit = __fsub_rn(logit, __fadd_rn(p.presence_penalty, __fmul_rn(p.frequency_penalty, count)));
  }
  return logit;
}

// A set's first members in (key descending, id ascending) order: key above `key`, or equal with
// id <= `id`.
struct Cut {
  bool active = false;
  uint32_t key = 0;
  int id = INT_MAX;
  __device__ __forceinline__ bool Keeps(uint32_t k, int t) const { return !active || k > key || (k == key && t <= id); }
};

// What top-k and min-p keep, with Sampler::Draw's weights: 0 for the tokens they drop (the best
// weighs 1, so min-p keeps weight >= min_p).
struct Survivors {
  Cut top_k;
  float best;
  float temperature;
  float min_p;
  __device__ __forceinline__ float WeightOf(float logit, int t, const double* exp_table) const {
    if (!top_k.Keeps(OrderedKey(logit), t)) return 0.0f;
    const float w = Weight(logit, best, temperature, exp_table);
    return w < min_p ? 0.0f : w;
  }
};

// ---------------------------------------------------------------------------------------------
// Reductions. Block collectives are called by every thread of the block and give every thread
// the same result, combined in the same order.

// Online log-sum-exp of the raw logits (fast exp: it only feeds the returned logprobs).
struct LogSumExp {
  float max;
  float sum;  // of exp(x - max)
  __device__ void Add(float x) {
    if (x > max) {
      sum = sum * __expf(max - x) + 1.0f;
      max = x;
    } else if (x > -INFINITY) {
      sum += __expf(x - max);
    }
  }
};
struct CombineLogSumExp {
  __device__ LogSumExp operator()(LogSumExp a, LogSumExp b) const {
    const float m = a.max > b.max ? a.max : b.max;
    if (m == -INFINITY) return {m, 0.0f};
    const float sa = a.max == -INFINITY ? 0.0f : a.sum * __expf(a.max - m);
    const float sb = b.max == -INFINITY ? 0.0f : b.sum * __expf(b.max - m);
    return {m, sa + sb};
  }
};

// Highest value, ties to the lowest id; NaN never wins (Sampler::Argmax, but see RowSummary for
// a NaN at id 0). Order-independent, so the blocks' partial results combine to the CPU's answer.
struct ArgMax {
  float value;
  int id;
  __device__ void Add(float v, int t) {
    if (v > value || (v == value && t < id)) {
      value = v;
      id = t;
    }
  }
};
struct CombineArgMax {
  __device__ ArgMax operator()(ArgMax a, ArgMax b) const {
    a.Add(b.value, b.id);
    return a;
  }
};

struct Plus {
  template <class T>
  __device__ T operator()(T a, T b) const {
    return a + b;
  }
};
struct Max {
  template <class T>
  __device__ T operator()(T a, T b) const {
    return a > b ? a : b;
  }
};

__device__ __forceinline__ float ShflXor(float v, int o) { return __shfl_xor_sync(kFullMask, v, o); }
__device__ __forceinline__ double ShflXor(double v, int o) { return __shfl_xor_sync(kFullMask, v, o); }
__device__ __forceinline__ int ShflXor(int v, int o) { return __shfl_xor_sync(kFullMask, v, o); }
__device__ __forceinline__ LogSumExp ShflXor(LogSumExp v, int o) { return {ShflXor(v.max, o), ShflXor(v.sum, o)}; }
__device__ __forceinline__ ArgMax ShflXor(ArgMax v, int o) { return {ShflXor(v.value, o), ShflXor(v.id, o)}; }

// A butterfly: both partners of each step add the same two values, so every lane ends with the
// same bits.
template <class T, class Op>
__device__ __forceinline__ T WarpAllReduce(T v, Op op) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, ShflXor(v, o));
  return v;
}

// `scratch`: kBlockThreads / 32 slots of 16 bytes in shared memory.
template <int kBlockThreads, class T, class Op>
__device__ __forceinline__ T BlockAllReduce(T v, Op op, unsigned char* scratch) {
  static_assert(sizeof(T) <= 16, "reduce slots hold 16 bytes");
  v = WarpAllReduce(v, op);
  T* slots = reinterpret_cast<T*>(scratch);
  __syncthreads();  // earlier readers of the slots are done
  if (Lane() == 0) slots[Warp()] = v;
  __syncthreads();
  T all = slots[0];
  for (int w = 1; w < kBlockThreads / 32; ++w) all = op(all, slots[w]);
  return all;
}

// Exclusive prefix sum over the threads of a kBlockThreads block in thread order; *total gets the sum.
template <int kBlockThreads, class T>
__device__ __forceinline__ T BlockExclusiveSum(T v, T* total, unsigned char* scratch) {
  const T inclusive = kernels::WarpInclusiveSum(v);
  T exclusive = __shfl_up_sync(kFullMask, inclusive, 1);
  if (Lane() == 0) exclusive = T(0);
  T* slots = reinterpret_cast<T*>(scratch);
  __syncthreads();
  if (Lane() == 31) slots[Warp()] = inclusive;
  __syncthreads();
  T before = T(0);
  T all = T(0);
  for (int w = 0; w < kBlockThreads / 32; ++w) {
    if (w == Warp()) before = all;
    all += slots[w];
  }
  *total = all;
  return before + exclusive;
}

// ---------------------------------------------------------------------------------------------
// Rows and slices

// This block's part of its row.
struct Slice {
  int begin;   // the token id of the slice's first value
  int n;       // values in the slice
  int blocks;  // the cluster's blocks, which share the row in rank order
  int rank;
};

__device__ __forceinline__ Slice SliceOf(int vocab, int slice_size) {
  const int blocks = static_cast<int>(__clusterSizeInBlocks());
  const int rank = static_cast<int>(__clusterRelativeBlockRank());
  const int begin = rank * slice_size;
  return Slice{begin, MaxInt(0, MinInt(slice_size, vocab - begin)), blocks, rank};
}

// Values 4q..4q+3 of `src`; those past `n` read as -inf and must not be used.
__device__ __forceinline__ void LoadQuad(const float* src, int n, bool aligned, int q, float (&v)[4]) {
  const int i = 4 * q;
  if (aligned && i + 3 < n) {
    const float4 f = __ldg(reinterpret_cast<const float4*>(src) + q);
    v[0] = f.x;
    v[1] = f.y;
    v[2] = f.z;
    v[3] = f.w;
  } else {
#pragma unroll
    for (int e = 0; e < 4; ++e) v[e] = i + e < n ? __ldg(src + i + e) : -INFINITY;
  }
}

__device__ __forceinline__ void WriteResult(const SamplingArgs& args, int row, int token, double log_normalizer) {
  token = MinInt(MaxInt(token, 0), args.vocab - 1);
  const float raw = args.logits[static_cast<int64_t>(row) * args.row_stride + token];
  args.results[row] = SamplingRowResult{token, static_cast<float>(static_cast<double>(raw) - log_normalizer)};
}

// What a block knows about its slice after the first pass.
struct RowSummary {
  LogSumExp lse;     // of the raw logits
  ArgMax best;       // of the penalised logits
  int first_is_nan;  // rank 0: token 0's penalised logit is NaN, where Sampler::Argmax keeps token 0
};

struct RowStats {
  double log_normalizer;
  ArgMax best;
};

// The blocks' summaries combined in rank order.
__device__ __forceinline__ RowStats CombineSummaries(const RowSummary* summaries, int blocks) {
  LogSumExp lse = summaries[0].lse;
  ArgMax best = summaries[0].best;
  for (int r = 1; r < blocks; ++r) {
    lse = CombineLogSumExp{}(lse, summaries[r].lse);
    best = CombineArgMax{}(best, summaries[r].best);
  }
  if (summaries[0].first_is_nan != 0) best.id = 0;
  return RowStats{static_cast<double>(lse.max) + log(static_cast<double>(lse.sum)), best};
}

// ---------------------------------------------------------------------------------------------
// The sample kernels' shared memory

struct ListEntry {
  int32_t id;
  float value;
};

struct TopList {
  int count;
  ListEntry entries[kSamplingMaxTopLogprobs];
};

// What blocks publish to each other in one exchange. Histogram bins are in descending digit order.
struct alignas(16) ExchangeSlot {
  double mass[kBins];
  uint32_t count[kBins];
  alignas(16) double super_mass[kSuperBins];
  alignas(16) uint32_t super_count[kSuperBins];
  // Pushed by each block, indexed by its rank.
  double draw_mass[kMaxCluster];
  RowSummary summary[kMaxCluster];
  TopList top[kMaxCluster];  // rank 0's slot only
};

// Where a row's result goes.
struct RowOutput {
  const float* logits;  // the row's raw logits
  SamplingRowResult* result;
  int vocab;
};

// The row split's row: in global memory, penalised tokens marked in PenaltyBitmap().
struct RowInfo {
  const float* logits;
  const SamplingPenaltyToken* penalties;  // the row's entries of SamplingArgs::penalty_tokens
  const SamplingRowParams* params;
  int penalty_count;  // 0: no penalties, nothing marked
  bool aligned;       // 16-byte aligned: whole quads load as float4
};

struct BinChoice {
  int index;              // in descending order
  uint32_t count_before;  // keys in earlier (higher) items of this digit
  uint32_t count_in;
  double mass_before;  // the select's mass_above plus the weight of earlier items
};

struct SharedStorage {
  ExchangeSlot exchange[2];
  double chunk_mass[kMaxSliceChunks];  // the draw over a slice or the list: kept weight of each chunk
  double exp_table[32];                // 2^(i/32)
  alignas(16) unsigned char reduce[(kClusterThreads / 32) * 16];
  BinChoice choice;
  double target;
  double scan_from;  // the draw: kept weight before the chunk that one warp scans
  ListEntry top[kSamplingMaxTopLogprobs];
  int top_count;
  int outbox;  // the slot this block fills for the coming exchange
  int pick;
  int fallback;
  int list_size;
  bool short_of_target;
  // Set by thread 0, which writes the result: rather than held in registers across calls.
  RowOutput output;
  RowStats stats;
  // The row split: its row, and what turns its penalised logits into weights.
  RowInfo row;
  Survivors keep;
};

// The row split's candidates, in id order after the gather.
struct CandidateList {
  float values[kListCapacity];
  int32_t ids[kListCapacity];
};

// The row split's shared memory after SharedStorage, before the penalty bitmap: the list, or the
// whole row's draw chunks when the draw runs over the row (there is no list then).
struct RowScratch {
  union alignas(16) {
    CandidateList list;
    double chunk_mass[kMaxRowChunks];
  } u;
  float scan[kChunk];  // the draw's scan over the row: the weights of one chunk's penalised tokens
  // The first pass's thread tops: each thread's largest raw and penalised logit, as OrderedKeys.
  uint32_t raw_tops[kRowThreads];
  uint32_t penalised_tops[kRowThreads];
};

constexpr size_t kSliceOffset = (sizeof(SharedStorage) + 15) / 16 * 16;
constexpr size_t kMaxSharedBytes = kSliceOffset + sizeof(float) * kMaxSlice;
static_assert(kMaxSharedBytes <= 227 * 1024, "a block may have 227 KiB of shared memory on sm_90");
constexpr size_t kBitmapOffset = kSliceOffset + (sizeof(RowScratch) + 15) / 16 * 16;
// A row block's shared memory: bit t of the bitmap marks a penalised token t.
constexpr size_t RowSharedBytes(int vocab) {
  return kBitmapOffset + sizeof(uint32_t) * static_cast<size_t>((vocab + 31) / 32);
}
constexpr size_t kRowMaxSharedBytes = RowSharedBytes(kSamplingMaxVocab);
static_assert(2 * (kRowMaxSharedBytes + 1024) <= 228 * 1024, "two row blocks per SM (228 KiB, 1 KiB each reserved)");

__device__ __forceinline__ SharedStorage& Smem() { return *reinterpret_cast<SharedStorage*>(sampling_shared_memory); }
// The cluster split's slice: raw logits, then penalised logits, then weights (0 for tokens that
// are not kept).
__device__ __forceinline__ float* SliceValues() {
  return reinterpret_cast<float*>(sampling_shared_memory + kSliceOffset);
}
__device__ __forceinline__ RowScratch& Scratch() {
  return *reinterpret_cast<RowScratch*>(sampling_shared_memory + kSliceOffset);
}
__device__ __forceinline__ uint32_t* PenaltyBitmap() {
  return reinterpret_cast<uint32_t*>(sampling_shared_memory + kBitmapOffset);
}

__device__ __forceinline__ ExchangeSlot& Outbox() { return Smem().exchange[Smem().outbox]; }

// Thread 0 (which set s.output and s.stats): the row's token, with the log-softmax of its raw logit.
__device__ __forceinline__ void WriteToken(int token) {
  const SharedStorage& s = Smem();
  token = MinInt(MaxInt(token, 0), s.output.vocab - 1);
  const double logprob = static_cast<double>(s.output.logits[token]) - s.stats.log_normalizer;
  *s.output.result = SamplingRowResult{token, static_cast<float>(logprob)};
}

// Ends an exchange; returns the slot that now holds what every block published, until the end of
// the next exchange. Every thread of every block of the cluster calls it the same number of times.
template <bool kCluster>
__device__ __forceinline__ int Exchange() {
  SharedStorage& s = Smem();
  const int slot = s.outbox;
  __syncthreads();  // every thread has read `outbox`
  if (threadIdx.x == 0) s.outbox = slot ^ 1;
  if constexpr (kCluster) {
    __cluster_barrier_arrive();  // release: this block's writes, local and pushed
    __cluster_barrier_wait();    // acquire: everyone's
  } else {
    __syncthreads();
  }
  return slot;
}

// ---------------------------------------------------------------------------------------------
// Where a block's values live
//
// A store says how many threads its block has and whether the block is in a cluster (blocks,
// rank); it holds n values and visits them: Visit(f) calls f(in, id, value) for each, every thread
// of the block calling f equally often so that warp collectives inside f see whole warps (`in`
// false: no value this time). The draw reads a store in chunks of 128 values in id order:
// ChunkValues for the sums, ScanValues (one warp) for the scan of one chunk.

// Values in shared memory, rewritten in place (raw logits, penalised logits, weights): the cluster
// split's slice, ids begin + i, or the row split's list, ids listed.
template <bool kListed>
struct SharedValues {
  static constexpr int kThreads = kListed ? kRowThreads : kClusterThreads;
  static constexpr bool kCluster = !kListed;
  static constexpr bool kPenaltiesApart = false;  // ChunkValues covers every value
  int begin;  // the slice's first token id
  int n;
  int blocks;
  int rank;

  __device__ float* Values() const {
    if constexpr (kListed) {
      return Scratch().u.list.values;
    } else {
      return SliceValues();
    }
  }
  __device__ int Id(int i) const {
    if constexpr (kListed) {
      return Scratch().u.list.ids[i];
    } else {
      return begin + i;
    }
  }
  __device__ double* ChunkMass() const { return Smem().chunk_mass; }

  template <class F>
  __device__ void Visit(F&& f) const {
    const float* values = Values();
    for (int base = 0; base < n; base += kThreads) {
      const int i = base + static_cast<int>(threadIdx.x);
      const bool in = i < n;
      f(in, in ? Id(i) : 0, in ? values[i] : 0.0f);
    }
  }
  // The lane's four values of chunk c (0 past the end) and their ids.
  __device__ void ChunkValues(int c, float (&w)[4], int (&id)[4]) const {
    const float4 w4 = reinterpret_cast<const float4*>(Values())[c * (kChunk / 4) + Lane()];
    const float v[4] = {w4.x, w4.y, w4.z, w4.w};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = c * kChunk + 4 * Lane() + e;
      w[e] = i < n ? v[e] : 0.0f;
      id[e] = Id(i);
    }
  }
  __device__ void ScanValues(int c, float (&w)[4], int (&id)[4]) const { ChunkValues(c, w, id); }
};
using SliceStore = SharedValues<false>;
using ListStore = SharedValues<true>;

// The row split's row, as a store of raw logits, penalised logits, or weights (SharedStorage's
// `keep`, computed on the fly). The row stays in global memory and is streamed in passes;
// penalised tokens are marked in the bitmap, left out of the stream and visited again from their
// penalty entries. A pass reads what it needs about the row from SharedStorage when it starts, so
// that none of it is held in registers across the kernel's calls.

// f(in, marked, t, logit) for the row's tokens, every thread calling it equally often (`in` false
// past the row's end; `marked` only when `marks`), kUnroll float4 loads in flight per thread.
template <int kUnroll, class F>
__device__ __forceinline__ void StreamRow(const RowInfo& row, int n, bool marks, F&& f) {
  const int tid = static_cast<int>(threadIdx.x);
  const int quads = (n + 3) >> 2;
  for (int base = 0; base < quads; base += kRowThreads * kUnroll) {
    float v[kUnroll][4];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int q = base + u * kRowThreads + tid;
      if (q < quads) {
        LoadQuad(row.logits, n, row.aligned, q, v[u]);
      } else {
#pragma unroll
        for (int e = 0; e < 4; ++e) v[u][e] = -INFINITY;
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int q = base + u * kRowThreads + tid;
      const uint32_t word = marks && q < quads ? PenaltyBitmap()[q >> 3] : 0u;  // tokens 4q..4q+3
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int t = 4 * q + e;
        f(t < n, ((word >> (t & 31)) & 1u) != 0u, t, v[u][e]);
      }
    }
  }
}

// f(in, t, penalised logit) for each of the row's penalty entries, every thread calling it equally
// often.
template <class F>
__device__ __forceinline__ void VisitPenaltyEntries(const RowInfo& row, int n, F&& f) {
  for (int base = 0; base < row.penalty_count; base += kRowThreads) {
    const int e = base + static_cast<int>(threadIdx.x);
    SamplingPenaltyToken pt{};
    if (e < row.penalty_count) pt = row.penalties[e];
    const bool in = e < row.penalty_count && pt.token >= 0 && pt.token < n;
    f(in, pt.token, in ? PenalisedLogit(row.logits[pt.token], pt, *row.params) : 0.0f);
  }
}

enum class RowValues { kRaw, kPenalised, kWeights };

struct RowStoreTraits {
  static constexpr int kThreads = kRowThreads;
  static constexpr bool kCluster = false;
  static constexpr bool kPenaltiesApart = true;  // ChunkValues leaves them out, VisitPenalised visits them
  static constexpr int blocks = 1;
  static constexpr int rank = 0;
};

template <RowValues kValues>
struct RowStore : RowStoreTraits {
  // Loads in flight per thread: fewer for weights, which the exponentials bound.
  static constexpr int kUnroll = kValues == RowValues::kWeights ? kRowUnroll / 2 : kRowUnroll;
  int n;  // the vocabulary

  __device__ explicit RowStore(int vocab) : n(vocab) {}

  // Token t's value from its penalised logit.
  __device__ static float Value(const Survivors& keep, int t, float penalised) {
    if constexpr (kValues == RowValues::kWeights) {
      return keep.WeightOf(penalised, t, Smem().exp_table);
    } else {
      return penalised;
    }
  }

  template <class F>
  __device__ void Visit(F&& f) const {
    constexpr bool kPenalised = kValues != RowValues::kRaw;  // raw logits: every token from the stream
    const SharedStorage& s = Smem();
    const RowInfo row = s.row;
    const Survivors keep = s.keep;
    StreamRow<kUnroll>(row, n, kPenalised && row.penalty_count > 0, [&](bool in, bool marked, int t, float logit) {
      const bool here = in && !marked;
      f(here, t, here ? Value(keep, t, logit) : 0.0f);
    });
    if constexpr (kPenalised) {
      VisitPenaltyEntries(row, n, [&](bool in, int t, float penalised) {
        f(in, t, in ? Value(keep, t, penalised) : 0.0f);
      });
    }
  }
  // f(t, value) for each penalised token, spread over the block's threads.
  template <class F>
  __device__ void VisitPenalised(F&& f) const {
    const SharedStorage& s = Smem();
    const Survivors keep = s.keep;
    VisitPenaltyEntries(s.row, n, [&](bool in, int t, float penalised) {
      if (in) f(t, Value(keep, t, penalised));
    });
  }
  // The lane's four values of chunk c and their ids; 0 past the end and for penalised tokens.
  __device__ void ChunkValues(int c, float (&w)[4], int (&id)[4]) const {
    const SharedStorage& s = Smem();
    const RowInfo row = s.row;
    const int q = c * (kChunk / 4) + Lane();
    const Survivors keep = s.keep;
    float raw[4];
    LoadQuad(row.logits, n, row.aligned, q, raw);
    const uint32_t word = row.penalty_count > 0 && 4 * q < n ? PenaltyBitmap()[q >> 3] : 0u;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int t = 4 * q + e;
      id[e] = t;
      w[e] = t < n && ((word >> (t & 31)) & 1u) == 0u ? Value(keep, t, raw[e]) : 0.0f;
    }
  }
  // ChunkValues with the chunk's penalised tokens too, found among the penalty entries by the warp.
  __device__ void ScanValues(int c, float (&w)[4], int (&id)[4]) const {
    ChunkValues(c, w, id);
    const SharedStorage& s = Smem();
    const RowInfo row = s.row;
    const int q = c * (kChunk / 4) + Lane();
    const uint32_t word = row.penalty_count > 0 && 4 * q < n ? PenaltyBitmap()[q >> 3] : 0u;
    const uint32_t mine = (word >> ((4 * q) & 31)) & 0xfu;
    if (__ballot_sync(kFullMask, mine != 0u) == 0u) return;
    float* scan = Scratch().scan;
    for (int e = Lane(); e < row.penalty_count; e += 32) {
      const SamplingPenaltyToken pt = row.penalties[e];
      const int i = pt.token - c * kChunk;
      if (i >= 0 && i < kChunk && pt.token < n) {
        scan[i] = Value(s.keep, pt.token, PenalisedLogit(row.logits[pt.token], pt, *row.params));
      }
    }
    __syncwarp();
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (((mine >> e) & 1u) != 0u) w[e] = scan[4 * Lane() + e];
    }
    __syncwarp();  // read before the next chunk's entries are written
  }
  __device__ double* ChunkMass() const { return Scratch().u.chunk_mass; }
};

// ---------------------------------------------------------------------------------------------
// Radix select over kBits-bit keys, largest first: digit levels of up to 11 bits from the top,
// over a store's values, combined over the cluster. A count select finds the need-th key; a mass
// select the key where the running weight, in key order, first reaches a target (top-p's
// "cumulative >= target").

enum class Rank { kCount, kMassAtLeast };

template <int kBits>
struct Radix {
  static constexpr int kLevels = (kBits + kDigitBits - 1) / kDigitBits;
  // Bits at and above High(level) were decided by earlier levels; this level decides [Shift, High).
  __device__ static constexpr int High(int level) { return kBits - kDigitBits * level; }
  __device__ static constexpr int Shift(int level) {
    return kBits - kDigitBits * (level + 1) > 0 ? kBits - kDigitBits * (level + 1) : 0;
  }
};

struct SelectState {
  uint32_t prefix = 0;    // the digits decided so far, in place
  int level = 0;          // the next level to histogram
  uint32_t need = 0;      // count select: rank still wanted among keys matching the prefix
  uint32_t above = 0;     // keys above the prefix: with `group`, the keys that are at least it
  uint32_t group = 0;     // keys matching the prefix (after the last level: equal to it)
  double mass_above = 0;  // mass select: weight of the keys above the prefix
  double target = 0;      // mass select: top_p times the total weight
};

__device__ __forceinline__ SelectState CountSelect(int need) {
  SelectState st;
  st.need = static_cast<uint32_t>(need);
  return st;
}

template <int kBits>
__device__ __forceinline__ bool MatchesPrefix(uint32_t key, const SelectState& st) {
  const int high = Radix<kBits>::High(st.level);
  return high >= 32 || (key >> high) == (st.prefix >> high);
}

template <int kBits>
__device__ __forceinline__ uint32_t DigitOf(uint32_t key, int level) {
  const int shift = Radix<kBits>::Shift(level);
  const int width = Radix<kBits>::High(level) - shift;
  return (key >> shift) & ((1u << width) - 1u);
}

// The sum of `x` over the lanes in `peers`, valid in the lowest of them: a tree over the peers in
// log2(their number) steps (Westphal's reduce_peers). Every lane of the warp calls it; lanes with
// no peers (not even themselves) only keep the others company.
__device__ __forceinline__ double SumOverPeers(unsigned peers, double x) {
  const int lane = Lane();
  int position = __popc(peers & ((1u << lane) - 1u));  // among the peers
  unsigned above = peers & (0xfffffffeu << lane);
  while (__any_sync(kFullMask, above != 0u)) {
    const int next = __ffs(static_cast<int>(above));
    const double other = __shfl_sync(kFullMask, x, next > 0 ? next - 1 : lane);
    if (next > 0) x += other;
    above &= ~__ballot_sync(kFullMask, position & 1);
    position >>= 1;
  }
  return x;
}

// Adds (1, mass) to `bin` for every lane of the warp with a bin >= 0. Lanes with the same bin
// combine first, one atomic per bin: equal keys (ties, neighbouring ids, the weights of a flat
// distribution) would otherwise serialise on one address, and a double's atomic add on it.
template <bool kMass>
__device__ __forceinline__ void AddToBin(ExchangeSlot& out, int bin, float mass) {
  if (__ballot_sync(kFullMask, bin >= 0) == 0u) return;
  const unsigned same_bin = __match_any_sync(kFullMask, static_cast<unsigned>(bin));  // every lane takes part
  const unsigned peers = bin >= 0 ? same_bin : 0u;
  const bool leader = bin >= 0 && Lane() == __ffs(static_cast<int>(peers)) - 1;
  if constexpr (kMass) {
    const double sum = SumOverPeers(peers, static_cast<double>(mass));
    if (leader) atomicAdd(&out.mass[bin], sum);
  }
  if (leader) atomicAdd(&out.count[bin], static_cast<uint32_t>(__popc(peers)));
}

// Each thread of a kThreads block owns kBins / kThreads consecutive bins.
template <int kThreads, bool kMass>
__device__ __forceinline__ void ClearBins(ExchangeSlot& out) {
  constexpr int kPerThread = kBins / kThreads;
  const int first = kPerThread * static_cast<int>(threadIdx.x);
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    out.count[first + j] = 0u;
    if constexpr (kMass) out.mass[first + j] = 0.0;
  }
}

// After the atomics: the super-bin sums, each over the threads that own its bins.
template <int kThreads, bool kMass>
__device__ __forceinline__ void SumSuperBins(ExchangeSlot& out) {
  constexpr int kPerThread = kBins / kThreads;
  constexpr int kGroup = kBinsPerSuper / kPerThread;  // threads per super-bin
  __syncthreads();
  const int first = kPerThread * static_cast<int>(threadIdx.x);
  uint32_t count = out.count[first];
  double mass = kMass ? out.mass[first] : 0.0;
#pragma unroll
  for (int j = 1; j < kPerThread; ++j) {
    count += out.count[first + j];
    if constexpr (kMass) mass += out.mass[first + j];
  }
#pragma unroll
  for (int o = kGroup / 2; o > 0; o >>= 1) {
    count += __shfl_xor_sync(kFullMask, count, o);
    if constexpr (kMass) mass += ShflXor(mass, o);
  }
  if (static_cast<int>(threadIdx.x) % kGroup == 0) {
    out.super_count[threadIdx.x / kGroup] = count;
    if constexpr (kMass) out.super_mass[threadIdx.x / kGroup] = mass;
  }
}

// This block's histogram of the current digit of the keys that match the prefix, in the outbox,
// with its super-bin sums. key_of(id, value, &key, &mass) says whether a value is in the set.
template <int kBits, bool kMass, class Store, class KeyOf>
__device__ __forceinline__ void BuildHistogram(const SelectState& st, const Store& store, KeyOf&& key_of) {
  ExchangeSlot& out = Outbox();
  ClearBins<Store::kThreads, kMass>(out);
  __syncthreads();
  store.Visit([&](bool in, int id, float value) {
    uint32_t key = 0;
    float mass = 0.0f;
    int bin = -1;
    if (in && key_of(id, value, &key, &mass) && MatchesPrefix<kBits>(key, st)) {
      bin = kBins - 1 - static_cast<int>(DigitOf<kBits>(key, st.level));
    }
    AddToBin<kMass>(out, bin, mass);
  });
  SumSuperBins<Store::kThreads, kMass>(out);
}

// One warp: lane l holds items kPer*l .. kPer*l + kPer - 1 (descending key order) with their key
// counts and weights, which come after `count_before` keys and `mass_before` weight. Finds the
// item holding the need-th key (kCount) or where the running weight first reaches `target`
// (kMassAtLeast); when rounding leaves none, the last nonempty item.
template <Rank kRank, int kPer>
__device__ __forceinline__ BinChoice FindInWarp(const uint32_t (&count)[kPer], const double (&mass)[kPer],
                                                uint32_t count_before, double mass_before, uint32_t need,
                                                double target) {
  constexpr bool kMass = kRank != Rank::kCount;
  uint32_t count_inclusive = 0;
  double mass_inclusive = 0.0;
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    count_inclusive += count[j];
    if constexpr (kMass) mass_inclusive += mass[j];
  }
  count_inclusive = kernels::WarpInclusiveSum(count_inclusive);
  if constexpr (kMass) mass_inclusive = kernels::WarpInclusiveSum(mass_inclusive);
  uint32_t cb = __shfl_up_sync(kFullMask, count_inclusive, 1);
  double mb = 0.0;
  if constexpr (kMass) mb = __shfl_up_sync(kFullMask, mass_inclusive, 1);
  if (Lane() == 0) {
    cb = 0;
    mb = 0.0;
  }
  cb += count_before;
  mb += mass_before;
  bool hit = false;
  bool nonempty = false;
  BinChoice hit_choice{kPer * Lane(), cb, 0u, mb};
  BinChoice last_choice = hit_choice;
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    bool here;
    if constexpr (kRank == Rank::kCount) {
      here = cb < need && need <= cb + count[j];
    } else {
      here = mb < target && target <= mb + mass[j];
    }
    const BinChoice item{kPer * Lane() + j, cb, count[j], mb};
    if (here && !hit) {
      hit = true;
      hit_choice = item;
    }
    if (count[j] > 0u) {
      nonempty = true;
      last_choice = item;
    }
    cb += count[j];
    if constexpr (kMass) mb += mass[j];
  }
  const unsigned hits = __ballot_sync(kFullMask, hit);
  const unsigned nonempties = __ballot_sync(kFullMask, nonempty);
  int source;
  BinChoice mine = hit_choice;
  if (hits != 0u) {
    source = __ffs(static_cast<int>(hits)) - 1;
  } else {
    mine = last_choice;
    source = nonempties != 0u ? 31 - __clz(static_cast<int>(nonempties)) : 31;
  }
  return BinChoice{__shfl_sync(kFullMask, mine.index, source), __shfl_sync(kFullMask, mine.count_before, source),
                   __shfl_sync(kFullMask, mine.count_in, source),
                   kMass ? __shfl_sync(kFullMask, mine.mass_before, source) : mass_before};
}

// Ends a level whose histogram is in the outbox: every block reads all blocks' super-bins, then
// the bins of the chosen one, summed in rank order, and takes the same decision. A mass select's
// first level also sets st.target = top_p * the total weight: the histogram's and `mass_below`, the
// weight of values left out of it; s.short_of_target says whether the histogram's is less than the
// target, so that the cut lies among those values.
template <int kBits, Rank kRank, bool kCluster>
__device__ __forceinline__ void ResolveLevel(SelectState& st, int blocks, double top_p, double mass_below = 0.0) {
  constexpr bool kMass = kRank != Rank::kCount;
  constexpr int kRanks = kCluster ? kMaxCluster : 1;
  SharedStorage& s = Smem();
  const int slot = Exchange<kCluster>();
  if (Warp() == 0) {
    uint32_t super_count[2] = {0u, 0u};
    double super_mass[2] = {0.0, 0.0};
#pragma unroll
    for (int r = 0; r < kRanks; ++r) {
      if (r < blocks) {
        const ExchangeSlot* in = AtRank<kCluster>(&s.exchange[slot], r);
        const uint2 c = reinterpret_cast<const uint2*>(in->super_count)[Lane()];
        super_count[0] += c.x;
        super_count[1] += c.y;
        if constexpr (kMass) {
          const double2 m = reinterpret_cast<const double2*>(in->super_mass)[Lane()];
          super_mass[0] += m.x;
          super_mass[1] += m.y;
        }
      }
    }
    double target = st.target;
    bool short_of_target = false;
    if (kMass && st.level == 0) {
      const double histogram = WarpAllReduce(super_mass[0] + super_mass[1], Plus{});
      target = top_p * (histogram + mass_below);
      short_of_target = histogram < target;  // only where mass_below > 0, as top_p <= 1
    }
    const BinChoice super = FindInWarp<kRank, 2>(super_count, super_mass, 0u, st.mass_above, st.need, target);
    uint32_t bin_count[1] = {0u};
    double bin_mass[1] = {0.0};
    const int bin = super.index * kBinsPerSuper + Lane();
#pragma unroll
    for (int r = 0; r < kRanks; ++r) {
      if (r < blocks) {
        const ExchangeSlot* in = AtRank<kCluster>(&s.exchange[slot], r);
        bin_count[0] += in->count[bin];
        if constexpr (kMass) bin_mass[0] += in->mass[bin];
      }
    }
    BinChoice choice =
        FindInWarp<kRank, 1>(bin_count, bin_mass, super.count_before, super.mass_before, st.need, target);
    if (Lane() == 0) {
      choice.index += super.index * kBinsPerSuper;
      s.choice = choice;
      s.target = target;
      if (kMass && st.level == 0) s.short_of_target = short_of_target;
    }
  }
  __syncthreads();
  const BinChoice choice = s.choice;
  st.target = s.target;
  st.prefix |= static_cast<uint32_t>(kBins - 1 - choice.index) << Radix<kBits>::Shift(st.level);
  st.need -= choice.count_before;
  st.above += choice.count_before;
  st.mass_above = choice.mass_before;
  st.group = choice.count_in;
  ++st.level;
}

// The need-th lowest token id among the store's values for which is_tied(value) holds, over the
// cluster.
template <class Store, class IsTied>
__device__ __noinline__ int SelectTiedId(uint32_t need, const Store store, const IsTied is_tied) {
  SelectState st;
  st.need = need;
#pragma unroll 1
  for (int level = 0; level < Radix<kIdBits>::kLevels; ++level) {
    BuildHistogram<kIdBits, false>(st, store, [&](int id, float value, uint32_t* key, float*) {
      if (!is_tied(value)) return false;
      *key = kIdMask - static_cast<uint32_t>(id);  // the lowest id has the largest key
      return true;
    });
    ResolveLevel<kIdBits, Rank::kCount, Store::kCluster>(st, store.blocks, 0.0);
  }
  return static_cast<int>(kIdMask - st.prefix);
}

// One level of a count select over the values' OrderedKeys; not inlined, as a pass over the row
// wants the registers to itself.
template <class Store>
__device__ __noinline__ SelectState LargestLevel(SelectState st, const Store store) {
  BuildHistogram<32, false>(st, store, [](int, float value, uint32_t* key, float*) {
    *key = OrderedKey(value);
    return true;
  });
  ResolveLevel<32, Rank::kCount, Store::kCluster>(st, store.blocks, 0.0);
  return st;
}

// The rest of a count select (CountSelect(need), or further): the `need` largest values of the row
// in (value descending, id ascending) order, as a cut: top-k over the penalised logits, the top
// logprobs over the raw ones.
template <class Store>
__device__ __noinline__ Cut FinishLargest(SelectState st, const Store store) {
#pragma unroll 1
  while (st.level < Radix<32>::kLevels) st = LargestLevel(st, store);
  Cut cut{true, st.prefix, INT_MAX};
  if (st.need < st.group) {
    const uint32_t key = st.prefix;
    cut.id = SelectTiedId(st.need, store, [key](float value) { return OrderedKey(value) == key; });
  }
  return cut;
}

// Top-p over weights (Sampler::KeepTopP): (weight descending, id ascending) until the running
// weight reaches top_p times the total. Tokens of weight 0 are not kept anyway, so only positive
// weights take part. A weight's bits are ordered like it and, as weights are at most 1, fit in
// kWeightBits: the first digit spans only the exponents and mantissas weights have.
constexpr int kWeightBits = 30;
static_assert(0x3f800000u < (1u << kWeightBits), "the bits of 1.0f fit in kWeightBits");

template <class Store>
__device__ __noinline__ SelectState TopPLevel(SelectState st, const Store store, float top_p) {
  BuildHistogram<kWeightBits, true>(st, store, [](int, float w, uint32_t* key, float* mass) {
    if (!(w > 0.0f)) return false;
    *key = __float_as_uint(w);
    *mass = w;
    return true;
  });
  ResolveLevel<kWeightBits, Rank::kMassAtLeast, Store::kCluster>(st, store.blocks, static_cast<double>(top_p));
  return st;
}

// The rest of a top-p select (from a SelectState{}, or further), as a cut.
template <class Store>
__device__ __noinline__ Cut FinishTopP(SelectState st, const Store store, float top_p) {
#pragma unroll 1
  while (st.level < Radix<kWeightBits>::kLevels) st = TopPLevel(st, store, top_p);
  // The last key's tokens all weigh the same: keep as many (lowest ids first) as reach the target.
  const uint32_t key = st.prefix;
  const float weight = __uint_as_float(key);
  uint32_t take = st.group;
  if (weight > 0.0f) {
    const double wanted = ceil((st.target - st.mass_above) / static_cast<double>(weight));
    if (wanted < static_cast<double>(st.group)) take = wanted < 1.0 ? 1u : static_cast<uint32_t>(wanted);
  }
  Cut cut{true, key, INT_MAX};
  if (take < st.group) {
    cut.id = SelectTiedId(take, store, [key](float w) { return w > 0.0f && __float_as_uint(w) == key; });
  }
  return cut;
}

// ---------------------------------------------------------------------------------------------
// Top logprobs

// This block's members of the top-logprob cut (over raw logits), in s.top: s.top_count of them,
// at most kSamplingMaxTopLogprobs as the cut holds no more.
template <class Store>
__device__ __forceinline__ void CollectTopLogprobs(const Cut& cut, const Store& store) {
  SharedStorage& s = Smem();
  if (threadIdx.x == 0) s.top_count = 0;
  __syncthreads();
  store.Visit([&](bool in, int id, float v) {
    if (in && cut.Keeps(OrderedKey(v), id)) {
      const int j = atomicAdd(&s.top_count, 1);
      if (j < kSamplingMaxTopLogprobs) s.top[j] = ListEntry{id, v};
    }
  });
  __syncthreads();
}

// One thread: `total` entries of `list` sorted (logit descending, id ascending), the first n
// written as logprobs.
__device__ __forceinline__ void WriteSortedTopLogprobs(ListEntry* list, int total, int n, double log_normalizer,
                                                       SamplingTopLogprob* out) {
  for (int i = 1; i < total; ++i) {  // insertion sort
    const ListEntry e = list[i];
    int j = i - 1;
    while (j >= 0 && (list[j].value < e.value || (list[j].value == e.value && list[j].id > e.id))) {
      list[j + 1] = list[j];
      --j;
    }
    list[j + 1] = e;
  }
  for (int i = 0; i < MinInt(total, n); ++i) {
    out[i] = SamplingTopLogprob{list[i].id, static_cast<float>(static_cast<double>(list[i].value) - log_normalizer)};
  }
}

// ---------------------------------------------------------------------------------------------
// The draw

// A kept token's weight (it survived top-k, min-p and top-p), else 0.
__device__ __forceinline__ float KeptWeight(float w, int t, const Cut& top_p) {
  return w > 0.0f && top_p.Keeps(__float_as_uint(w), t) ? w : 0.0f;
}

// One warp scans the store's chunks from `chunk` on, `running` being the kept weight before it:
// the first token whose running weight exceeds `target`, else `fallback`.
template <class Store>
__device__ __forceinline__ int ScanChunks(const Store& store, const Cut& top_p, int chunk, double running,
                                          double target, int fallback) {
  const int chunks = (store.n + kChunk - 1) / kChunk;
  for (int c = chunk; c < chunks; ++c) {
    float w[4];
    int id[4];
    store.ScanValues(c, w, id);
    float kept[4];
    double partial[4];
    double lane_sum = 0.0;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      kept[e] = KeptWeight(w[e], id[e], top_p);
      lane_sum += static_cast<double>(kept[e]);
      partial[e] = lane_sum;
    }
    const double inclusive = kernels::WarpInclusiveSum(lane_sum);
    double exclusive = __shfl_up_sync(kFullMask, inclusive, 1);
    if (Lane() == 0) exclusive = 0.0;
    const double base = running + exclusive;
    int hit = -1;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (hit < 0 && kept[e] > 0.0f && base + partial[e] > target) hit = id[e];
    }
    const unsigned lanes = __ballot_sync(kFullMask, hit >= 0);
    if (lanes != 0u) return __shfl_sync(kFullMask, hit, __ffs(static_cast<int>(lanes)) - 1);
    running += __shfl_sync(kFullMask, inclusive, 31);
  }
  return fallback;
}

// The draw (Sampler::Draw's loop) over the kept tokens in id order: the first whose running
// weight exceeds uniform * total, or the last kept one when rounding leaves none. Each block sums
// its chunks (each thread a run of them); the block whose range holds the target finds the chunk,
// and one warp the token, which its thread 0 writes.
template <class Store>
__device__ __noinline__ void Draw(const Store store, const Cut top_p, double uniform) {
  constexpr int kThreads = Store::kThreads;
  SharedStorage& s = Smem();
  double* chunk_mass = store.ChunkMass();
  const int chunks = (store.n + kChunk - 1) / kChunk;
  int last_kept = -1;
  for (int c = Warp(); c < chunks; c += kThreads / 32) {
    float w[4];
    int id[4];
    store.ChunkValues(c, w, id);
    double sum = 0.0;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float kept = KeptWeight(w[e], id[e], top_p);
      if (kept > 0.0f) {
        sum += static_cast<double>(kept);
        last_kept = id[e];
      }
    }
    sum = WarpAllReduce(sum, Plus{});
    if (Lane() == 0) chunk_mass[c] = sum;
  }
  if constexpr (Store::kPenaltiesApart) {
    __syncthreads();  // every chunk's sum of the others is written
    store.VisitPenalised([&](int t, float w) {
      const float kept = KeptWeight(w, t, top_p);
      if (kept > 0.0f) {
        atomicAdd(&chunk_mass[t / kChunk], static_cast<double>(kept));
        last_kept = MaxInt(last_kept, t);
      }
    });
  }
  last_kept = BlockAllReduce<kThreads>(last_kept, Max{}, s.reduce);  // its barriers publish chunk_mass
  const int tid = static_cast<int>(threadIdx.x);
  const int per_thread = (chunks + kThreads - 1) / kThreads;
  const int first = MinInt(tid * per_thread, chunks);
  const int end = MinInt(first + per_thread, chunks);
  double mine = 0.0;
  for (int c = first; c < end; ++c) mine += chunk_mass[c];
  double block_mass = 0.0;
  const double before = BlockExclusiveSum<kThreads>(mine, &block_mass, s.reduce);
  if (tid < store.blocks) *AtRank<Store::kCluster>(&Outbox().draw_mass[store.rank], tid) = block_mass;
  const ExchangeSlot& in = s.exchange[Exchange<Store::kCluster>()];

  // Every block finds the block that holds the target, with the same sums.
  double total = 0.0;
  for (int r = 0; r < store.blocks; ++r) total += in.draw_mass[r];
  const double target = uniform * total;
  int chosen = -1;
  int last = -1;
  double chosen_before = 0.0;
  double last_before = 0.0;
  double running = 0.0;
  for (int r = 0; r < store.blocks; ++r) {
    const double mass = in.draw_mass[r];
    if (chosen < 0 && running <= target && target < running + mass) {
      chosen = r;
      chosen_before = running;
    }
    if (mass > 0.0) {
      last = r;
      last_before = running;
    }
    running += mass;
  }
  if (chosen < 0) {
    chosen = last;
    chosen_before = last_before;
  }
  if (chosen < 0) {  // no positive weight at all (logits of -inf or NaN): the argmax
    if (store.rank == 0 && tid == 0) WriteToken(s.stats.best.id);
    return;
  }
  if (chosen != store.rank) return;

  if (tid == 0) {
    s.pick = INT_MAX;
    s.fallback = -1;
  }
  __syncthreads();
  running = chosen_before + before;
  for (int c = first; c < end; ++c) {
    const double mass = chunk_mass[c];
    if (running <= target && target < running + mass) atomicMin(&s.pick, c);
    if (mass > 0.0) atomicMax(&s.fallback, c);
    running += mass;
  }
  __syncthreads();
  const int chunk = s.pick != INT_MAX ? s.pick : s.fallback;
  if (chunk >= first && chunk < end) {  // the chunk's owner: the kept weight before it
    double from = chosen_before + before;
    for (int c = first; c < chunk; ++c) from += chunk_mass[c];
    s.scan_from = from;
  }
  __syncthreads();
  if (Warp() != 0) return;
  const int token = chunk < 0 ? last_kept : ScanChunks(store, top_p, chunk, s.scan_from, target, last_kept);
  if (Lane() == 0) WriteToken(token);
}

// The values of a slice or the list become Sampler::Draw's weights, in place.
template <class Store>
__device__ __forceinline__ void ComputeWeights(const Store& store, const Survivors& keep) {
  float* values = store.Values();
  const double* exp_table = Smem().exp_table;
  for (int i = static_cast<int>(threadIdx.x); i < store.n; i += Store::kThreads) {
    values[i] = keep.WeightOf(values[i], store.Id(i), exp_table);
  }
  __syncthreads();
}

// ---------------------------------------------------------------------------------------------
// SampleKernel: the cluster split

// Copies the slice into shared memory; returns this thread's log-sum-exp of some of its values.
// Whole 16-byte quads go by cp.async, all in flight at once and through no registers.
__device__ __forceinline__ LogSumExp LoadSlice(const float* row_logits, const SliceStore& slice) {
  const float* src = row_logits + slice.begin;
  float* dst = SliceValues();
  const int tid = static_cast<int>(threadIdx.x);
  const int padded = (slice.n + 3) / 4 * 4;  // the last quad's tail reads as -inf
  if ((reinterpret_cast<uintptr_t>(src) & 15u) == 0) {
    const int whole = slice.n / 4;
    for (int q = tid; q < whole; q += kClusterThreads) __pipeline_memcpy_async(dst + 4 * q, src + 4 * q, 16);
    __pipeline_commit();
    for (int i = 4 * whole + tid; i < padded; i += kClusterThreads) dst[i] = i < slice.n ? __ldg(src + i) : -INFINITY;
    __pipeline_wait_prior(0);
  } else {
    for (int i = tid; i < padded; i += kClusterThreads) dst[i] = i < slice.n ? __ldg(src + i) : -INFINITY;
  }
  __syncthreads();
  LogSumExp lse{-INFINITY, 0.0f};
  for (int i = tid; i < slice.n; i += kClusterThreads) lse.Add(dst[i]);
  return lse;
}

// Sampler::ApplyPenalties on the slice, in place.
__device__ __forceinline__ void ApplyPenalties(const SamplingArgs& args, const SamplingRowParams& p,
                                               const SliceStore& slice) {
  float* values = SliceValues();
  for (int e = p.penalty_begin + static_cast<int>(threadIdx.x); e < p.penalty_end; e += kClusterThreads) {
    const SamplingPenaltyToken pt = args.penalty_tokens[e];
    const int i = pt.token - slice.begin;  // tokens are distinct: no two threads write one value
    if (i >= 0 && i < slice.n) values[i] = PenalisedLogit(values[i], pt, p);
  }
  __syncthreads();
}

// Leaves this block's members of the top-logprob cut (over the raw logits in the slice) in rank
// 0's slot for the coming exchange.
__device__ __forceinline__ void PublishTopLogprobs(const Cut& cut, const SliceStore& slice) {
  SharedStorage& s = Smem();
  CollectTopLogprobs(cut, slice);
  const int count = MinInt(s.top_count, kSamplingMaxTopLogprobs);
  TopList* dst = AtRank<true>(&Outbox().top[slice.rank], 0);
  if (static_cast<int>(threadIdx.x) < count) dst->entries[threadIdx.x] = s.top[threadIdx.x];
  if (threadIdx.x == 0) dst->count = count;
}

// Rank 0, one thread: the blocks' lists merged, best first, as logprobs.
__device__ __forceinline__ void WriteTopLogprobs(const ExchangeSlot& in, int blocks, int n, double log_normalizer,
                                                 SamplingTopLogprob* out) {
  ListEntry* list = Smem().top;
  int total = 0;
  for (int r = 0; r < blocks; ++r) {
    for (int j = 0; j < in.top[r].count && total < kSamplingMaxTopLogprobs; ++j) list[total++] = in.top[r].entries[j];
  }
  WriteSortedTopLogprobs(list, total, n, log_normalizer, out);
}

// The argmax of the penalised slice and the log-sum-exp, combined over the cluster (and the top
// logprobs written, when asked for: their lists travel in the same exchange).
__device__ __noinline__ RowStats SummarizeRow(const SliceStore slice, LogSumExp lse, int top_n,
                                              SamplingTopLogprob* top) {
  SharedStorage& s = Smem();
  const float* values = SliceValues();
  ArgMax best{-INFINITY, INT_MAX};
  for (int i = static_cast<int>(threadIdx.x); i < slice.n; i += kClusterThreads) best.Add(values[i], slice.begin + i);
  lse = BlockAllReduce<kClusterThreads>(lse, CombineLogSumExp{}, s.reduce);
  best = BlockAllReduce<kClusterThreads>(best, CombineArgMax{}, s.reduce);
  const RowSummary mine{lse, best, slice.rank == 0 && slice.n > 0 && values[0] != values[0]};
  if (static_cast<int>(threadIdx.x) < slice.blocks) *AtRank<true>(&Outbox().summary[slice.rank], threadIdx.x) = mine;
  const ExchangeSlot& in = s.exchange[Exchange<true>()];
  const RowStats stats = CombineSummaries(in.summary, slice.blocks);
  if (threadIdx.x == 0) {
    s.stats = stats;
    if (top_n > 0 && slice.rank == 0) WriteTopLogprobs(in, slice.blocks, top_n, stats.log_normalizer, top);
  }
  return stats;
}

__global__ void __launch_bounds__(kClusterThreads, 1) SampleKernel(const SamplingArgs args, const int slice_size) {
  __cluster_barrier_arrive_relaxed();  // "this block runs": waited for before the first exchange
  SharedStorage& s = Smem();
  const Slice part = SliceOf(args.vocab, slice_size);
  const SliceStore slice{part.begin, part.n, part.blocks, part.rank};
  const int row = static_cast<int>(blockIdx.x) / slice.blocks;
  const SamplingRowParams& p = args.params[row];
  const float* row_logits = args.logits + static_cast<int64_t>(row) * args.row_stride;
  if (threadIdx.x == 0) {
    s.outbox = 0;
    s.output = RowOutput{row_logits, args.results + row, args.vocab};
  }
  if (threadIdx.x < 32) s.exp_table[threadIdx.x] = exp2(static_cast<double>(threadIdx.x) / 32.0);
  kernels::PdlWait();  // the logits come from the kernel before
  const LogSumExp lse = LoadSlice(row_logits, slice);
  __cluster_barrier_wait();  // every block of the cluster runs: its shared memory may be written

  // The top logprobs, while the slice holds the raw logits; written after the summary exchange.
  const int top_n = args.top != nullptr ? MinInt(p.top_logprobs, args.vocab) : 0;
  if (top_n > 0) PublishTopLogprobs(FinishLargest(CountSelect(top_n), slice), slice);
  if (args.penalty_tokens != nullptr && p.penalty_end > p.penalty_begin) ApplyPenalties(args, p, slice);
  const RowStats stats = SummarizeRow(slice, lse, top_n, args.top + (top_n > 0 ? p.top_offset : 0));

  if (p.temperature == 0.0f) {
    if (slice.rank == 0 && threadIdx.x == 0) WriteToken(stats.best.id);
    return;
  }
  Survivors keep{Cut{}, stats.best.value, p.temperature, p.min_p};
  if (p.top_k > 0 && p.top_k < args.vocab) keep.top_k = FinishLargest(CountSelect(p.top_k), slice);
  ComputeWeights(slice, keep);
  Cut top_p;
  if (p.top_p < 1.0f) top_p = FinishTopP(SelectState{}, slice, p.top_p);
  Draw(slice, top_p, p.uniform);
}

// ---------------------------------------------------------------------------------------------
// SampleRowKernel: the row split

// Notes the block's row and output in SharedStorage and marks its penalised tokens in the bitmap.
__device__ __forceinline__ void SetUpRow(const SamplingArgs& args, const SamplingRowParams& p, int row_index) {
  SharedStorage& s = Smem();
  const int tid = static_cast<int>(threadIdx.x);
  const bool penalised = args.penalty_tokens != nullptr && p.penalty_end > p.penalty_begin;
  if (tid == 0) {
    const float* logits = args.logits + static_cast<int64_t>(row_index) * args.row_stride;
    s.output = RowOutput{logits, args.results + row_index, args.vocab};
    s.row = RowInfo{logits, penalised ? args.penalty_tokens + p.penalty_begin : nullptr, &p,
                    penalised ? p.penalty_end - p.penalty_begin : 0, (reinterpret_cast<uintptr_t>(logits) & 15u) == 0};
  }
  if (penalised) {
    uint32_t* marked = PenaltyBitmap();
    for (int w = tid; w < (args.vocab + 31) / 32; w += kRowThreads) marked[w] = 0u;
    __syncthreads();
    for (int e = p.penalty_begin + tid; e < p.penalty_end; e += kRowThreads) {
      const int t = args.penalty_tokens[e].token;
      if (t >= 0 && t < args.vocab) atomicOr(&marked[t >> 5], 1u << (t & 31));
    }
  }
  __syncthreads();
}

// The log-sum-exp of the raw logits and the argmax of the penalised ones, into s.stats; where asked
// for, each thread's largest raw and penalised logit by OrderedKey (the thread tops, in
// Scratch(); GatherAboveTops).
__device__ __noinline__ void RowFirstPass(int n, bool raw_tops, bool penalised_tops) {
  SharedStorage& s = Smem();
  const RowInfo row = s.row;
  LogSumExp lse{-INFINITY, 0.0f};
  ArgMax best{-INFINITY, INT_MAX};
  uint32_t raw_top = 0u;        // the smallest key: no value yet
  uint32_t penalised_top = 0u;
  int first_is_nan = 0;  // Sampler::Argmax keeps token 0 when its penalised logit is NaN
  auto add = [&](bool raw_in, bool penalised_in, int t, float raw, float penalised) {
    if (raw_in) {
      lse.Add(raw);
      if (raw_tops) raw_top = max(raw_top, OrderedKey(raw));
    }
    if (penalised_in) {
      best.Add(penalised, t);
      if (t == 0) first_is_nan = penalised != penalised;
      if (penalised_tops) penalised_top = max(penalised_top, OrderedKey(penalised));
    }
  };
  StreamRow<kRowUnroll>(row, n, row.penalty_count > 0,
                        [&](bool in, bool marked, int t, float logit) { add(in, in && !marked, t, logit, logit); });
  VisitPenaltyEntries(row, n, [&](bool in, int t, float penalised) { add(false, in, t, 0.0f, penalised); });
  Scratch().raw_tops[threadIdx.x] = raw_top;
  Scratch().penalised_tops[threadIdx.x] = penalised_top;
  first_is_nan = __syncthreads_or(first_is_nan);
  lse = BlockAllReduce<kRowThreads>(lse, CombineLogSumExp{}, s.reduce);
  best = BlockAllReduce<kRowThreads>(best, CombineArgMax{}, s.reduce);
  if (first_is_nan != 0) best.id = 0;
  if (threadIdx.x == 0) s.stats = RowStats{static_cast<double>(lse.max) + log(static_cast<double>(lse.sum)), best};
  __syncthreads();
}

// Bitonic sort of the list's first n entries by id (distinct), padded to a power of two with ids
// that sort last.
__device__ void SortListById(int n) {
  CandidateList& list = Scratch().u.list;
  const int tid = static_cast<int>(threadIdx.x);
  int size = 1;
  while (size < n) size <<= 1;
  for (int i = n + tid; i < size; i += kRowThreads) list.ids[i] = INT_MAX;
  __syncthreads();
  for (int k = 2; k <= size; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int i = tid; i < size; i += kRowThreads) {
        const int partner = i ^ j;
        if (partner > i) {
          const int a = list.ids[i];
          const int b = list.ids[partner];
          if ((a > b) == ((i & k) == 0)) {
            list.ids[i] = b;
            list.ids[partner] = a;
            const float v = list.values[i];
            list.values[i] = list.values[partner];
            list.values[partner] = v;
          }
        }
      }
      __syncthreads();
    }
  }
}

// The list as a store.
__device__ __forceinline__ ListStore Listed() { return ListStore{0, MinInt(Smem().list_size, kListCapacity), 1, 0}; }

// The row's values for which keep(id, value) holds (the caller counted at most kListCapacity),
// gathered into the list in id order. An atomic a value kept: they are few, and a warp vote on every
// value, as TopPLevelGathering's append takes (many of its tokens may be heavy), made the top-k and
// top-logprob gathers 13-16% slower at 128-512 rows (sampling_bench, H200).
//
// Callers read the list and its size just before (to choose this path, or in a select over the
// list): the barrier first keeps thread 0's reset from overtaking a slower warp's read. Without it
// compute-sanitizer's racecheck found SampleTopPOverRow's warps taking different branches, and a
// wrong token, at 96 rows of 129280 (DeviceSamplerTest).
template <class Store, class Keep>
__device__ __noinline__ void Gather(const Store row, const Keep keep) {
  SharedStorage& s = Smem();
  CandidateList& list = Scratch().u.list;
  __syncthreads();
  if (threadIdx.x == 0) s.list_size = 0;
  __syncthreads();
  row.Visit([&](bool in, int id, float value) {
    if (in && keep(id, value)) {
      const int j = atomicAdd(&s.list_size, 1);
      if (j < kListCapacity) {
        list.ids[j] = id;
        list.values[j] = value;
      }
    }
  });
  __syncthreads();
  SortListById(MinInt(s.list_size, kListCapacity));
}

// Whether a select's first digit leaves few enough values at or above it to gather.
__device__ __forceinline__ bool FitsList(const SelectState& st) {
  return st.above + st.group <= static_cast<uint32_t>(kListCapacity);
}

// The rest of a count select (FitsList) over the row's values at or above its first digit,
// gathered into the list, which stays for what follows.
template <RowValues kValues>
__device__ __forceinline__ Cut FinishLargestInList(SelectState st, const RowStore<kValues> row) {
  const uint32_t min_key = st.prefix;
  Gather(row, [min_key](int, float v) { return OrderedKey(v) >= min_key; });
  return FinishLargest(st, Listed());
}

// A count select of the row's `need` largest values started from the thread tops (need at most
// kMaxTopsNeed): each of the top `need` tops is a value of the row, so at least `need` values lie at
// or above the need-th largest top, and as each thread saw 1/512 of the row, spread over it, usually
// not many more. Those are gathered into the list; returns whether they fit: then the list holds the
// row's `need` largest values, ties included. Unlike a first digit over the row, which a first
// pass must histogram with an atomic per distinct value a warp holds, this costs the first pass a
// maximum per value.
constexpr int kMaxTopsNeed = kRowThreads / 2;

template <RowValues kValues>
__device__ __noinline__ bool GatherAboveTops(int need, const RowStore<kValues> row, const uint32_t* tops) {
  CandidateList& list = Scratch().u.list;
  const int tid = static_cast<int>(threadIdx.x);
  list.values[tid] = KeyValue(tops[tid]);
  list.ids[tid] = tid;
  if (tid == 0) Smem().list_size = kRowThreads;
  __syncthreads();
  SelectState st = CountSelect(need);
#pragma unroll 1
  while (st.level < Radix<32>::kLevels) st = LargestLevel(st, Listed());
  const uint32_t min_key = st.prefix;  // the need-th largest top
  Gather(row, [min_key](int, float v) { return OrderedKey(v) >= min_key; });
  return Smem().list_size <= kListCapacity;
}

// A count select's cut, over the list or over the row.
struct PlacedCut {
  Cut cut;
  bool listed;  // the list holds every value the cut keeps, and the cut is over the list
};

// A count select of the row's `need` largest values: from the thread tops where it can, else from
// a first digit over the row, gathering the values it leaves where they fit.
template <RowValues kValues>
__device__ __noinline__ PlacedCut RowLargest(int need, const RowStore<kValues> row, const uint32_t* tops) {
  if (need <= kMaxTopsNeed && GatherAboveTops(need, row, tops)) return {FinishLargest(CountSelect(need), Listed()), true};
  const SelectState st = LargestLevel(CountSelect(need), row);
  if (FitsList(st)) return {FinishLargestInList(st, row), true};
  return {FinishLargest(st, row), false};
}

// The same for top-p over the row's weights.
__device__ __forceinline__ Cut FinishTopPInList(SelectState st, const RowStore<RowValues::kWeights> row, float top_p) {
  const uint32_t min_key = st.prefix;
  Gather(row, [min_key](int, float w) { return w > 0.0f && __float_as_uint(w) >= min_key; });
  return FinishTopP(st, Listed(), top_p);
}

// Top-p's first level over the row's weights that also gathers the heavy tokens (a weight's bits at
// least min_key: 2^-10, kGatherKey, as a rule) into the list. Only those enter the histogram; the
// others' weight is summed apart. A histogram's atomics cost more than the rest of a token's work,
// and a peaked row's top-p cut lies among its heavy tokens, so that its select and draw then stay
// in the list. Where the cut lies among the light tokens after all (s.short_of_target), the caller
// runs it again with min_key 0: every token heavy. Where s.list_size <= kListCapacity, the list
// holds every token of the histogram, in id order.
constexpr uint32_t kGatherKey = 0x3a800000u;  // 2^-10 as a float's bits
static_assert((kGatherKey & ((1u << (kWeightBits - kDigitBits)) - 1u)) == 0u,
              "light and heavy weights differ in the first digit: a heavy cut's later levels meet no light token");

__device__ __noinline__ SelectState TopPLevelGathering(const RowStore<RowValues::kWeights> row, float top_p,
                                                      uint32_t min_key) {
  SharedStorage& s = Smem();
  CandidateList& list = Scratch().u.list;
  ExchangeSlot& out = Outbox();
  __syncthreads();  // as in Gather: the caller has just read the list's size and the bins
  ClearBins<kRowThreads, true>(out);
  if (threadIdx.x == 0) s.list_size = 0;
  __syncthreads();
  double light = 0.0;
  row.Visit([&](bool in, int id, float w) {
    const bool heavy = in && w > 0.0f && __float_as_uint(w) >= min_key;
    if (in && w > 0.0f && !heavy) light += static_cast<double>(w);
    const uint32_t digit = DigitOf<kWeightBits>(__float_as_uint(w), 0);
    AddToBin<true>(out, heavy ? kBins - 1 - static_cast<int>(digit) : -1, w);
    const unsigned lanes = __ballot_sync(kFullMask, heavy && s.list_size <= kListCapacity);
    if (lanes == 0u) return;  // none heavy, or the list has overflowed: its size only says so now
    const int first = __ffs(static_cast<int>(lanes)) - 1;
    int base = 0;
    if (Lane() == first) base = atomicAdd(&s.list_size, __popc(lanes));
    const int j = __shfl_sync(kFullMask, base, first) + __popc(lanes & ((1u << Lane()) - 1u));
    if (((lanes >> Lane()) & 1u) != 0u && j < kListCapacity) {
      list.ids[j] = id;
      list.values[j] = w;
    }
  });
  SumSuperBins<kRowThreads, true>(out);
  if (s.list_size <= kListCapacity) SortListById(s.list_size);
  light = BlockAllReduce<kRowThreads>(light, Plus{}, s.reduce);
  SelectState st;
  ResolveLevel<kWeightBits, Rank::kMassAtLeast, false>(st, 1, static_cast<double>(top_p), light);
  return st;
}

// The row's top logprobs, over the list where it can, else over the row.
__device__ __noinline__ void RowTopLogprobs(int vocab, int n, SamplingTopLogprob* out) {
  SharedStorage& s = Smem();
  const RowStore<RowValues::kRaw> raw{vocab};
  const PlacedCut top = RowLargest(n, raw, Scratch().raw_tops);
  if (top.listed) {
    CollectTopLogprobs(top.cut, Listed());
  } else {
    CollectTopLogprobs(top.cut, raw);
  }
  if (threadIdx.x == 0) {
    WriteSortedTopLogprobs(s.top, MinInt(s.top_count, kSamplingMaxTopLogprobs), n, s.stats.log_normalizer, out);
  }
}

// Top-p (top_p < 1) and the draw over the row's weights: in the list where the first level's
// gathered tokens hold the cut, or where its digit leaves few enough tokens to gather them now,
// else over the row. The row's top_p and uniform are read where they are used (from the pointer
// in shared memory), not held across the calls.
__device__ __noinline__ void SampleTopPOverRow(const RowStore<RowValues::kWeights> row) {
  const SamplingRowParams* const& p = Smem().row.params;
  SelectState st = TopPLevelGathering(row, p->top_p, kGatherKey);
  if (Smem().short_of_target) st = TopPLevelGathering(row, p->top_p, 0u);
  if (Smem().list_size <= kListCapacity) {
    const Cut cut = FinishTopP(st, Listed(), p->top_p);
    Draw(Listed(), cut, p->uniform);
  } else if (FitsList(st)) {
    const Cut cut = FinishTopPInList(st, row, p->top_p);  // gathers the list first
    Draw(Listed(), cut, p->uniform);
  } else {
    const Cut cut = FinishTopP(st, row, p->top_p);
    Draw(row, cut, p->uniform);
  }
}

// Top-p and the draw over weights: in the list, or computed from the row.
template <class Store>
__device__ __forceinline__ void SampleWeights(const Store& store, float top_p, double uniform) {
  Cut cut;
  if (top_p < 1.0f) {
    if constexpr (std::is_same_v<Store, RowStore<RowValues::kWeights>>) {
      SampleTopPOverRow(store);  // the row's own top_p and uniform
      return;
    }
    cut = FinishTopP(SelectState{}, store, top_p);
  }
  Draw(store, cut, uniform);
}

// A sampled row (temperature > 0) after the first pass: top-k, min-p, top-p and the draw.
__device__ __forceinline__ void SampleRow(int vocab, const SamplingRowParams& p) {
  SharedStorage& s = Smem();
  if (p.top_k > 0 && p.top_k < vocab) {
    const PlacedCut top_k = RowLargest(p.top_k, RowStore<RowValues::kPenalised>{vocab}, Scratch().penalised_tops);
    if (top_k.listed) {
      const ListStore list = Listed();
      ComputeWeights(list, Survivors{top_k.cut, s.stats.best.value, p.temperature, p.min_p});
      SampleWeights(list, p.top_p, p.uniform);
      return;
    }
    if (threadIdx.x == 0) s.keep = Survivors{top_k.cut, s.stats.best.value, p.temperature, p.min_p};
  } else if (threadIdx.x == 0) {
    s.keep = Survivors{Cut{}, s.stats.best.value, p.temperature, p.min_p};
  }
  __syncthreads();
  SampleWeights(RowStore<RowValues::kWeights>{vocab}, p.top_p, p.uniform);
}

__global__ void __launch_bounds__(kRowThreads, 2) SampleRowKernel(const SamplingArgs args) {
  SharedStorage& s = Smem();
  const int row_index = static_cast<int>(blockIdx.x);
  const SamplingRowParams& p = args.params[row_index];
  if (threadIdx.x == 0) s.outbox = 0;
  if (threadIdx.x < 32) s.exp_table[threadIdx.x] = exp2(static_cast<double>(threadIdx.x) / 32.0);
  kernels::PdlWait();  // the logits come from the kernel before
  SetUpRow(args, p, row_index);  // its barrier publishes the above too

  const int top_n = args.top != nullptr ? MinInt(p.top_logprobs, args.vocab) : 0;
  const bool greedy = p.temperature == 0.0f;
  const bool top_k_on = !greedy && p.top_k > 0 && p.top_k < args.vocab;
  RowFirstPass(args.vocab, top_n > 0, top_k_on);
  if (top_n > 0) RowTopLogprobs(args.vocab, top_n, args.top + p.top_offset);
  if (!greedy) {
    SampleRow(args.vocab, p);
  } else if (threadIdx.x == 0) {
    WriteToken(s.stats.best.id);
  }
}

// ---------------------------------------------------------------------------------------------
// GreedyKernel: rows of temperature 0 without top logprobs, as clusters or (kCluster false) one
// plain block per row.

struct GreedyShared {
  uint32_t penalised[kSamplingMaxVocab / 32];  // bit i: the slice's value i has a penalty
  RowSummary inbox[kMaxCluster];               // rank 0: every block's summary
  alignas(16) unsigned char reduce[(kGreedyThreads / 32) * 16];
};

template <bool kCluster>
__global__ void __launch_bounds__(kGreedyThreads, 2) GreedyKernel(const SamplingArgs args, const int slice_size) {
  __shared__ GreedyShared g;
  Slice slice{0, args.vocab, 1, 0};
  if constexpr (kCluster) {
    __cluster_barrier_arrive_relaxed();  // "this block runs": waited for before writing to rank 0
    slice = SliceOf(args.vocab, slice_size);
  }
  const int row = static_cast<int>(blockIdx.x) / slice.blocks;
  const SamplingRowParams& p = args.params[row];
  const float* logits = args.logits + static_cast<int64_t>(row) * args.row_stride + slice.begin;
  const int tid = static_cast<int>(threadIdx.x);

  // Penalised tokens are marked and left out of the streaming pass, then added with their
  // penalised logits.
  const bool penalised = args.penalty_tokens != nullptr && p.penalty_end > p.penalty_begin;
  if (penalised) {
    for (int w = tid; w < (slice.n + 31) / 32; w += kGreedyThreads) g.penalised[w] = 0u;
    __syncthreads();
    for (int e = p.penalty_begin + tid; e < p.penalty_end; e += kGreedyThreads) {
      const int i = args.penalty_tokens[e].token - slice.begin;
      if (i >= 0 && i < slice.n) atomicOr(&g.penalised[i >> 5], 1u << (i & 31));
    }
    __syncthreads();
  }
  auto is_penalised = [&](int i) { return penalised && ((g.penalised[i >> 5] >> (i & 31)) & 1u) != 0u; };
  kernels::PdlWait();  // the logits come from the kernel before

  LogSumExp lse{-INFINITY, 0.0f};
  ArgMax best{-INFINITY, INT_MAX};
  const bool aligned = (reinterpret_cast<uintptr_t>(logits) & 15u) == 0;
  const int quads = (slice.n + 3) >> 2;
  for (int q0 = tid; q0 < quads; q0 += kGreedyThreads * kGreedyUnroll) {
    float v[kGreedyUnroll][4];
#pragma unroll
    for (int u = 0; u < kGreedyUnroll; ++u) {
      if (q0 + u * kGreedyThreads < quads) LoadQuad(logits, slice.n, aligned, q0 + u * kGreedyThreads, v[u]);
    }
#pragma unroll
    for (int u = 0; u < kGreedyUnroll; ++u) {
      const int q = q0 + u * kGreedyThreads;
      if (q < quads) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = 4 * q + e;
          if (i < slice.n) {
            lse.Add(v[u][e]);
            if (!is_penalised(i)) best.Add(v[u][e], slice.begin + i);
          }
        }
      }
    }
  }
  int first_is_nan = 0;  // Sampler::Argmax keeps token 0 when its penalised logit is NaN
  if (penalised) {
    for (int e = p.penalty_begin + tid; e < p.penalty_end; e += kGreedyThreads) {
      const SamplingPenaltyToken pt = args.penalty_tokens[e];
      const int i = pt.token - slice.begin;
      if (i >= 0 && i < slice.n) {
        const float w = PenalisedLogit(logits[i], pt, p);
        best.Add(w, slice.begin + i);
        if (slice.begin + i == 0) first_is_nan = w != w;
      }
    }
  }
  if (slice.begin == 0 && slice.n > 0 && tid == 0 && !is_penalised(0)) first_is_nan = logits[0] != logits[0];
  first_is_nan = __syncthreads_or(first_is_nan);
  lse = BlockAllReduce<kGreedyThreads>(lse, CombineLogSumExp{}, g.reduce);
  best = BlockAllReduce<kGreedyThreads>(best, CombineArgMax{}, g.reduce);

  const RowSummary mine{lse, best, first_is_nan};
  if constexpr (kCluster) {
    __cluster_barrier_wait();  // every block of the cluster runs: rank 0's inbox may be written
    if (tid == 0) *AtRank<true>(&g.inbox[slice.rank], 0) = mine;
    __cluster_barrier_arrive();
    __cluster_barrier_wait();
    if (slice.rank == 0 && tid == 0) {
      const RowStats stats = CombineSummaries(g.inbox, slice.blocks);
      WriteResult(args, row, stats.best.id, stats.log_normalizer);
    }
  } else if (tid == 0) {
    const RowStats stats = CombineSummaries(&mine, 1);
    WriteResult(args, row, stats.best.id, stats.log_normalizer);
  }
}

// ---------------------------------------------------------------------------------------------
// Launch

// Blocks per row: enough to keep `resident` blocks busy with `rows` rows, at most a cluster's
// worth, no slices smaller than kMinSlice, and at least `min_blocks`.
int BlocksPerRow(int rows, int vocab, int resident, int min_blocks) {
  int blocks = std::min(kMaxCluster, std::max(1, resident / rows));
  blocks = std::min(blocks, (vocab + kMinSlice - 1) / kMinSlice);
  return std::max(blocks, min_blocks);
}

// Slices start on 16-byte boundaries (float4 loads) when the row does.
int SliceSize(int vocab, int blocks) { return ((vocab + blocks - 1) / blocks + 3) / 4 * 4; }

// rows * blocks_per_row blocks of `threads`, in clusters of blocks_per_row when `clustered`.
template <class... Params, class... Args>
cudaError_t LaunchRows(void (*kernel)(Params...), int rows, int blocks_per_row, bool clustered, int threads,
                       size_t shared_bytes, cudaStream_t stream, const Args&... kernel_args) {
  // Under programmatic dependent launch (kernels/pdl.cuh): the blocks start and set up while the LM
  // head before them ends, and wait for it before the logits.
  return kernels::LaunchPdlClusters(kernel, dim3(static_cast<unsigned>(rows * blocks_per_row)),
                                    dim3(static_cast<unsigned>(threads)), shared_bytes,
                                    clustered ? static_cast<unsigned>(blocks_per_row) : 0u, stream, kernel_args...);
}

// The sample kernels' shared memory limits raised on the current device, with the SM count and
// SampleKernel's resident blocks per SM: set up once per device, so that a launch costs the host
// little more than the launch itself.
cudaError_t PrepareCurrentDevice(kernels::LaunchInfo* cluster_info) {
  static kernels::LaunchSetUp cluster_setup;
  static kernels::LaunchSetUp row_setup;
  if (const cudaError_t e = cluster_setup.Get(SampleKernel, kClusterThreads, kMaxSharedBytes, cluster_info);
      e != cudaSuccess) {
    return e;
  }
  kernels::LaunchInfo row_info;
  return row_setup.Get(SampleRowKernel, kRowThreads, kRowMaxSharedBytes, &row_info);
}

}  // namespace

cudaError_t LaunchSampling(const SamplingArgs& args, cudaStream_t stream) {
  if (args.rows < 0 || args.rows > kSamplingMaxRows || args.vocab < 1 || args.vocab > kSamplingMaxVocab ||
      args.row_stride < args.vocab) {
    return cudaErrorInvalidValue;
  }
  if (args.rows == 0) return cudaSuccess;
  if (args.logits == nullptr || args.params == nullptr || args.results == nullptr) return cudaErrorInvalidValue;
  kernels::LaunchInfo info;
  if (const cudaError_t e = PrepareCurrentDevice(&info); e != cudaSuccess) return e;
  if (args.greedy_only) {
    // Two greedy blocks per SM (512 threads of 64 registers). Past `sms` rows one block a row fills
    // them, and then as a plain block, as the previous kernel had it: a cluster of one would only
    // add the cluster launch and its barriers.
    const int blocks = BlocksPerRow(args.rows, args.vocab, 2 * info.sms, 1);
    if (blocks == 1) {
      return LaunchRows(GreedyKernel<false>, args.rows, 1, false, kGreedyThreads, 0, stream, args, args.vocab);
    }
    return LaunchRows(GreedyKernel<true>, args.rows, blocks, true, kGreedyThreads, 0, stream, args,
                      SliceSize(args.vocab, blocks));
  }
  // The split, from occupancy. A cluster block keeps up to kMaxSlice floats in shared memory, so
  // one runs per SM (`resident` in all) and a row needs at least min_blocks of them (3 at
  // DeepSeek's 102400). While rows * min_blocks fit in one wave, the cluster split spreads the
  // batch over every SM. Past that, clusters run in waves, each as long as a block's whole life
  // (copying its slice, then the cluster's many short steps, with nothing else on the SM to
  // overlap them); a row block instead (87 KB of shared memory at 102400, 107 KB at most, and 512
  // threads of 64 registers, two per SM) streams its row from global memory in a few passes, with
  // no waves of latency but more reads. On an H200 at 102400 (sampling_bench, one run) the cluster
  // split was still faster at 64 rows (1.5 waves) for every setting, the row split faster at 128
  // (3 waves) for all but top-p over flat logits: the switch is at two waves, 88 rows there.
  const int min_blocks = (args.vocab + kMaxSlice - 1) / kMaxSlice;
  const int resident = info.sms * info.blocks_per_sm;
  if (args.rows * min_blocks <= 2 * resident) {
    const int blocks = BlocksPerRow(args.rows, args.vocab, resident, min_blocks);
    const int slice_size = SliceSize(args.vocab, blocks);
    const size_t shared_bytes = kSliceOffset + sizeof(float) * ((slice_size + kChunk - 1) / kChunk * kChunk);
    return LaunchRows(SampleKernel, args.rows, blocks, true, kClusterThreads, shared_bytes, stream, args, slice_size);
  }
  return LaunchRows(SampleRowKernel, args.rows, 1, false, kRowThreads, RowSharedBytes(args.vocab), stream, args);
}

}  // namespace cohort
