// Sampling kernels: one block of kThreads per row. See sampling.h for the contract and
// worker/sampling/sampler.cc for the semantics reproduced here.
//
// A row is read from global memory in passes (it does not fit in shared memory). Every "best k"
// question (top-k over penalised logits, top-p over weights, the top logprobs over raw logits) is
// a radix select on 32-bit order-preserving keys: 11-bit digits, a shared-memory histogram per
// digit (counts, and weight sums for top-p), ties resolved to the lowest ids by one more select
// on the ids. When the first digit leaves few candidates (<= kListCapacity), they are gathered
// into shared memory and everything after happens there; otherwise each digit is one more pass.
// The draw walks the kept tokens in id order: per-128-token chunk weight sums, then one warp scans
// the chunk holding the target. Passes that only care about weights in a range skip the
// exponential for tokens whose logit is outside the matching (widened) logit interval.
//
// Weights are floats like the CPU's std::exp on float: evaluated in double and rounded once
// (ExpNonPositive), they are the correctly rounded exponential, which glibc's expf (0.502 ulp)
// differs from in the last bit for about 1 input in 2000. Sums are in double like the CPU's, in a
// different order (differences near 1e-16 relative). Either only matters where a cumulative sum
// lands within about 1e-8 of its target: near-ties, where the device may pick the neighbour.
//
// Register use: 64 per thread (2 blocks of 512 per SM). The row's phases and its full-row passes
// are separate, non-inlined functions so that each pass gets the registers to itself; ptxas counts
// a few bytes of callee-saved registers at their boundaries as spills.
#include "kernels/sampling.h"

#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdint>

namespace cohort {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kDigitBits = 11;
constexpr int kBins = 1 << kDigitBits;
constexpr int kBinsPerThread = kBins / kThreads;
constexpr int kListCapacity = 2048;
constexpr int kIdBits = 18;
constexpr uint32_t kIdMask = (1u << kIdBits) - 1;
constexpr int kChunk = 128;  // tokens per draw chunk: one float4 per lane of a warp
constexpr unsigned kFullMask = 0xffffffffu;
static_assert(kSamplingMaxVocab == (1 << kIdBits), "token ids are kIdBits wide");
static_assert(kSamplingMaxVocab / kChunk <= kBins, "draw chunks fit in one histogram");
static_assert(kBinsPerThread * kThreads == kBins, "each thread owns whole bins");

__device__ __forceinline__ int MinInt(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ int MaxInt(int a, int b) { return a > b ? a : b; }
__device__ __forceinline__ int Lane() { return static_cast<int>(threadIdx.x) & 31; }
__device__ __forceinline__ int Warp() { return static_cast<int>(threadIdx.x) >> 5; }

struct ListEntry {
  int32_t id;
  float value;  // the penalised logit (sampling) or the raw logit (top logprobs)
};

struct BinChoice {
  int bin;
  uint32_t count_above;  // matching elements in higher bins of this digit
  uint32_t count_in_bin;
  double mass_above;  // the select's mass_above plus the mass of higher bins
};

struct SharedStorage {
  uint32_t count[kBins];
  union {
    uint32_t raw_count[kBins];  // the top-logprob select's first digit, during the first pass
    double mass[kBins];
  } second;
  ListEntry list[kListCapacity];
  double exp_table[32];  // 2^(i/32)
  alignas(16) unsigned char reduce[kWarps * 16];
  BinChoice choice;
  int pick;
  int fallback;
  int list_size;
  int token;
  int top_count;
  ListEntry top[kSamplingMaxTopLogprobs];
};

// Each kernel's one block-wide scratch, at namespace scope so that helpers that are not inlined
// still address it as shared memory.
__shared__ SharedStorage smem;

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

// Weights never decrease with the logit, so the tokens whose weight key (its float bits) lies in a
// range are those whose logit lies in an interval. These bounds are that interval widened (from
// the midpoints to the neighbouring floats, by 1e-6 relative, then rounded outwards), so that a
// token outside it certainly weighs outside the range and needs no exponential.
__device__ __forceinline__ float LogitFloor(uint32_t weight_key, float best, float temperature) {
  if (weight_key == 0u) return -INFINITY;
  const double mid = 0.5 * (static_cast<double>(__uint_as_float(weight_key - 1)) +
                            static_cast<double>(__uint_as_float(weight_key)));
  const double x = log(mid);
  const float floor = __double2float_rd(best + static_cast<double>(temperature) * (x - 1e-6 * (1.0 + fabs(x))));
  return floor == floor ? floor : -INFINITY;
}
__device__ __forceinline__ float LogitCeiling(uint32_t weight_key, float best, float temperature) {
  if (weight_key >= 0x3f800000u) return INFINITY;  // weights never exceed 1
  const double mid = 0.5 * (static_cast<double>(__uint_as_float(weight_key)) +
                            static_cast<double>(__uint_as_float(weight_key + 1)));
  const double x = log(mid);
  const float ceiling = __double2float_ru(best + static_cast<double>(temperature) * (x + 1e-6 * (1.0 + fabs(x))));
  return ceiling == ceiling ? ceiling : INFINITY;
}

// ---------------------------------------------------------------------------------------------
// Warp and block collectives. Every block collective is called by all threads of the block.

__device__ __forceinline__ float ShflXor(float v, int o) { return __shfl_xor_sync(kFullMask, v, o); }
__device__ __forceinline__ double ShflXor(double v, int o) { return __shfl_xor_sync(kFullMask, v, o); }
__device__ __forceinline__ int ShflXor(int v, int o) { return __shfl_xor_sync(kFullMask, v, o); }

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
__device__ __forceinline__ LogSumExp ShflXor(LogSumExp v, int o) { return {ShflXor(v.max, o), ShflXor(v.sum, o)}; }
struct CombineLogSumExp {
  __device__ LogSumExp operator()(LogSumExp a, LogSumExp b) const {
    const float m = a.max > b.max ? a.max : b.max;
    if (m == -INFINITY) return {m, 0.0f};
    const float sa = a.max == -INFINITY ? 0.0f : a.sum * __expf(a.max - m);
    const float sb = b.max == -INFINITY ? 0.0f : b.sum * __expf(b.max - m);
    return {m, sa + sb};
  }
};

// Highest value, ties to the lowest id; NaN never wins (Sampler::Argmax, but see the caller for a
// NaN at id 0).
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
__device__ __forceinline__ ArgMax ShflXor(ArgMax v, int o) { return {ShflXor(v.value, o), ShflXor(v.id, o)}; }
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

template <class T, class Op>
__device__ __forceinline__ T WarpAllReduce(T v, Op op) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, ShflXor(v, o));
  return v;
}

