// Sampling kernels. See sampling.h for the contract and worker/sampling/sampler.cc for the
// semantics reproduced here.
//
// Work split. A row belongs to a cluster of C blocks (C = 1..8, chosen per launch). Block r copies
// the slice [r*S, r*S + S) of the row into its shared memory once and works there from then on:
// every later pass (selects, weights, the draw) reads shared memory, not the row in global memory.
// Few rows get C = 8, so that a one-row step still spreads over 8 SMs; many rows get the smallest
// C whose slices fit. Whole-row questions combine the blocks' partial results through distributed
// shared memory, always in block-rank order, so that every block computes bit-identical sums and
// takes the same decisions:
//   - every "best k" question (top-k over penalised logits, the top logprobs over raw logits, the
//     top-p cut over weights) is a radix select on order-preserving keys, 11-bit digits, three
//     levels. Each block histograms its slice (lanes with equal digits combined before the
//     atomics); the blocks then read each other's 64 super-bin sums and the 32 bins of the chosen
//     super-bin: two small reads per digit rather than 2048 bins per block. Ties at a cut go to
//     the lowest ids through a second select on the ids.
//   - the draw: each block sums its kept weight; the block whose range holds the target scans its
//     slice in 128-token chunks.
// Weights are computed once per token, in place of the logits in shared memory.
//
// Exchanges. Cluster-wide steps alternate between two slots and each ends with one cluster
// barrier: step e fills slot e % 2 after barrier e - 1, which every block reached only after
// reading what step e - 2 left in that slot. Small results (row summaries, draw masses,
// top-logprob lists) are pushed into the other blocks' slots before the barrier, so after the last
// step no block reads another's memory and each may exit at once.
//
// Greedy-only launches use a lighter kernel: one streaming pass over global memory per row slice,
// the argmax and log-sum-exp combined in the cluster, nothing kept in shared memory.
//
// Weights are floats like the CPU's std::exp on float: evaluated in double and rounded once
// (ExpNonPositive), they are the correctly rounded exponential, which glibc's expf (0.502 ulp)
// differs from in the last bit for about 1 input in 2000. Sums are in double like the CPU's, in a
// different order (differences near 1e-16 relative). Either only matters where a cumulative sum
// lands within about 1e-8 of its target: near-ties, where the device may pick the neighbour.
#include "kernels/sampling.h"

#include <cuda_pipeline.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdint>

#include "kernels/launch_setup.h"
#include "kernels/reduce.cuh"

namespace cohort {

// SampleKernel's dynamic shared memory: SharedStorage, then the block's slice of the row.
extern __shared__ __align__(16) unsigned char sampling_shared_memory[];

namespace {

constexpr int kThreads = 1024;  // SampleKernel: one block per SM, its slice in shared memory
constexpr int kWarps = kThreads / 32;
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
constexpr int kMaxSlice = 40960;  // floats of a row per block: with SharedStorage, within 227 KiB
constexpr int kMaxChunks = kMaxSlice / kChunk;
constexpr int kMinSlice = 2048;  // rows are not split into smaller slices than this
constexpr unsigned kFullMask = 0xffffffffu;
static_assert(kSamplingMaxVocab == (1 << kIdBits), "token ids are kIdBits wide");
static_assert(kMaxSlice * kMaxCluster >= kSamplingMaxVocab, "the largest vocabulary fits in one cluster");
static_assert(kMaxSlice % kChunk == 0, "whole draw chunks");
static_assert(kBins == 2 * kThreads, "each thread clears and sums two bins");
static_assert(kSuperBins == 64 && kBinsPerSuper == 32, "two super-bins per lane, one bin per lane");
static_assert(kChunk == 4 * 32, "a chunk is one float4 per lane");
static_assert(kMaxChunks <= kThreads, "one thread per chunk in the draw's scan");

__device__ __forceinline__ int MinInt(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ int MaxInt(int a, int b) { return a > b ? a : b; }
__device__ __forceinline__ int Lane() { return static_cast<int>(threadIdx.x) & 31; }
__device__ __forceinline__ int Warp() { return static_cast<int>(threadIdx.x) >> 5; }

// The same object in the shared memory of block `rank` of this block's cluster.
template <class T>
__device__ __forceinline__ T* AtRank(T* local, int rank) {
  return static_cast<T*>(__cluster_map_shared_rank(local, static_cast<unsigned>(rank)));
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

// Exclusive prefix sum over the threads of a kThreads block in thread order; *total gets the sum.
template <class T>
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
  for (int w = 0; w < kWarps; ++w) {
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
// SampleKernel's shared memory

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

struct BinChoice {
  int index;              // in descending order
  uint32_t count_before;  // keys in earlier (higher) items of this digit
  uint32_t count_in;
  double mass_before;  // the select's mass_above plus the weight of earlier items
};

struct SharedStorage {
  ExchangeSlot exchange[2];
  double chunk_mass[kMaxChunks];    // the draw: kept weight of each chunk of the slice
  double chunk_before[kMaxChunks];  // ... and of the slice's chunks before it
  double exp_table[32];             // 2^(i/32)
  alignas(16) unsigned char reduce[kWarps * 16];
  BinChoice choice;
  double target;
  ListEntry top[kSamplingMaxTopLogprobs];
  int top_count;
  int outbox;  // the slot this block fills for the coming exchange
  int pick;
  int fallback;
};

constexpr size_t kSliceOffset = (sizeof(SharedStorage) + 15) / 16 * 16;
constexpr size_t kMaxSharedBytes = kSliceOffset + sizeof(float) * kMaxSlice;
static_assert(kMaxSharedBytes <= 227 * 1024, "a block may have 227 KiB of shared memory on sm_90");

__device__ __forceinline__ SharedStorage& Smem() { return *reinterpret_cast<SharedStorage*>(sampling_shared_memory); }
// The slice: raw logits, then penalised logits, then weights (0 for tokens that are not kept).
__device__ __forceinline__ float* SliceValues() {
  return reinterpret_cast<float*>(sampling_shared_memory + kSliceOffset);
}

__device__ __forceinline__ ExchangeSlot& Outbox() { return Smem().exchange[Smem().outbox]; }

// Ends an exchange; returns the slot that now holds what every block published, until the end of
// the next exchange. Every thread of every block of the cluster calls it the same number of times.
__device__ __forceinline__ int Exchange() {
  SharedStorage& s = Smem();
  const int slot = s.outbox;
  __syncthreads();  // every thread has read `outbox`
  if (threadIdx.x == 0) s.outbox = slot ^ 1;
  __cluster_barrier_arrive();  // release: this block's writes, local and pushed
  __cluster_barrier_wait();    // acquire: everyone's
  return slot;
}

// ---------------------------------------------------------------------------------------------
// Cluster-wide radix select over kBits-bit keys, largest first: digit levels of up to 11 bits from
// the top. A count select finds the need-th key; a mass select the key where the running weight,
// in key order, first reaches a target (top-p's "cumulative >= target").

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
  uint32_t group = 0;     // keys matching the prefix (after the last level: equal to it)
  double mass_above = 0;  // mass select: weight of the keys above the prefix
  double target = 0;      // mass select: top_p times the total weight
};

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

// This block's histogram of the current digit of the keys that match the prefix, in the outbox,
// with its super-bin sums. key_of(i, &key, &mass) says whether slice value i is in the set.
template <int kBits, bool kMass, class KeyOf>
__device__ __forceinline__ void BuildHistogram(const SelectState& st, int n, KeyOf&& key_of) {
  ExchangeSlot& out = Outbox();
  const int first = 2 * static_cast<int>(threadIdx.x);
  out.count[first] = 0u;
  out.count[first + 1] = 0u;
  if constexpr (kMass) {
    out.mass[first] = 0.0;
    out.mass[first + 1] = 0.0;
  }
  __syncthreads();
  // Whole warps take part in every step (AddToBin needs them).
  for (int base = 0; base < n; base += kThreads) {
    const int i = base + static_cast<int>(threadIdx.x);
    uint32_t key = 0;
    float mass = 0.0f;
    int bin = -1;
    if (i < n && key_of(i, &key, &mass) && MatchesPrefix<kBits>(key, st)) {
      bin = kBins - 1 - static_cast<int>(DigitOf<kBits>(key, st.level));
    }
    AddToBin<kMass>(out, bin, mass);
  }
  __syncthreads();
  // 16 threads per super-bin, two bins each.
  uint32_t count = out.count[first] + out.count[first + 1];
  double mass = kMass ? out.mass[first] + out.mass[first + 1] : 0.0;
#pragma unroll
  for (int o = 8; o > 0; o >>= 1) {
    count += __shfl_xor_sync(kFullMask, count, o);
    if constexpr (kMass) mass += ShflXor(mass, o);
  }
  if ((threadIdx.x & 15) == 0) {
    out.super_count[threadIdx.x >> 4] = count;
    if constexpr (kMass) out.super_mass[threadIdx.x >> 4] = mass;
  }
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
// first level also sets st.target = top_p * the total weight.
template <int kBits, Rank kRank>
__device__ __forceinline__ void ResolveLevel(SelectState& st, int blocks, double top_p) {
  constexpr bool kMass = kRank != Rank::kCount;
  SharedStorage& s = Smem();
  const int slot = Exchange();
  if (Warp() == 0) {
    uint32_t super_count[2] = {0u, 0u};
    double super_mass[2] = {0.0, 0.0};
#pragma unroll
    for (int r = 0; r < kMaxCluster; ++r) {
      if (r < blocks) {
        const ExchangeSlot* in = AtRank(&s.exchange[slot], r);
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
    if (kMass && st.level == 0) target = top_p * WarpAllReduce(super_mass[0] + super_mass[1], Plus{});
    const BinChoice super = FindInWarp<kRank, 2>(super_count, super_mass, 0u, st.mass_above, st.need, target);
    uint32_t bin_count[1] = {0u};
    double bin_mass[1] = {0.0};
    const int bin = super.index * kBinsPerSuper + Lane();
#pragma unroll
    for (int r = 0; r < kMaxCluster; ++r) {
      if (r < blocks) {
        const ExchangeSlot* in = AtRank(&s.exchange[slot], r);
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
    }
  }
  __syncthreads();
  const BinChoice choice = s.choice;
  st.target = s.target;
  st.prefix |= static_cast<uint32_t>(kBins - 1 - choice.index) << Radix<kBits>::Shift(st.level);
  st.need -= choice.count_before;
  st.mass_above = choice.mass_before;
  st.group = choice.count_in;
  ++st.level;
}

// A set's first members in (key descending, id ascending) order: key above `key`, or equal with
// id <= `id`.
struct Cut {
  bool active = false;
  uint32_t key = 0;
  int id = INT_MAX;
  __device__ __forceinline__ bool Keeps(uint32_t k, int t) const { return !active || k > key || (k == key && t <= id); }
};

// The need-th lowest token id among the slice values for which is_tied(i) holds, over the cluster.
template <class IsTied>
__device__ __forceinline__ int SelectTiedId(uint32_t need, const Slice& slice, IsTied&& is_tied) {
  SelectState st;
  st.need = need;
#pragma unroll 1
  for (int level = 0; level < Radix<kIdBits>::kLevels; ++level) {
    BuildHistogram<kIdBits, false>(st, slice.n, [&](int i, uint32_t* key, float*) {
      if (!is_tied(i)) return false;
      *key = kIdMask - static_cast<uint32_t>(slice.begin + i);  // the lowest id has the largest key
      return true;
    });
    ResolveLevel<kIdBits, Rank::kCount>(st, slice.blocks, 0.0);
  }
  return static_cast<int>(kIdMask - st.prefix);
}

// The `need` largest slice values of the row in (value descending, id ascending) order, as a cut:
// top-k over the penalised logits, the top logprobs over the raw ones.
__device__ __noinline__ Cut SelectLargest(uint32_t need, const Slice slice) {
  const float* values = SliceValues();
  SelectState st;
  st.need = need;
#pragma unroll 1
  for (int level = 0; level < Radix<32>::kLevels; ++level) {
    BuildHistogram<32, false>(st, slice.n, [&](int i, uint32_t* key, float*) {
      *key = OrderedKey(values[i]);
      return true;
    });
    ResolveLevel<32, Rank::kCount>(st, slice.blocks, 0.0);
  }
  Cut cut{true, st.prefix, INT_MAX};
  if (st.need < st.group) {
    const uint32_t key = st.prefix;
    cut.id = SelectTiedId(st.need, slice, [&](int i) { return OrderedKey(values[i]) == key; });
  }
  return cut;
}

// Top-p over the weights in the slices (Sampler::KeepTopP): (weight descending, id ascending)
// until the running weight reaches top_p times the total. Tokens of weight 0 are not kept anyway,
// so only positive weights take part. A weight's bits are ordered like it and, as weights are at
// most 1, fit in kWeightBits: the first digit spans only the exponents and mantissas weights have.
constexpr int kWeightBits = 30;
static_assert(0x3f800000u < (1u << kWeightBits), "the bits of 1.0f fit in kWeightBits");

__device__ __noinline__ Cut SelectTopP(float top_p, const Slice slice) {
  const float* weights = SliceValues();
  SelectState st;
#pragma unroll 1
  for (int level = 0; level < Radix<kWeightBits>::kLevels; ++level) {
    BuildHistogram<kWeightBits, true>(st, slice.n, [&](int i, uint32_t* key, float* mass) {
      const float w = weights[i];
      if (!(w > 0.0f)) return false;
      *key = __float_as_uint(w);
      *mass = w;
      return true;
    });
    ResolveLevel<kWeightBits, Rank::kMassAtLeast>(st, slice.blocks, static_cast<double>(top_p));
  }
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
    cut.id = SelectTiedId(take, slice, [&](int i) {
      const float w = weights[i];
      return w > 0.0f && __float_as_uint(w) == key;
    });
  }
  return cut;
}

// ---------------------------------------------------------------------------------------------
// SampleKernel's phases

// Copies the slice into shared memory; returns this thread's log-sum-exp of some of its values.
// Whole 16-byte quads go by cp.async, all in flight at once and through no registers.
__device__ __forceinline__ LogSumExp LoadSlice(const float* row_logits, const Slice& slice) {
  const float* src = row_logits + slice.begin;
  float* dst = SliceValues();
  const int tid = static_cast<int>(threadIdx.x);
  const int padded = (slice.n + 3) / 4 * 4;  // the last quad's tail reads as -inf
  if ((reinterpret_cast<uintptr_t>(src) & 15u) == 0) {
    const int whole = slice.n / 4;
    for (int q = tid; q < whole; q += kThreads) __pipeline_memcpy_async(dst + 4 * q, src + 4 * q, 16);
    __pipeline_commit();
    for (int i = 4 * whole + tid; i < padded; i += kThreads) dst[i] = i < slice.n ? __ldg(src + i) : -INFINITY;
    __pipeline_wait_prior(0);
  } else {
    for (int i = tid; i < padded; i += kThreads) dst[i] = i < slice.n ? __ldg(src + i) : -INFINITY;
  }
  __syncthreads();
  LogSumExp lse{-INFINITY, 0.0f};
  for (int i = tid; i < slice.n; i += kThreads) lse.Add(dst[i]);
  return lse;
}

// Sampler::ApplyPenalties on the slice, in place.
__device__ __forceinline__ void ApplyPenalties(const SamplingArgs& args, const SamplingRowParams& p,
                                               const Slice& slice) {
  float* values = SliceValues();
  for (int e = p.penalty_begin + static_cast<int>(threadIdx.x); e < p.penalty_end; e += kThreads) {
    const SamplingPenaltyToken pt = args.penalty_tokens[e];
    const int i = pt.token - slice.begin;  // tokens are distinct: no two threads write one value
    if (i >= 0 && i < slice.n) values[i] = PenalisedLogit(values[i], pt, p);
  }
  __syncthreads();
}

// Leaves this block's members of the top-logprob cut (over the raw logits in the slice) in rank
// 0's slot for the coming exchange.
__device__ __forceinline__ void PublishTopLogprobs(const Cut& cut, const Slice& slice) {
  SharedStorage& s = Smem();
  const float* values = SliceValues();
  if (threadIdx.x == 0) s.top_count = 0;
  __syncthreads();
  for (int i = static_cast<int>(threadIdx.x); i < slice.n; i += kThreads) {
    const float v = values[i];
    if (cut.Keeps(OrderedKey(v), slice.begin + i)) {
      const int j = atomicAdd(&s.top_count, 1);
      if (j < kSamplingMaxTopLogprobs) s.top[j] = ListEntry{slice.begin + i, v};
    }
  }
  __syncthreads();
  const int count = MinInt(s.top_count, kSamplingMaxTopLogprobs);
  TopList* dst = AtRank(&Outbox().top[slice.rank], 0);
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
  for (int i = 1; i < total; ++i) {  // insertion sort: (logit descending, id ascending)
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

// The argmax of the penalised slice and the log-sum-exp, combined over the cluster (and the top
// logprobs written, when asked for: their lists travel in the same exchange).
__device__ __noinline__ RowStats SummarizeRow(const Slice slice, LogSumExp lse, int top_n, SamplingTopLogprob* top) {
  SharedStorage& s = Smem();
  const float* values = SliceValues();
  ArgMax best{-INFINITY, INT_MAX};
  for (int i = static_cast<int>(threadIdx.x); i < slice.n; i += kThreads) best.Add(values[i], slice.begin + i);
  lse = BlockAllReduce<kThreads>(lse, CombineLogSumExp{}, s.reduce);
  best = BlockAllReduce<kThreads>(best, CombineArgMax{}, s.reduce);
  const RowSummary mine{lse, best, slice.rank == 0 && slice.n > 0 && values[0] != values[0]};
  if (static_cast<int>(threadIdx.x) < slice.blocks) *AtRank(&Outbox().summary[slice.rank], threadIdx.x) = mine;
  const ExchangeSlot& in = s.exchange[Exchange()];
  const RowStats stats = CombineSummaries(in.summary, slice.blocks);
  if (top_n > 0 && slice.rank == 0 && threadIdx.x == 0) {
    WriteTopLogprobs(in, slice.blocks, top_n, stats.log_normalizer, top);
  }
  return stats;
}

// The slice's penalised logits become Sampler::Draw's weights: 0 for tokens that top-k or min-p
// drop (the best weight is 1, so min-p keeps weight >= min_p).
__device__ __forceinline__ void ComputeWeights(const Slice& slice, const Cut& top_k, float best, float temperature,
                                               float min_p) {
  float* values = SliceValues();
  const double* exp_table = Smem().exp_table;
  for (int i = static_cast<int>(threadIdx.x); i < slice.n; i += kThreads) {
    const float v = values[i];
    float w = 0.0f;
    if (top_k.Keeps(OrderedKey(v), slice.begin + i)) {
      w = Weight(v, best, temperature, exp_table);
      if (w < min_p) w = 0.0f;
    }
    values[i] = w;
  }
  __syncthreads();
}

// A kept token's weight (it survived top-k, min-p and top-p), else 0.
__device__ __forceinline__ float KeptWeight(float w, int t, const Cut& top_p) {
  return w > 0.0f && top_p.Keeps(__float_as_uint(w), t) ? w : 0.0f;
}

// One warp scans the slice's chunks from `chunk` on, `running` being the kept weight before it:
// the first token whose running weight exceeds `target`, else `fallback`.
__device__ __forceinline__ int ScanChunks(const Slice& slice, const Cut& top_p, int chunk, double running,
                                          double target, int fallback) {
  const float4* weights = reinterpret_cast<const float4*>(SliceValues());
  const int chunks = (slice.n + kChunk - 1) / kChunk;
  for (int c = chunk; c < chunks; ++c) {
    const float4 w4 = weights[c * (kChunk / 4) + Lane()];
    const float w[4] = {w4.x, w4.y, w4.z, w4.w};
    float kept[4];
    double partial[4];
    double lane_sum = 0.0;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = c * kChunk + 4 * Lane() + e;
      kept[e] = i < slice.n ? KeptWeight(w[e], slice.begin + i, top_p) : 0.0f;
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
      if (hit < 0 && kept[e] > 0.0f && base + partial[e] > target) hit = slice.begin + c * kChunk + 4 * Lane() + e;
    }
    const unsigned lanes = __ballot_sync(kFullMask, hit >= 0);
    if (lanes != 0u) return __shfl_sync(kFullMask, hit, __ffs(static_cast<int>(lanes)) - 1);
    running += __shfl_sync(kFullMask, inclusive, 31);
  }
  return fallback;
}

// The draw (Sampler::Draw's loop) over the kept tokens in id order: the first whose running
// weight exceeds uniform * total, or the last kept one when rounding leaves none. Each block sums
// its chunks; the block whose range holds the target finds the chunk, and one warp the token.
__device__ __noinline__ void Draw(const SamplingArgs args, int row, const Slice slice, const Cut top_p, double uniform,
                                  RowStats stats) {
  SharedStorage& s = Smem();
  const float4* weights = reinterpret_cast<const float4*>(SliceValues());
  const int chunks = (slice.n + kChunk - 1) / kChunk;
  int last_kept = -1;
  for (int c = Warp(); c < chunks; c += kWarps) {
    const float4 w4 = weights[c * (kChunk / 4) + Lane()];
    const float w[4] = {w4.x, w4.y, w4.z, w4.w};
    double sum = 0.0;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = c * kChunk + 4 * Lane() + e;
      const float kept = i < slice.n ? KeptWeight(w[e], slice.begin + i, top_p) : 0.0f;
      if (kept > 0.0f) {
        sum += static_cast<double>(kept);
        last_kept = slice.begin + i;
      }
    }
    sum = WarpAllReduce(sum, Plus{});
    if (Lane() == 0) s.chunk_mass[c] = sum;
  }
  last_kept = BlockAllReduce<kThreads>(last_kept, Max{}, s.reduce);  // its barriers publish chunk_mass
  double block_mass = 0.0;
  const int tid = static_cast<int>(threadIdx.x);
  const double before = BlockExclusiveSum(tid < chunks ? s.chunk_mass[tid] : 0.0, &block_mass, s.reduce);
  if (tid < chunks) s.chunk_before[tid] = before;
  if (tid < slice.blocks) *AtRank(&Outbox().draw_mass[slice.rank], tid) = block_mass;
  const ExchangeSlot& in = s.exchange[Exchange()];

  // Every block finds the block that holds the target, with the same sums.
  double total = 0.0;
  for (int r = 0; r < slice.blocks; ++r) total += in.draw_mass[r];
  const double target = uniform * total;
  int chosen = -1;
  int last = -1;
  double chosen_before = 0.0;
  double last_before = 0.0;
  double running = 0.0;
  for (int r = 0; r < slice.blocks; ++r) {
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
    if (slice.rank == 0 && tid == 0) WriteResult(args, row, stats.best.id, stats.log_normalizer);
    return;
  }
  if (chosen != slice.rank) return;

  if (tid == 0) {
    s.pick = INT_MAX;
    s.fallback = -1;
  }
  __syncthreads();
  if (tid < chunks) {
    const double mass = s.chunk_mass[tid];
    const double mass_before = chosen_before + s.chunk_before[tid];
    if (mass_before <= target && target < mass_before + mass) atomicMin(&s.pick, tid);
    if (mass > 0.0) atomicMax(&s.fallback, tid);
  }
  __syncthreads();
  if (Warp() != 0) return;
  const int chunk = s.pick != INT_MAX ? s.pick : s.fallback;
  const int token =
      chunk < 0 ? last_kept : ScanChunks(slice, top_p, chunk, chosen_before + s.chunk_before[chunk], target, last_kept);
  if (Lane() == 0) WriteResult(args, row, token, stats.log_normalizer);
}

__global__ void __launch_bounds__(kThreads, 1) SampleKernel(const SamplingArgs args, const int slice_size) {
  __cluster_barrier_arrive_relaxed();  // "this block runs": waited for before the first exchange
  SharedStorage& s = Smem();
  const Slice slice = SliceOf(args.vocab, slice_size);
  const int row = static_cast<int>(blockIdx.x) / slice.blocks;
  const SamplingRowParams& p = args.params[row];
  if (threadIdx.x == 0) s.outbox = 0;
  if (threadIdx.x < 32) s.exp_table[threadIdx.x] = exp2(static_cast<double>(threadIdx.x) / 32.0);
  const LogSumExp lse = LoadSlice(args.logits + static_cast<int64_t>(row) * args.row_stride, slice);
  __cluster_barrier_wait();  // every block of the cluster runs: its shared memory may be written

  // The top logprobs, while the slice holds the raw logits; written after the summary exchange.
  const int top_n = args.top != nullptr ? MinInt(p.top_logprobs, args.vocab) : 0;
  if (top_n > 0) PublishTopLogprobs(SelectLargest(static_cast<uint32_t>(top_n), slice), slice);
  if (args.penalty_tokens != nullptr && p.penalty_end > p.penalty_begin) ApplyPenalties(args, p, slice);
  const RowStats stats = SummarizeRow(slice, lse, top_n, args.top + (top_n > 0 ? p.top_offset : 0));

  if (p.temperature == 0.0f) {
    if (slice.rank == 0 && threadIdx.x == 0) WriteResult(args, row, stats.best.id, stats.log_normalizer);
    return;
  }
  Cut top_k;
  if (p.top_k > 0 && p.top_k < args.vocab) top_k = SelectLargest(static_cast<uint32_t>(p.top_k), slice);
  ComputeWeights(slice, top_k, stats.best.value, p.temperature, p.min_p);
  Cut top_p;
  if (p.top_p < 1.0f) top_p = SelectTopP(p.top_p, slice);
  Draw(args, row, slice, top_p, p.uniform, stats);
}

// ---------------------------------------------------------------------------------------------
// GreedyKernel: rows of temperature 0 without top logprobs.

struct GreedyShared {
  uint32_t penalised[kSamplingMaxVocab / 32];  // bit i: the slice's value i has a penalty
  RowSummary inbox[kMaxCluster];               // rank 0: every block's summary
  alignas(16) unsigned char reduce[(kGreedyThreads / 32) * 16];
};

__global__ void __launch_bounds__(kGreedyThreads, 2) GreedyKernel(const SamplingArgs args, const int slice_size) {
  __shared__ GreedyShared g;
  __cluster_barrier_arrive_relaxed();  // "this block runs": waited for before writing to rank 0
  const Slice slice = SliceOf(args.vocab, slice_size);
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

  __cluster_barrier_wait();  // every block of the cluster runs: rank 0's inbox may be written
  if (tid == 0) *AtRank(&g.inbox[slice.rank], 0) = RowSummary{lse, best, first_is_nan};
  __cluster_barrier_arrive();
  __cluster_barrier_wait();
  if (slice.rank == 0 && tid == 0) {
    const RowStats stats = CombineSummaries(g.inbox, slice.blocks);
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

template <class Kernel>
cudaError_t LaunchClusters(Kernel kernel, const SamplingArgs& args, int blocks, int threads, size_t shared_bytes,
                           int slice_size, cudaStream_t stream) {
  cudaLaunchAttribute cluster{};
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim.x = static_cast<unsigned>(blocks);
  cluster.val.clusterDim.y = 1;
  cluster.val.clusterDim.z = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned>(args.rows * blocks));
  config.blockDim = dim3(static_cast<unsigned>(threads));
  config.dynamicSmemBytes = shared_bytes;
  config.stream = stream;
  config.attrs = &cluster;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, args, slice_size);
}

// The current device's SM count, with SampleKernel's shared memory limit raised there: set up once
// per device, so that a launch costs the host little more than the launch itself.
cudaError_t PrepareCurrentDevice(int* sms) {
  static kernels::LaunchSetUp setup;
  kernels::LaunchInfo info;
  if (const cudaError_t e = setup.Get(SampleKernel, kThreads, kMaxSharedBytes, &info); e != cudaSuccess) return e;
  *sms = info.sms;
  return cudaSuccess;
}

}  // namespace

cudaError_t LaunchSampling(const SamplingArgs& args, cudaStream_t stream) {
  if (args.rows < 0 || args.rows > kSamplingMaxRows || args.vocab < 1 || args.vocab > kSamplingMaxVocab ||
      args.row_stride < args.vocab) {
    return cudaErrorInvalidValue;
  }
  if (args.rows == 0) return cudaSuccess;
  if (args.logits == nullptr || args.params == nullptr || args.results == nullptr) return cudaErrorInvalidValue;
  int sms = 0;
  if (cudaError_t e = PrepareCurrentDevice(&sms); e != cudaSuccess) return e;
  if (args.greedy_only) {
    const int blocks = BlocksPerRow(args.rows, args.vocab, 2 * sms, 1);
    return LaunchClusters(GreedyKernel, args, blocks, kGreedyThreads, 0, SliceSize(args.vocab, blocks), stream);
  }
  const int blocks = BlocksPerRow(args.rows, args.vocab, sms, (args.vocab + kMaxSlice - 1) / kMaxSlice);
  const int slice_size = SliceSize(args.vocab, blocks);
  const size_t shared_bytes = kSliceOffset + sizeof(float) * ((slice_size + kChunk - 1) / kChunk * kChunk);
  return LaunchClusters(SampleKernel, args, blocks, kThreads, shared_bytes, slice_size, stream);
}

}  // namespace cohort