// Every thread gets the same result, combined in the same order.
template <class T, class Op>
__device__ T BlockAllReduce(T v, Op op) {
  static_assert(sizeof(T) <= 16, "reduce slots hold 16 bytes");
  v = WarpAllReduce(v, op);
  T* slots = reinterpret_cast<T*>(smem.reduce);
  __syncthreads();
  if (Lane() == 0) slots[Warp()] = v;
  __syncthreads();
  T all = slots[0];
  for (int w = 1; w < kWarps; ++w) all = op(all, slots[w]);
  return all;
}

// Exclusive prefix sum over threads in thread order; *total gets the sum over the block.
template <class T>
__device__ T BlockExclusiveSum(T v, T* total) {
  T inclusive = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const T up = __shfl_up_sync(kFullMask, inclusive, o);
    if (Lane() >= o) inclusive += up;
  }
  T exclusive = __shfl_up_sync(kFullMask, inclusive, 1);
  if (Lane() == 0) exclusive = T(0);
  T* slots = reinterpret_cast<T*>(smem.reduce);
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
// Reading a row

struct RowView {
  const float* logits;
  int vocab;
  bool aligned;  // 16-byte aligned: whole quads load as float4
};

// Tokens 4q..4q+3; those past the vocabulary read as -inf and must not be used.
__device__ __forceinline__ void LoadQuad(const RowView& row, int q, float (&v)[4]) {
  const int t = 4 * q;
  if (row.aligned && t + 3 < row.vocab) {
    const float4 f = __ldg(reinterpret_cast<const float4*>(row.logits) + q);
    v[0] = f.x;
    v[1] = f.y;
    v[2] = f.z;
    v[3] = f.w;
  } else {
#pragma unroll
    for (int e = 0; e < 4; ++e) v[e] = t + e < row.vocab ? __ldg(row.logits + t + e) : -INFINITY;
  }
}

// Calls f(token, raw logit) for every token of the row, each on one thread, in no particular order.
template <int kUnroll, class F>
__device__ __forceinline__ void ForEachLogit(const RowView& row, F&& f) {
  const int quads = (row.vocab + 3) >> 2;
  for (int q0 = static_cast<int>(threadIdx.x); q0 < quads; q0 += kThreads * kUnroll) {
    float v[kUnroll][4];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) LoadQuad(row, q0 + u * kThreads, v[u]);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t0 = 4 * (q0 + u * kThreads);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if (t0 + e < row.vocab) f(t0 + e, v[u][e]);
      }
    }
  }
}

// Calls f(token, value) for the gathered list.
template <class F>
__device__ __forceinline__ void ForEachListed(const int n, F&& f) {
  for (int i = static_cast<int>(threadIdx.x); i < n; i += kThreads) f(smem.list[i].id, smem.list[i].value);
}

// ---------------------------------------------------------------------------------------------
// Penalties (Sampler::ApplyPenalties). The row's history is marked in a bitmap in the workspace
// with rank counts per 256 tokens, so that a token's penalised logit is found in O(1) among the
// row's penalty tokens, stored by rank.

__device__ __forceinline__ float PenalisedLogit(float logit, const SamplingPenaltyToken& pt, const SamplingRowParams& p) {
  if (p.repetition_penalty != 1.0f && pt.in_history != 0) {
    logit = logit > 0.0f ? __fdiv_rn(logit, p.repetition_penalty) : __fmul_rn(logit, p.repetition_penalty);
  }
  if (pt.generated_count > 0) {
    const float count = static_cast<float>(pt.generated_count);
    logit = __fsub_rn(logit, __fadd_rn(p.presence_penalty, __fmul_rn(p.frequency_penalty, count)));
  }
  return logit;
}

struct NoPenalties {
  __device__ __forceinline__ float Apply(int, float raw) const { return raw; }
};

struct Penalties {
  const uint32_t* bitmap;  // bit t: token t is penalised
  const uint32_t* ranks;   // per 256 tokens: set bits before them
  const float* values;     // penalised logits by rank

  __device__ __forceinline__ int Rank(int t, uint32_t word) const {
    int r = static_cast<int>(ranks[t >> 8]);
    for (int w = (t >> 8) << 3; w < (t >> 5); ++w) r += __popc(bitmap[w]);
    return r + __popc(word & ((1u << (t & 31)) - 1u));
  }
  __device__ __forceinline__ float Apply(int t, float raw) const {
    const uint32_t word = bitmap[t >> 5];
    return ((word >> (t & 31)) & 1u) ? values[Rank(t, word)] : raw;
  }
};

// Workspace: per row (bitmap words + rank words) uint32, then one float per penalty token.
__host__ __device__ __forceinline__ int64_t BitmapWords(int64_t vocab) { return (vocab + 31) / 32; }
__host__ __device__ __forceinline__ int64_t RankWords(int64_t vocab) { return (BitmapWords(vocab) + 7) / 8; }

__device__ Penalties SetUpPenalties(const RowView& row, const SamplingRowParams& p, const SamplingArgs& args) {
  const int64_t words = BitmapWords(row.vocab);
  const int64_t rank_words = RankWords(row.vocab);
  uint32_t* bitmap = static_cast<uint32_t*>(args.workspace) + static_cast<int64_t>(blockIdx.x) * (words + rank_words);
  uint32_t* ranks = bitmap + words;
  float* values = reinterpret_cast<float*>(static_cast<uint32_t*>(args.workspace) +
                                           static_cast<int64_t>(args.rows) * (words + rank_words)) +
                  p.penalty_begin;
  for (int i = static_cast<int>(threadIdx.x); i < words; i += kThreads) bitmap[i] = 0;
  __syncthreads();
  for (int e = p.penalty_begin + static_cast<int>(threadIdx.x); e < p.penalty_end; e += kThreads) {
    const int t = args.penalty_tokens[e].token;
    if (t >= 0 && t < row.vocab) atomicOr(&bitmap[t >> 5], 1u << (t & 31));
  }
  __syncthreads();
  // rank_words <= 1024: two groups of 8 bitmap words per thread.
  uint32_t counts[2] = {0, 0};
  for (int j = 0; j < 2; ++j) {
    const int g = 2 * static_cast<int>(threadIdx.x) + j;
    if (g < rank_words) {
      for (int w = 8 * g; w < MinInt(8 * g + 8, static_cast<int>(words)); ++w) counts[j] += __popc(bitmap[w]);
    }
  }
  uint32_t total = 0;
  const uint32_t before = BlockExclusiveSum(counts[0] + counts[1], &total);
  if (2 * threadIdx.x < rank_words) ranks[2 * threadIdx.x] = before;
  if (2 * threadIdx.x + 1 < rank_words) ranks[2 * threadIdx.x + 1] = before + counts[0];
  __syncthreads();
  const Penalties pen{bitmap, ranks, values};
  for (int e = p.penalty_begin + static_cast<int>(threadIdx.x); e < p.penalty_end; e += kThreads) {
    const SamplingPenaltyToken pt = args.penalty_tokens[e];
    if (pt.token >= 0 && pt.token < row.vocab) {
      values[pen.Rank(pt.token, bitmap[pt.token >> 5])] = PenalisedLogit(row.logits[pt.token], pt, p);
    }
  }
  __syncthreads();
  return pen;
}

// ---------------------------------------------------------------------------------------------
// Radix select over kBits-bit keys, largest first: digit levels of up to 11 bits from the top.
// A count select finds the need-th key; a mass select the key where the running weight, in key
// order, first reaches (kMassAtLeast: top-p's "cumulative >= target") or exceeds (kMassAbove: the
// draw's "cumulative > target") a target.

enum class Rank { kCount, kMassAtLeast, kMassAbove };

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
  uint32_t above = 0;     // keys ranked before those matching the prefix
  double mass_above = 0;  // mass select: their weight
  uint32_t group = 0;     // keys matching the prefix (after the last level: equal to it)
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

template <bool kMass>
__device__ void ClearBins() {
  __syncthreads();
  for (int i = static_cast<int>(threadIdx.x); i < kBins; i += kThreads) {
    smem.count[i] = 0;
    if constexpr (kMass) smem.second.mass[i] = 0.0;
  }
  __syncthreads();
}

// Finds the bin of `count` (and `mass`) holding the wanted key, bins in descending order. When
// rounding leaves no bin (a mass target at the very top), takes the lowest nonempty one, as
// Sampler::Draw falls back to the last possible token.
template <Rank kRank>
__device__ BinChoice FindBin(const uint32_t* count, const double* mass, uint32_t need, double mass_above,
                             double target) {
  constexpr bool kMass = kRank != Rank::kCount;
  uint32_t c[kBinsPerThread];
  double m[kBinsPerThread];
  uint32_t c_local = 0;
  double m_local = 0.0;
#pragma unroll
  for (int j = 0; j < kBinsPerThread; ++j) {
    const int bin = kBins - 1 - (kBinsPerThread * static_cast<int>(threadIdx.x) + j);
    c[j] = count != nullptr ? count[bin] : 0u;
    m[j] = kMass ? mass[bin] : 0.0;
    c_local += c[j];
    m_local += m[j];
  }
  __syncthreads();  // earlier readers of pick/fallback/choice are done
  if (threadIdx.x == 0) {
    smem.pick = INT_MAX;
    smem.fallback = -1;
  }
  uint32_t c_total = 0;
  const uint32_t c_before = BlockExclusiveSum(c_local, &c_total);
  double m_before = 0.0;
  if constexpr (kMass) {
    double m_total = 0.0;
    m_before = BlockExclusiveSum(m_local, &m_total);
  }
  {
    uint32_t cb = c_before;
    double mb = mass_above + m_before;
#pragma unroll
    for (int j = 0; j < kBinsPerThread; ++j) {
      bool hit;
      if constexpr (kRank == Rank::kCount) {
        hit = cb < need && need <= cb + c[j];
      } else if constexpr (kRank == Rank::kMassAtLeast) {
        hit = mb < target && target <= mb + m[j];
      } else {
        hit = mb <= target && target < mb + m[j];
      }
      if (hit) atomicMin(&smem.pick, kBinsPerThread * static_cast<int>(threadIdx.x) + j);
      cb += c[j];
      mb += m[j];
    }
  }
  __syncthreads();
  int pick = smem.pick;
  if (pick == INT_MAX) {
#pragma unroll
    for (int j = 0; j < kBinsPerThread; ++j) {
      if (kMass ? m[j] > 0.0 : c[j] > 0u) atomicMax(&smem.fallback, kBinsPerThread * static_cast<int>(threadIdx.x) + j);
    }
    __syncthreads();
    pick = smem.fallback >= 0 ? smem.fallback : kBins - 1;
  }
  if (pick / kBinsPerThread == static_cast<int>(threadIdx.x)) {
    uint32_t cb = c_before;
    double mb = mass_above + m_before;
    uint32_t in_bin = 0;
#pragma unroll
    for (int j = 0; j < kBinsPerThread; ++j) {
      if (j < pick % kBinsPerThread) {
        cb += c[j];
        mb += m[j];
      }
      if (j == pick % kBinsPerThread) in_bin = c[j];
    }
    smem.choice = BinChoice{kBins - 1 - pick, cb, in_bin, mb};
  }
  __syncthreads();
  return smem.choice;
}

template <int kBits, Rank kRank>
__device__ __forceinline__ void Advance(SelectState& st, const BinChoice& choice) {
  st.prefix |= static_cast<uint32_t>(choice.bin) << Radix<kBits>::Shift(st.level);
  st.above += choice.count_above;
  if constexpr (kRank == Rank::kCount) st.need -= choice.count_above;
  st.mass_above = choice.mass_above;
  st.group = choice.count_in_bin;
  ++st.level;
}

// Histograms the current digit of the keys that match the prefix. `visit(cb)` calls cb(key, mass)
// for every member of the set, spread over the block's threads.
template <int kBits, bool kMass, class Visit>
__device__ void HistogramLevel(const SelectState& st, Visit&& visit) {
  ClearBins<kMass>();
  visit([&](uint32_t key, float mass) {
    if (MatchesPrefix<kBits>(key, st)) {
      const uint32_t digit = DigitOf<kBits>(key, st.level);
      atomicAdd(&smem.count[digit], 1u);
      if constexpr (kMass) {
        if (mass > 0.0f) atomicAdd(&smem.second.mass[digit], static_cast<double>(mass));
      }
    }
  });
  __syncthreads();
}

template <int kBits, Rank kRank>
__device__ __forceinline__ void FindAndAdvance(SelectState& st, double target) {
  Advance<kBits, kRank>(st, FindBin<kRank>(smem.count, smem.second.mass, st.need, st.mass_above, target));
}

// Runs the remaining levels of a select.
template <int kBits, Rank kRank, class Visit>
__device__ void FinishSelect(SelectState& st, double target, Visit&& visit) {
  while (st.level < Radix<kBits>::kLevels) {
    HistogramLevel<kBits, kRank != Rank::kCount>(st, visit);
    FindAndAdvance<kBits, kRank>(st, target);
  }
}

// Copies (token, value) of the row's tokens for which keep(token, raw, &value) holds into the list;
// the caller knows there are at most kListCapacity. Returns how many.
template <int kUnroll = 2, class Keep>
__device__ int GatherRow(const RowView& row, Keep&& keep) {
  __syncthreads();
  if (threadIdx.x == 0) smem.list_size = 0;
  __syncthreads();
  ForEachLogit<kUnroll>(row, [&](int t, float raw) {
    float value;
    if (keep(t, raw, &value)) {
      const int i = atomicAdd(&smem.list_size, 1);
      if (i < kListCapacity) smem.list[i] = ListEntry{t, value};
    }
  });
  __syncthreads();
  return MinInt(smem.list_size, kListCapacity);
}

// A set's first `rank`-th members in (key descending, id ascending) order: key above `key`, or
// equal with id <= `id`.
struct Cut {
  bool active = false;
  uint32_t key = 0;
  int id = INT_MAX;
  __device__ __forceinline__ bool Keeps(uint32_t k, int t) const { return !active || k > key || (k == key && t <= id); }
};

// The need-th lowest id among the members (visit calls cb(token) for each).
template <class VisitIds>
__device__ int SelectId(uint32_t need, VisitIds&& visit_ids) {
  SelectState st;
  st.need = need;
  FinishSelect<kIdBits, Rank::kCount>(st, 0.0, [&](auto&& cb) {
    visit_ids([&](int t) { cb(kIdMask - static_cast<uint32_t>(t), 0.0f); });
  });
  return static_cast<int>(kIdMask - st.prefix);
}

// ---------------------------------------------------------------------------------------------
// The draw over the whole row (Sampler::Draw's loop). KeptWeight(token, raw) is the token's
// weight when it is kept and positive, else 0. The first pass sums each 128-token chunk (bins in
// descending order: ascending ids); FindBin picks the chunk where the running weight exceeds
// target = uniform * total; one warp scans from there. Returns the first token in id order whose
// running weight exceeds the target, or the last one with weight when rounding leaves none.
template <class KeptWeight>
__device__ __noinline__ double DrawChunkWeights(const RowView row, const KeptWeight kept_weight) {
  const int chunks = (row.vocab + kChunk - 1) / kChunk;
  ClearBins<true>();
  int last_positive = -1;
  double thread_mass = 0.0;
  constexpr int kUnroll = 1;
  for (int c0 = Warp(); c0 < chunks; c0 += kWarps * kUnroll) {
    float v[kUnroll][4];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) LoadQuad(row, (c0 + u * kWarps) * (kChunk / 4) + Lane(), v[u]);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = c0 + u * kWarps;
      if (c < chunks) {
        double sum = 0.0;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int t = c * kChunk + 4 * Lane() + e;
          if (t < row.vocab) {
            const float mv = kept_weight(t, v[u][e]);
            if (mv > 0.0f) {
              sum += static_cast<double>(mv);
              last_positive = t;
            }
          }
        }
        sum = WarpAllReduce(sum, Plus{});
        if (Lane() == 0) {
          smem.second.mass[kBins - 1 - c] = sum;
          thread_mass += sum;
        }
      }
    }
  }
  last_positive = BlockAllReduce(last_positive, Max{});
  if (threadIdx.x == 0) smem.token = last_positive;
  return BlockAllReduce(thread_mass, Plus{});
}

// Warp 0 scans from `chunk` with the running weight before it; the token lands in smem.token
// (left at the last positive one when the running weight never exceeds the target).
template <class KeptWeight>
__device__ __noinline__ void DrawScan(const RowView row, const KeptWeight kept_weight, int chunk, double running,
                                      double target) {
  const int chunks = (row.vocab + kChunk - 1) / kChunk;
  for (int c = chunk; c < chunks; ++c) {
    float v[4];
    LoadQuad(row, c * (kChunk / 4) + Lane(), v);
    float mv[4];
    double partial[4];
    double lane_sum = 0.0;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int t = c * kChunk + 4 * Lane() + e;
      mv[e] = t < row.vocab ? kept_weight(t, v[e]) : 0.0f;
      if (!(mv[e] > 0.0f)) mv[e] = 0.0f;
      lane_sum += static_cast<double>(mv[e]);
      partial[e] = lane_sum;
    }
    double inclusive = lane_sum;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const double up = __shfl_up_sync(kFullMask, inclusive, o);
      if (Lane() >= o) inclusive += up;
    }
    double exclusive = __shfl_up_sync(kFullMask, inclusive, 1);
    if (Lane() == 0) exclusive = 0.0;
    const double base = running + exclusive;
    int hit = -1;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (hit < 0 && mv[e] > 0.0f && base + partial[e] > target) hit = c * kChunk + 4 * Lane() + e;
    }
    const unsigned lanes = __ballot_sync(kFullMask, hit >= 0);
    if (lanes != 0) {
      const int found = __shfl_sync(kFullMask, hit, __ffs(static_cast<int>(lanes)) - 1);
      if (Lane() == 0) smem.token = found;
      return;
    }
    running += __shfl_sync(kFullMask, inclusive, 31);
  }
}

template <class KeptWeight>
__device__ int DrawFromRow(const RowView& row, double uniform, const KeptWeight& kept_weight) {
  const double target = uniform * DrawChunkWeights(row, kept_weight);
  const BinChoice choice = FindBin<Rank::kMassAbove>(nullptr, smem.second.mass, 0u, 0.0, target);
  if (Warp() == 0) DrawScan(row, kept_weight, kBins - 1 - choice.bin, choice.mass_above, target);
  __syncthreads();
  return smem.token;
}

// ---------------------------------------------------------------------------------------------
// One row, in phases that are not inlined into each other (each gets the registers to itself).

struct RowOutputs {
  SamplingRowResult* result;
  SamplingTopLogprob* top;
};

// The first pass: raw log-sum-exp, argmax of the penalised logits, and the first digit of the
// top-k and top-logprob selects.
struct RowStats {
  double log_normalizer;
  ArgMax best;
};

template <class Pen>
__device__ __noinline__ RowStats FirstPass(const RowView row, const Pen pen, bool top_k_on, bool top_logprobs_on) {
  if (top_k_on || top_logprobs_on) {
    __syncthreads();
    for (int i = static_cast<int>(threadIdx.x); i < kBins; i += kThreads) {
      smem.count[i] = 0;
      smem.second.raw_count[i] = 0;
    }
    __syncthreads();
  }
  LogSumExp lse{-INFINITY, 0.0f};
  ArgMax best{-INFINITY, INT_MAX};
  ForEachLogit<4>(row, [&](int t, float raw) {
    lse.Add(raw);
    const float w = pen.Apply(t, raw);
    best.Add(w, t);
    if (top_k_on) atomicAdd(&smem.count[OrderedKey(w) >> (32 - kDigitBits)], 1u);
    if (top_logprobs_on) atomicAdd(&smem.second.raw_count[OrderedKey(raw) >> (32 - kDigitBits)], 1u);
  });
  lse = BlockAllReduce(lse, CombineLogSumExp{});
  best = BlockAllReduce(best, CombineArgMax{});
  // Sampler::Argmax keeps id 0 when its logit is NaN.
  const float first = pen.Apply(0, __ldg(row.logits));
  if (first != first) best.id = 0;
  return RowStats{static_cast<double>(lse.max) + log(static_cast<double>(lse.sum)), best};
}

__device__ __forceinline__ void WriteResult(const RowView& row, int token, double log_normalizer, RowOutputs out) {
  if (threadIdx.x == 0) {
    token = MinInt(MaxInt(token, 0), row.vocab - 1);
    out.result->token = token;
    out.result->logprob = static_cast<float>(static_cast<double>(row.logits[token]) - log_normalizer);
  }
}

// Top-k over the penalised logits, (logit descending, id ascending). FirstPass histogrammed the
// first digit. Gathers the candidates into the list when few enough (*listed, else -1).
template <class Pen>
__device__ __noinline__ Cut SelectTopK(const RowView row, const Pen pen, int top_k, int* listed) {
  SelectState st;
  st.need = static_cast<uint32_t>(top_k);
  FindAndAdvance<32, Rank::kCount>(st, 0.0);
  int n = -1;
  if (st.above + st.group <= kListCapacity) {
    const uint32_t min_key = st.prefix;
    n = GatherRow(row, [&](int t, float raw, float* value) {
      *value = pen.Apply(t, raw);
      return OrderedKey(*value) >= min_key;
    });
  }
  FinishSelect<32, Rank::kCount>(st, 0.0, [&](auto&& cb) {
    if (n >= 0) {
      ForEachListed(n, [&](int, float w) { cb(OrderedKey(w), 0.0f); });
    } else {
      ForEachLogit<4>(row, [&](int t, float raw) { cb(OrderedKey(pen.Apply(t, raw)), 0.0f); });
    }
  });
  Cut cut{true, st.prefix, INT_MAX};
  if (st.need < st.group) {
    const uint32_t key = st.prefix;
    cut.id = SelectId(st.need, [&](auto&& cb) {
      if (n >= 0) {
        ForEachListed(n, [&](int t, float w) {
          if (OrderedKey(w) == key) cb(t);
        });
      } else {
        ForEachLogit<4>(row, [&](int t, float raw) {
          if (OrderedKey(pen.Apply(t, raw)) == key) cb(t);
        });
      }
    });
  }
  *listed = n;
  return cut;
}

// The tokens that survive top-k and min-p (the best weight is 1, so min-p keeps weight >= min_p;
// with min_p 0 that is every weight), with Sampler::Draw's weights.
struct Survivors {
  Cut top_k;
  float best;
  float temperature;
  float min_p;
  float min_logit;  // LogitFloor of min_p: below it no token survives min-p
  __device__ __forceinline__ bool Keep(int t, float w, float* weight) const {
    if (!(w >= min_logit) || !top_k.Keeps(OrderedKey(w), t)) return false;
    *weight = Weight(w, best, temperature, smem.exp_table);
    return !(*weight < min_p);
  }
};

// Top-p's passes, each over the survivors with a logit in [lo, hi] (the list when listed >= 0):
// histograms of the weight keys' current digit (with their weights), and of the ids of the tokens
// whose weight key is `key`.
template <class Pen, class F>
__device__ __forceinline__ void ForEachSurvivor(const RowView& row, const Pen& pen, const Survivors& survivors,
                                                int listed, float lo, float hi, F&& f) {
  auto one = [&](int t, float w) {
    float weight;
    if (w >= lo && w <= hi && survivors.Keep(t, w, &weight)) f(t, w, weight);
  };
  if (listed >= 0) {
    ForEachListed(listed, one);
  } else {
    ForEachLogit<2>(row, [&](int t, float raw) { one(t, pen.Apply(t, raw)); });
  }
}

template <class Pen>
__device__ __noinline__ void TopPWeightHistogram(const RowView row, const Pen pen, const Survivors survivors,
                                                 int listed, float lo, float hi, const SelectState st) {
  HistogramLevel<32, true>(st, [&](auto&& cb) {
    ForEachSurvivor(row, pen, survivors, listed, lo, hi,
                    [&](int, float, float weight) { cb(__float_as_uint(weight), weight); });
  });
}

template <class Pen>
__device__ __noinline__ void TopPIdHistogram(const RowView row, const Pen pen, const Survivors survivors, int listed,
                                             float lo, float hi, uint32_t key, const SelectState st) {
  HistogramLevel<kIdBits, false>(st, [&](auto&& cb) {
    ForEachSurvivor(row, pen, survivors, listed, lo, hi, [&](int t, float, float weight) {
      if (__float_as_uint(weight) == key) cb(kIdMask - static_cast<uint32_t>(t), 0.0f);
    });
  });
}

// Gathers the survivors with weight key >= min_key (so logit >= lo) into the list; returns how many.
template <class Pen>
__device__ __noinline__ int TopPGather(const RowView row, const Pen pen, const Survivors survivors, uint32_t min_key,
                                      float lo) {
  return GatherRow<1>(row, [&](int t, float raw, float* value) {
    *value = pen.Apply(t, raw);
    float weight;
    return *value >= lo && survivors.Keep(t, *value, &weight) && __float_as_uint(weight) >= min_key;
  });
}

// Top-p over the survivors (Sampler::KeepTopP): (weight descending, id ascending) until the
// running weight reaches top_p times their total. May gather the candidates into the list.
template <class Pen>
__device__ __noinline__ Cut SelectTopP(const RowView row, const Pen pen, const Survivors survivors, float top_p,
                                       int* listed) {
  const float best = survivors.best;
  const float temperature = survivors.temperature;
  int n = *listed;
  SelectState st;
  TopPWeightHistogram(row, pen, survivors, n, -INFINITY, INFINITY, st);
  double thread_mass = 0.0;
#pragma unroll
  for (int j = 0; j < kBinsPerThread; ++j) thread_mass += smem.second.mass[kBinsPerThread * threadIdx.x + j];
  const double target = static_cast<double>(top_p) * BlockAllReduce(thread_mass, Plus{});
  FindAndAdvance<32, Rank::kMassAtLeast>(st, target);
  if (n < 0 && st.above + st.group <= kListCapacity) {
    n = TopPGather(row, pen, survivors, st.prefix, LogitFloor(st.prefix, best, temperature));
  }
  while (st.level < Radix<32>::kLevels) {
    const uint32_t below = (1u << Radix<32>::High(st.level)) - 1u;  // High < 32 after the first level
    TopPWeightHistogram(row, pen, survivors, n, LogitFloor(st.prefix, best, temperature),
                        LogitCeiling(st.prefix | below, best, temperature), st);
    FindAndAdvance<32, Rank::kMassAtLeast>(st, target);
  }
  // The last key's tokens all weigh the same: keep as many (lowest ids first) as reach the target.
  const uint32_t key = st.prefix;
  const float weight = __uint_as_float(key);
  uint32_t take = st.group;
  if (weight > 0.0f) {
    const double wanted = ceil((target - st.mass_above) / static_cast<double>(weight));
    if (wanted < static_cast<double>(st.group)) take = wanted < 1.0 ? 1u : static_cast<uint32_t>(wanted);
  }
  Cut cut{true, key, INT_MAX};
  if (take < st.group) {
    const float lo = LogitFloor(key, best, temperature);
    const float hi = LogitCeiling(key, best, temperature);
    SelectState ids;
    ids.need = take;
    while (ids.level < Radix<kIdBits>::kLevels) {
      TopPIdHistogram(row, pen, survivors, n, lo, hi, key, ids);
      FindAndAdvance<kIdBits, Rank::kCount>(ids, 0.0);
    }
    cut.id = static_cast<int>(kIdMask - ids.prefix);
  }
  *listed = n;
  return cut;
}

// The draw (Sampler::Draw's loop) over the kept tokens in id order, skipping weights <= 0.
template <class Pen>
struct KeptWeight {
  Pen pen;
  Survivors survivors;
  Cut top_p;
  float lo;  // LogitFloor of the top-p cut: tokens below it are not kept
  // `w` is the penalised logit.
  __device__ __forceinline__ float OfLogit(int t, float w) const {
    float weight;
    if (!(w >= lo) || !survivors.Keep(t, w, &weight) || !top_p.Keeps(__float_as_uint(weight), t) ||
        !(weight > 0.0f)) {
      return 0.0f;
    }
    return weight;
  }
  __device__ __forceinline__ float operator()(int t, float raw) const { return OfLogit(t, pen.Apply(t, raw)); }
};

// The draw among the `listed` candidates gathered in the list: a mass select on the ids.
template <class Pen>
__device__ __noinline__ int DrawFromList(const KeptWeight<Pen> kept_weight, int listed, double uniform) {
  double thread_mass = 0.0;
  ForEachListed(listed, [&](int t, float w) { thread_mass += static_cast<double>(kept_weight.OfLogit(t, w)); });
  const double target = uniform * BlockAllReduce(thread_mass, Plus{});
  SelectState st;
  FinishSelect<kIdBits, Rank::kMassAbove>(st, target, [&](auto&& cb) {
    ForEachListed(listed, [&](int t, float w) {
      const float mass = kept_weight.OfLogit(t, w);
      if (mass > 0.0f) cb(kIdMask - static_cast<uint32_t>(t), mass);
    });
  });
  return static_cast<int>(kIdMask - st.prefix);
}

template <class Pen>
__device__ __noinline__ int Draw(const RowView row, const Pen pen, const Survivors survivors, const Cut top_p,
                                 double uniform, int listed) {
  const float lo = top_p.active ? LogitFloor(top_p.key, survivors.best, survivors.temperature) : -INFINITY;
  const KeptWeight<Pen> kept_weight{pen, survivors, top_p, lo};
  return listed < 0 ? DrawFromRow(row, uniform, kept_weight) : DrawFromList(kept_weight, listed, uniform);
}

// The n best raw logits, best first, as logprobs. `st` has the first digit decided.
__device__ __noinline__ void WriteTopLogprobs(const RowView row, int n, SelectState st, double log_normalizer,
                                              RowOutputs out) {
  int listed = -1;
  if (st.above + st.group <= kListCapacity) {
    const uint32_t min_key = st.prefix;
    listed = GatherRow(row, [&](int, float raw, float* value) {
      *value = raw;
      return OrderedKey(raw) >= min_key;
    });
  }
  auto visit_raw = [&](auto&& cb) {  // cb(token, raw)
    if (listed >= 0) {
      ForEachListed(listed, cb);
    } else {
      ForEachLogit<4>(row, cb);
    }
  };
  FinishSelect<32, Rank::kCount>(st, 0.0, [&](auto&& cb) {
    visit_raw([&](int, float raw) { cb(OrderedKey(raw), 0.0f); });
  });
  Cut cut{true, st.prefix, INT_MAX};
  if (st.need < st.group) {
    const uint32_t key = st.prefix;
    cut.id = SelectId(st.need, [&](auto&& cb) {
      visit_raw([&](int t, float raw) {
        if (OrderedKey(raw) == key) cb(t);
      });
    });
  }
  __syncthreads();
  if (threadIdx.x == 0) smem.top_count = 0;
  __syncthreads();
  visit_raw([&](int t, float raw) {
    if (cut.Keeps(OrderedKey(raw), t)) {
      const int i = atomicAdd(&smem.top_count, 1);
      if (i < kSamplingMaxTopLogprobs) smem.top[i] = ListEntry{t, raw};
    }
  });
  __syncthreads();
  if (threadIdx.x == 0) {
    const int m = MinInt(MinInt(smem.top_count, n), kSamplingMaxTopLogprobs);
    for (int i = 1; i < m; ++i) {  // insertion sort: (logit descending, id ascending)
      const ListEntry e = smem.top[i];
      int j = i - 1;
      while (j >= 0 && (smem.top[j].value < e.value || (smem.top[j].value == e.value && smem.top[j].id > e.id))) {
        smem.top[j + 1] = smem.top[j];
        --j;
      }
      smem.top[j + 1] = e;
    }
    for (int i = 0; i < m; ++i) {
      const double logprob = static_cast<double>(smem.top[i].value) - log_normalizer;
      out.top[i] = SamplingTopLogprob{smem.top[i].id, static_cast<float>(logprob)};
    }
  }
}

template <class Pen>
__device__ __noinline__ void SampleRow(const RowView row, const SamplingRowParams& p, const Pen pen, RowOutputs out) {
  const bool greedy = p.temperature == 0.0f;
  const int top_n = MinInt(p.top_logprobs, row.vocab);
  const bool top_k_on = !greedy && p.top_k > 0 && p.top_k < row.vocab;
  const RowStats stats = FirstPass(row, pen, top_k_on, top_n > 0);

  // The top-logprob select's first digit, before the histograms are reused.
  SelectState top_st;
  if (top_n > 0) {
    top_st.need = static_cast<uint32_t>(top_n);
    Advance<32, Rank::kCount>(top_st, FindBin<Rank::kCount>(smem.second.raw_count, nullptr, top_st.need, 0.0, 0.0));
  }

  int token = stats.best.id;
  if (!greedy) {
    int listed = -1;
    const float min_logit = LogitFloor(p.min_p > 0.0f ? __float_as_uint(p.min_p) : 0u, stats.best.value, p.temperature);
    Survivors survivors{Cut{}, stats.best.value, p.temperature, p.min_p, min_logit};
    if (top_k_on) survivors.top_k = SelectTopK(row, pen, p.top_k, &listed);
    const Cut top_p = p.top_p < 1.0f ? SelectTopP(row, pen, survivors, p.top_p, &listed) : Cut{};
    token = Draw(row, pen, survivors, top_p, p.uniform, listed);
  }
  WriteResult(row, token, stats.log_normalizer, out);
  if (top_n > 0) WriteTopLogprobs(row, top_n, top_st, stats.log_normalizer, out);
}

__device__ __forceinline__ RowView RowOf(const SamplingArgs& args) {
  const float* logits = args.logits + static_cast<int64_t>(blockIdx.x) * args.row_stride;
  return RowView{logits, args.vocab, (reinterpret_cast<uintptr_t>(logits) & 15u) == 0};
}

__device__ __forceinline__ RowOutputs OutputsOf(const SamplingArgs& args, const SamplingRowParams& p) {
  return RowOutputs{args.results + blockIdx.x, args.top != nullptr ? args.top + p.top_offset : nullptr};
}

__global__ void __launch_bounds__(kThreads, 2) SampleKernel(const SamplingArgs args) {
  const SamplingRowParams p = args.params[blockIdx.x];
  const RowView row = RowOf(args);
  if (threadIdx.x < 32) smem.exp_table[threadIdx.x] = exp2(static_cast<double>(threadIdx.x) / 32.0);
  __syncthreads();
  if (p.penalty_end > p.penalty_begin && args.workspace != nullptr) {
    SampleRow(row, p, SetUpPenalties(row, p, args), OutputsOf(args, p));
  } else {
    SampleRow(row, p, NoPenalties{}, OutputsOf(args, p));
  }
}

// Greedy rows without top logprobs: the first pass alone.
__global__ void __launch_bounds__(kThreads, 2) GreedyKernel(const SamplingArgs args) {
  const SamplingRowParams p = args.params[blockIdx.x];
  const RowView row = RowOf(args);
  RowStats stats;
  if (p.penalty_end > p.penalty_begin && args.workspace != nullptr) {
    stats = FirstPass(row, SetUpPenalties(row, p, args), false, false);
  } else {
    stats = FirstPass(row, NoPenalties{}, false, false);
  }
  WriteResult(row, stats.best.id, stats.log_normalizer, OutputsOf(args, p));
}

}  // namespace

size_t SamplingWorkspaceBytes(int32_t max_rows, int32_t vocab, int64_t max_penalty_tokens) {
  const int64_t per_row = BitmapWords(vocab) + RankWords(vocab);
  return static_cast<size_t>(max_rows) * static_cast<size_t>(per_row) * sizeof(uint32_t) +
         static_cast<size_t>(max_penalty_tokens) * sizeof(float);
}

cudaError_t LaunchSampling(const SamplingArgs& args, cudaStream_t stream) {
  if (args.rows < 0 || args.rows > kSamplingMaxRows || args.vocab < 1 || args.vocab > kSamplingMaxVocab ||
      args.row_stride < args.vocab) {
    return cudaErrorInvalidValue;
  }
  if (args.rows == 0) return cudaSuccess;
  if (args.logits == nullptr || args.params == nullptr || args.results == nullptr) return cudaErrorInvalidValue;
  if (args.greedy_only) {
    GreedyKernel<<<args.rows, kThreads, 0, stream>>>(args);
  } else {
    SampleKernel<<<args.rows, kThreads, 0, stream>>>(args);
  }
  return cudaGetLastError();
}

}  // namespace cohort
