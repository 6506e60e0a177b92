// The MoE kernels (kernels/moe.h) against CPU references: the gate against TopkRouter, the align's
// invariants, the grouped GEMM against a double-precision product, SiLU-and-mul, the combine, and a
// whole layer (gate -> align -> gate_up -> silu -> down -> combine) against a CPU loop, eager and
// replayed from a CUDA graph. Inputs are fresh random values each run (the seed is printed on a
// failure); outputs are poisoned before each launch and every element is checked.
#include "kernels/moe.h"

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <span>
#include <vector>

#include "tests/testing/gpu.h"
#include "worker/model/config.h"
#include "worker/model/routing.h"

namespace cohort {
namespace {

// ---------------------------------------------------------------------------------- host helpers

class Rng {
 public:
  explicit Rng(uint64_t seed) : state_(seed) {}
  uint64_t Next() {  // splitmix64
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  float Uniform(float lo, float hi) { return lo + (hi - lo) * static_cast<float>(Next() >> 40) * 0x1p-24f; }
  int Below(int n) { return static_cast<int>(Next() % static_cast<uint64_t>(n)); }

 private:
  uint64_t state_;
};

uint64_t FreshSeed() {
  std::random_device device;
  return (static_cast<uint64_t>(device()) << 32) ^ device();
}

uint16_t FloatToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return 0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}

float Bf16ToFloat(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

float RoundBf16(double v) { return Bf16ToFloat(FloatToBf16(static_cast<float>(v))); }

// The spacing of bf16 values (8 significant bits) at v; 0 at 0.
double UlpBf16(float v) { return v == 0.0f ? 0.0 : std::ldexp(1.0, std::ilogb(v) - 7); }

// Uniform in [-scale, scale), rounded to bf16; drawn in parallel chunks (expert weights are ~1e9 values).
std::vector<uint16_t> RandomBf16(Rng& rng, int64_t count, float scale = 1.0f) {
  constexpr int64_t kChunk = int64_t{1} << 16;
  std::vector<uint16_t> out(count);
  const uint64_t seed = rng.Next();
#pragma omp parallel for schedule(static)
  for (int64_t chunk = 0; chunk < (count + kChunk - 1) / kChunk; ++chunk) {
    Rng local(seed ^ (static_cast<uint64_t>(chunk) * 0xd1b54a32d192ed03ull));
    const int64_t end = std::min(count, (chunk + 1) * kChunk);
    for (int64_t i = chunk * kChunk; i < end; ++i) out[i] = FloatToBf16(local.Uniform(-scale, scale));
  }
  return out;
}

std::vector<float> ToFloat(std::span<const uint16_t> bf16) {
  std::vector<float> out(bf16.size());
  for (size_t i = 0; i < bf16.size(); ++i) out[i] = Bf16ToFloat(bf16[i]);
  return out;
}

// sum_i a[i] * w[i] for bf16-valued a: each product of two bf16 values is exact in float, so with a
// double sum this is the exact dot product up to the double rounding of the sum.
__attribute__((target_clones("avx2", "default"))) double DotBf16(const float* a, const uint16_t* w, int64_t n) {
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(a[i] * Bf16ToFloat(w[i]));
  return sum;
}

// Every element within bf16 rounding of the reference (|d| <= 8e-3 |ref| + 2e-3 rms(ref) + allowance[i]:
// the output rounding alone is 2^-9 |ref|; `allowance`, when given, adds what roundings of
// intermediates can move element i) and the whole within the relative Frobenius error 1e-2. Unwritten
// outputs hold the NaN poison and fail.
void ExpectClose(std::span<const float> got, std::span<const double> want, const char* what,
                 std::span<const double> allowance = {}) {
  ASSERT_EQ(got.size(), want.size()) << what;
  ASSERT_TRUE(allowance.empty() || allowance.size() == want.size()) << what;
  double want_sq = 0.0;
  for (double w : want) want_sq += w * w;
  const double rms = std::sqrt(want_sq / std::max<size_t>(want.size(), 1));
  double err_sq = 0.0;
  int64_t bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double d = static_cast<double>(got[i]) - want[i];
    err_sq += d * d;
    const double tolerance = 8e-3 * std::abs(want[i]) + 2e-3 * rms + (allowance.empty() ? 0.0 : allowance[i]);
    if (!(std::abs(d) <= tolerance)) {
      if (++bad <= 5) {
        ADD_FAILURE() << what << ": element " << i << " is " << got[i] << ", want " << want[i] << " +- "
                      << tolerance;
      }
    }
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << got.size() << " elements out of tolerance";
  const double rel = std::sqrt(err_sq / std::max(want_sq, 1e-300));
  EXPECT_LT(rel, 1e-2) << what << ": relative Frobenius error";
}

// --------------------------------------------------------------------------------- device helpers

template <class T>
class DeviceBuffer {
 public:
  explicit DeviceBuffer(int64_t count) : count_(count) {
    error_ = cudaMalloc(reinterpret_cast<void**>(&data_), static_cast<size_t>(std::max<int64_t>(count, 1)) * sizeof(T));
  }
  explicit DeviceBuffer(const std::vector<T>& host) : DeviceBuffer(static_cast<int64_t>(host.size())) {
    if (error_ == cudaSuccess) {
      error_ = cudaMemcpy(data_, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice);
    }
  }
  ~DeviceBuffer() { cudaFree(data_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  cudaError_t error() const { return error_; }
  T* get() const { return data_; }
  // 0xff bytes: NaN in bf16 and fp32, -1 in int32; 0xa5 bytes: a large negative int32.
  cudaError_t Poison(int byte = 0xff) const { return cudaMemset(data_, byte, count_ * sizeof(T)); }
  cudaError_t Read(std::vector<T>* host) const { return ReadFirst(count_, host); }
  cudaError_t ReadFirst(int64_t count, std::vector<T>* host) const {
    host->resize(count);
    return cudaMemcpy(host->data(), data_, count * sizeof(T), cudaMemcpyDeviceToHost);
  }

 private:
  T* data_ = nullptr;
  int64_t count_ = 0;
  cudaError_t error_ = cudaSuccess;
};

__nv_bfloat16* Bf16(const DeviceBuffer<uint16_t>& b) { return reinterpret_cast<__nv_bfloat16*>(b.get()); }

template <class T>
std::vector<T> ReadDevice(const T* device, int64_t count) {
  std::vector<T> host(count);
  EXPECT_EQ(cudaMemcpy(host.data(), device, count * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
  return host;
}

// k distinct experts per token, uniformly, or (skewed) mostly from the first few experts so that
// some experts get many tiles.
std::vector<int32_t> RandomTopkIds(Rng& rng, int64_t tokens, int top_k, int experts, bool skewed = false) {
  std::vector<int32_t> ids(tokens * top_k);
  std::vector<int32_t> pool(experts);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int e = 0; e < experts; ++e) pool[e] = e;
    for (int j = 0; j < top_k; ++j) {
      const int hot = std::min(experts - j, top_k + 2);
      const int pick = j + (skewed && rng.Below(4) != 0 ? rng.Below(hot) : rng.Below(experts - j));
      std::swap(pool[j], pool[pick]);
      ids[t * top_k + j] = pool[j];
    }
  }
  return ids;
}

struct RoutingOnDevice {
  RoutingOnDevice(int64_t tokens, int top_k, int experts)
      : workspace(MoeRoutingWorkspaceBytes(tokens, top_k, experts)),
        bytes(MoeRoutingWorkspaceBytes(tokens, top_k, experts)) {}
  cudaError_t Carve(int64_t tokens, int top_k, int experts, int tile_rows) {
    return CarveMoeRouting(workspace.get(), bytes, tokens, top_k, experts, tile_rows, &routing);
  }
  DeviceBuffer<uint8_t> workspace;
  int64_t bytes;
  MoeRouting routing;
};

// ------------------------------------------------------------------------------------------- gate

ModelConfig RouterConfig(int experts, int top_k, int groups, int topk_group, ScoringFunc scoring,
                         TopkMethod method, bool normalize, double scaling) {
  ModelConfig c;
  c.n_routed_experts = experts;
  c.num_experts_per_tok = top_k;
  c.n_group = groups;
  c.topk_group = topk_group;
  c.scoring_func = scoring;
  c.topk_method = method;
  c.norm_topk_prob = normalize;
  c.routed_scaling_factor = scaling;
  return c;
}

ModelConfig V2LiteRouter() { return RouterConfig(64, 6, 1, 1, ScoringFunc::kSoftmax, TopkMethod::kGreedy, false, 1.0); }
ModelConfig V2GroupRouter() {
  return RouterConfig(160, 6, 8, 3, ScoringFunc::kSoftmax, TopkMethod::kGroupLimitedGreedy, false, 16.0);
}
ModelConfig V3Router() { return RouterConfig(256, 8, 8, 4, ScoringFunc::kSigmoid, TopkMethod::kNoAuxTc, true, 2.5); }

MoeGateParams GateParams(const ModelConfig& c) {
  MoeGateParams p;
  p.num_experts = static_cast<int32_t>(c.n_routed_experts);
  p.top_k = static_cast<int32_t>(c.num_experts_per_tok);
  p.n_group = static_cast<int32_t>(c.n_group);
  p.topk_group = static_cast<int32_t>(c.topk_group);
  p.scoring = c.scoring_func == ScoringFunc::kSigmoid ? MoeScoring::kSigmoid : MoeScoring::kSoftmax;
  p.method = c.topk_method == TopkMethod::kGreedy               ? MoeTopkMethod::kGreedy
             : c.topk_method == TopkMethod::kGroupLimitedGreedy ? MoeTopkMethod::kGroupLimitedGreedy
                                                                : MoeTopkMethod::kNoAuxTc;
  p.norm_topk_prob = c.norm_topk_prob;
  p.routed_scaling_factor = static_cast<float>(c.routed_scaling_factor);
  return p;
}

// True when every comparison the selection makes is decided by more than float rounding (the GPU's
// expf is not the host's), unless the compared values come from identical inputs: those tie exactly on
// both sides and go to the lower index. Worked out in double, mirroring TopkRouter.
bool WellSeparated(const ModelConfig& c, const float* logits, const float* bias) {
  const int experts = static_cast<int>(c.n_routed_experts);
  std::vector<double> choice(experts);
  double max = -INFINITY;
  for (int e = 0; e < experts; ++e) max = std::max(max, static_cast<double>(logits[e]));
  double sum = 0.0;
  for (int e = 0; e < experts; ++e) sum += std::exp(logits[e] - max);
  for (int e = 0; e < experts; ++e) {
    choice[e] = c.scoring_func == ScoringFunc::kSigmoid ? 1.0 / (1.0 + std::exp(-static_cast<double>(logits[e])))
                                                        : std::exp(logits[e] - max) / sum;
    if (bias != nullptr) choice[e] += bias[e];
  }
  auto near = [](double a, double b) { return std::abs(a - b) <= 1e-6 * std::max(std::abs(a), std::abs(b)); };
  auto same_input = [&](int a, int b) {
    return logits[a] == logits[b] && (bias == nullptr || bias[a] == bias[b]);
  };
  auto by_choice = [&](int a, int b) { return choice[a] > choice[b] || (choice[a] == choice[b] && a < b); };

  if (c.topk_method != TopkMethod::kGreedy && c.topk_group < c.n_group) {
    const int groups = static_cast<int>(c.n_group);
    const int per_group = experts / groups;
    const int best = c.topk_method == TopkMethod::kNoAuxTc ? 2 : 1;
    std::vector<double> score(groups);
    std::vector<std::vector<int>> members(groups);
    for (int g = 0; g < groups; ++g) {
      std::vector<int> order(per_group);
      for (int i = 0; i < per_group; ++i) order[i] = g * per_group + i;
      std::sort(order.begin(), order.end(), by_choice);
      members[g].assign(order.begin(), order.begin() + best);
      score[g] = 0.0;
      for (int e : members[g]) score[g] += choice[e];
    }
    for (int g = 0; g < groups; ++g) {
      for (int h = g + 1; h < groups; ++h) {
        if (!near(score[g], score[h])) continue;
        bool same = true;
        for (int i = 0; i < best; ++i) same = same && same_input(members[g][i], members[h][i]);
        if (!same) return false;
      }
    }
    std::vector<int> group_order(groups);
    for (int g = 0; g < groups; ++g) group_order[g] = g;
    std::sort(group_order.begin(), group_order.end(),
              [&](int a, int b) { return score[a] > score[b] || (score[a] == score[b] && a < b); });
    std::vector<bool> keep(groups, false);
    for (int i = 0; i < c.topk_group; ++i) keep[group_order[i]] = true;
    for (int e = 0; e < experts; ++e) {
      if (!keep[e / per_group]) choice[e] = -INFINITY;
    }
  }
  std::vector<int> order(experts);
  for (int e = 0; e < experts; ++e) order[e] = e;
  std::sort(order.begin(), order.end(), by_choice);
  for (int i = 0; i + 1 < experts && i < c.num_experts_per_tok; ++i) {
    const int a = order[i];
    const int b = order[i + 1];
    if (std::isfinite(choice[a]) && std::isfinite(choice[b]) && near(choice[a], choice[b]) && !same_input(a, b)) {
      return false;
    }
  }
  return true;
}

enum class Logits { kContinuous, kFewValues };

// Random logits (and bias) for `tokens` tokens, redrawing any token whose choice is too close to call.
void DrawRouterInputs(Rng& rng, const ModelConfig& c, int64_t tokens, bool with_bias, Logits kind,
                      std::vector<float>* logits, std::vector<float>* bias) {
  const int experts = static_cast<int>(c.n_routed_experts);
  bias->clear();
  if (with_bias) {
    bias->resize(experts);
    // Few values: a constant bias keeps ties between equal logits exact ties.
    const float constant = rng.Uniform(-0.5f, 0.5f);
    for (float& b : *bias) b = kind == Logits::kFewValues ? constant : rng.Uniform(-0.5f, 0.5f);
  }
  static constexpr float kFew[] = {-1.0f, 0.0f, 0.5f, 1.0f};
  logits->resize(tokens * experts);
  for (int64_t t = 0; t < tokens; ++t) {
    float* x = logits->data() + t * experts;
    for (int attempt = 0;; ++attempt) {
      ASSERT_LT(attempt, 1000) << "cannot draw well separated logits";
      for (int e = 0; e < experts; ++e) x[e] = kind == Logits::kFewValues ? kFew[rng.Below(4)] : rng.Uniform(-4.0f, 4.0f);
      if (WellSeparated(c, x, with_bias ? bias->data() : nullptr)) break;
    }
  }
}

void ExpectGateMatchesCpu(const ModelConfig& c, int64_t tokens, bool with_bias, Logits kind, Rng& rng) {
  SCOPED_TRACE(::testing::Message() << "experts " << c.n_routed_experts << " top_k " << c.num_experts_per_tok
                                  << " groups " << c.n_group << "/" << c.topk_group << " tokens " << tokens
                                  << (with_bias ? " with bias" : ""));
  const int experts = static_cast<int>(c.n_routed_experts);
  const int top_k = static_cast<int>(c.num_experts_per_tok);
  std::vector<float> logits, bias;
  ASSERT_NO_FATAL_FAILURE(DrawRouterInputs(rng, c, tokens, with_bias, kind, &logits, &bias));

  DeviceBuffer<float> d_logits(logits);
  DeviceBuffer<float> d_bias(with_bias ? bias : std::vector<float>{0.0f});
  DeviceBuffer<int32_t> d_ids(tokens * top_k);
  DeviceBuffer<float> d_weights(tokens * top_k);
  ASSERT_CUDA_OK(d_logits.error());
  ASSERT_CUDA_OK(d_bias.error());
  ASSERT_CUDA_OK(d_ids.Poison(0xa5));
  ASSERT_CUDA_OK(d_weights.Poison());
  ASSERT_CUDA_OK(LaunchMoeGate(d_logits.get(), with_bias ? d_bias.get() : nullptr, tokens, GateParams(c),
                               d_ids.get(), d_weights.get(), nullptr));
  ASSERT_CUDA_OK(cudaDeviceSynchronize());
  std::vector<int32_t> ids;
  std::vector<float> weights;
  ASSERT_CUDA_OK(d_ids.Read(&ids));
  ASSERT_CUDA_OK(d_weights.Read(&weights));

  const TopkRouter router(c);
  std::vector<int32_t> want_ids(top_k);
  std::vector<float> want_weights(top_k);
  int64_t mismatches = 0;
  for (int64_t t = 0; t < tokens; ++t) {
    router.Select(std::span<const float>(logits.data() + t * experts, experts), bias, want_ids, want_weights);
    for (int j = 0; j < top_k; ++j) {
      const int32_t got_id = ids[t * top_k + j];
      const float got_weight = weights[t * top_k + j];
      const bool ok = got_id == want_ids[j] &&
                      std::abs(got_weight - want_weights[j]) <= 1e-5f * std::max(1.0f, std::abs(want_weights[j]));
      if (!ok && ++mismatches <= 5) {
        ADD_FAILURE() << "token " << t << " slot " << j << ": expert " << got_id << " weight " << got_weight
                      << ", want expert " << want_ids[j] << " weight " << want_weights[j];
      }
    }
  }
  EXPECT_EQ(mismatches, 0);
}

TEST(MoeGateTest, MatchesTopkRouterOnRandomLogits) {
  COHORT_SKIP_WITHOUT_GPU();
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  Rng rng(seed);
  // 72 experts in 4 groups: not a multiple of the warp, groups straddle lanes.
  const ModelConfig small_v3 = RouterConfig(72, 8, 4, 2, ScoringFunc::kSigmoid, TopkMethod::kNoAuxTc, true, 1.5);
  const ModelConfig grouped_sigmoid =
      RouterConfig(96, 4, 8, 2, ScoringFunc::kSigmoid, TopkMethod::kGroupLimitedGreedy, false, 1.0);
  const ModelConfig normalized_softmax =
      RouterConfig(256, 8, 1, 1, ScoringFunc::kSoftmax, TopkMethod::kGreedy, true, 2.0);
  for (int64_t tokens : {1, 5, 200, 2048}) {
    ExpectGateMatchesCpu(V2LiteRouter(), tokens, false, Logits::kContinuous, rng);
    ExpectGateMatchesCpu(V2GroupRouter(), tokens, false, Logits::kContinuous, rng);
    ExpectGateMatchesCpu(V3Router(), tokens, true, Logits::kContinuous, rng);
    ExpectGateMatchesCpu(small_v3, tokens, true, Logits::kContinuous, rng);
    ExpectGateMatchesCpu(grouped_sigmoid, tokens, false, Logits::kContinuous, rng);
    ExpectGateMatchesCpu(normalized_softmax, tokens, false, Logits::kContinuous, rng);
  }
}

TEST(MoeGateTest, BreaksTiesLikeTopkRouter) {
  COHORT_SKIP_WITHOUT_GPU();
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  Rng rng(seed);
  // Logits from four values: most experts, and many groups, tie exactly.
  for (int64_t tokens : {3, 500}) {
    ExpectGateMatchesCpu(V2LiteRouter(), tokens, false, Logits::kFewValues, rng);
    ExpectGateMatchesCpu(V2GroupRouter(), tokens, false, Logits::kFewValues, rng);
    ExpectGateMatchesCpu(V3Router(), tokens, true, Logits::kFewValues, rng);
  }
}

TEST(MoeGateTest, RejectsParametersOutsideTheContract) {
  COHORT_SKIP_WITHOUT_GPU();
  DeviceBuffer<float> logits(512);
  DeviceBuffer<int32_t> ids(16);
  DeviceBuffer<float> weights(16);
  MoeGateParams p = GateParams(V3Router());
  p.num_experts = 512;
  EXPECT_EQ(LaunchMoeGate(logits.get(), nullptr, 1, p, ids.get(), weights.get(), nullptr), cudaErrorInvalidValue);
  p = GateParams(V3Router());
  p.top_k = 9;
  EXPECT_EQ(LaunchMoeGate(logits.get(), nullptr, 1, p, ids.get(), weights.get(), nullptr), cudaErrorInvalidValue);
  p = GateParams(V3Router());
  p.n_group = 7;  // 256 experts do not split into 7 groups
  EXPECT_EQ(LaunchMoeGate(logits.get(), nullptr, 1, p, ids.get(), weights.get(), nullptr), cudaErrorInvalidValue);
}

// ------------------------------------------------------------------------------------------ align

void ExpectAlignInvariants(const std::vector<int32_t>& ids, int64_t tokens, int top_k, int experts, int tile_rows,
                           Rng& rng) {
  SCOPED_TRACE(::testing::Message() << "tokens " << tokens << " top_k " << top_k << " experts " << experts
                                  << " tile_rows " << tile_rows);
  const int64_t pairs = tokens * top_k;
  RoutingOnDevice d(tokens, top_k, experts);
  ASSERT_CUDA_OK(d.workspace.error());
  ASSERT_CUDA_OK(d.Carve(tokens, top_k, experts, tile_rows));
  ASSERT_CUDA_OK(d.workspace.Poison(0xa5));
  DeviceBuffer<int32_t> d_ids(ids);
  ASSERT_CUDA_OK(d_ids.error());
  const int32_t counter_start = 1 + rng.Below(1000);
  DeviceBuffer<int32_t> counter(std::vector<int32_t>{counter_start});
  ASSERT_CUDA_OK(counter.error());
  ASSERT_CUDA_OK(LaunchMoeAlign(d_ids.get(), d.routing, counter.get(), nullptr));
  ASSERT_CUDA_OK(LaunchMoeAlign(d_ids.get(), d.routing, counter.get(), nullptr));  // adds again
  ASSERT_CUDA_OK(cudaDeviceSynchronize());

  const MoeRouting& r = d.routing;
  const int64_t max_tiles = r.max_tiles();
  const std::vector<int32_t> offsets = ReadDevice(r.expert_offsets, experts + 1);
  const std::vector<int32_t> row_token = ReadDevice(r.row_token, pairs);
  const std::vector<int32_t> slot_row = ReadDevice(r.slot_row, pairs);
  const std::vector<int32_t> tile_expert = ReadDevice(r.tile_expert, max_tiles);
  const std::vector<int32_t> tile_row = ReadDevice(r.tile_row, max_tiles);
  const int32_t num_tiles = ReadDevice(r.num_tiles, 1)[0];
  const int32_t counter_end = ReadDevice(counter.get(), 1)[0];

  // Expected rows per expert, in (token, slot) order.
  std::vector<std::vector<int64_t>> pairs_of(experts);
  for (int64_t i = 0; i < pairs; ++i) {
    if (ids[i] >= 0 && ids[i] < experts) pairs_of[ids[i]].push_back(i);
  }
  int used = 0;
  int64_t want_tiles = 0;
  ASSERT_EQ(offsets[0], 0);
  for (int e = 0; e < experts; ++e) {
    const int64_t count = static_cast<int64_t>(pairs_of[e].size());
    ASSERT_EQ(offsets[e + 1] - offsets[e], count) << "expert " << e;
    used += count > 0;
    want_tiles += (count + tile_rows - 1) / tile_rows;
    for (int64_t i = 0; i < count; ++i) {
      const int64_t pair = pairs_of[e][i];
      const int32_t row = offsets[e] + static_cast<int32_t>(i);
      ASSERT_EQ(slot_row[pair], row) << "pair " << pair << " of expert " << e;
      ASSERT_EQ(row_token[row], pair / top_k) << "row " << row;
    }
  }
  for (int64_t i = 0; i < pairs; ++i) {
    if (ids[i] < 0 || ids[i] >= experts) {
      ASSERT_EQ(slot_row[i], -1) << "pair " << i << " with id " << ids[i];
    }
  }
  EXPECT_EQ(counter_end, counter_start + 2 * used);

  // The tiles cover every used row exactly once, each inside one expert, at multiples of tile_rows.
  ASSERT_EQ(num_tiles, want_tiles);
  ASSERT_LE(num_tiles, max_tiles);
  std::vector<int> covered(offsets[experts], 0);
  for (int32_t t = 0; t < num_tiles; ++t) {
    const int32_t e = tile_expert[t];
    ASSERT_TRUE(e >= 0 && e < experts) << "tile " << t << " expert " << e;
    ASSERT_TRUE(tile_row[t] >= offsets[e] && tile_row[t] < offsets[e + 1]) << "tile " << t;
    ASSERT_EQ((tile_row[t] - offsets[e]) % tile_rows, 0) << "tile " << t;
    for (int32_t row = tile_row[t]; row < std::min(tile_row[t] + tile_rows, offsets[e + 1]); ++row) ++covered[row];
  }
  for (size_t row = 0; row < covered.size(); ++row) ASSERT_EQ(covered[row], 1) << "row " << row;
  for (int64_t t = num_tiles; t < max_tiles; ++t) ASSERT_EQ(tile_expert[t], -1) << "unused tile " << t;
}

TEST(MoeAlignTest, GroupsRowsByExpertInTokenOrder) {
  COHORT_SKIP_WITHOUT_GPU();
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  Rng rng(seed);
  for (int tile_rows : {16, 64, 128}) {
    for (int64_t tokens : {1, 3, 17, 64, 257, 2048, 4096}) {
      ExpectAlignInvariants(RandomTopkIds(rng, tokens, 6, 64), tokens, 6, 64, tile_rows, rng);
      ExpectAlignInvariants(RandomTopkIds(rng, tokens, 8, 256), tokens, 8, 256, tile_rows, rng);
      ExpectAlignInvariants(RandomTopkIds(rng, tokens, 6, 64, /*skewed=*/true), tokens, 6, 64, tile_rows, rng);
    }
  }
}

TEST(MoeAlignTest, GivesIdsOutsideTheExpertsNoRow) {
  COHORT_SKIP_WITHOUT_GPU();
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  Rng rng(seed);
  for (int64_t tokens : {1, 100, 3000}) {
    std::vector<int32_t> ids = RandomTopkIds(rng, tokens, 8, 160);
    for (int32_t& id : ids) id = id < 96 ? id : (rng.Below(2) ? -1 : id + 1000);  // experts 96.. elsewhere
    ExpectAlignInvariants(ids, tokens, 8, 96, 16, rng);
  }
}

// ------------------------------------------------------------------------------------ grouped GEMM

struct ExpertShapes {
  const char* name;
  int experts;
  int top_k;
  int hidden;
  int intermediate;
};

// The routed experts of one shape set, on the host (bf16 bits) and on the device.
struct Experts {
  Experts(const ExpertShapes& s, Rng& rng)
      : gate_up(RandomBf16(rng, int64_t{s.experts} * 2 * s.intermediate * s.hidden, 0.5f)),
        down(RandomBf16(rng, int64_t{s.experts} * s.hidden * s.intermediate, 0.5f)),
        d_gate_up(gate_up),
        d_down(down) {}
  std::vector<uint16_t> gate_up;  // [E, 2I, H]
  std::vector<uint16_t> down;     // [E, H, I]
  DeviceBuffer<uint16_t> d_gate_up;
  DeviceBuffer<uint16_t> d_down;
};

// y[pair] = a[source_row[pair]] . w[ids[pair]]^T for every (token, slot) pair, in pair order. Work
// items are (expert, 64 weight rows), so the weight block stays in cache while the expert's pairs pass.
std::vector<double> ReferenceGemm(const std::vector<float>& a, const std::vector<int64_t>& source_row,
                                  const std::vector<int32_t>& ids, const std::vector<uint16_t>& w, int64_t n,
                                  int64_t k) {
  constexpr int64_t kBlock = 64;
  const int64_t pairs = static_cast<int64_t>(ids.size());
  const int64_t experts = static_cast<int64_t>(w.size()) / (n * k);
  std::vector<std::vector<int64_t>> pairs_of(experts);
  for (int64_t p = 0; p < pairs; ++p) pairs_of[ids[p]].push_back(p);
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  std::vector<double> y(pairs * n);
#pragma omp parallel for schedule(dynamic)
  for (int64_t task = 0; task < experts * blocks; ++task) {
    const int64_t e = task / blocks;
    const int64_t col_end = std::min(n, (task % blocks + 1) * kBlock);
    for (const int64_t p : pairs_of[e]) {
      const float* x = a.data() + source_row[p] * k;
      for (int64_t col = (task % blocks) * kBlock; col < col_end; ++col) {
        y[p * n + col] = DotBf16(x, w.data() + (e * n + col) * k, k);
      }
    }
  }
  return y;
}

// Output rows of the device matrix y [rows, n], reordered to pair order through slot_row.
std::vector<float> RowsInPairOrder(const std::vector<uint16_t>& y, const std::vector<int32_t>& slot_row, int64_t n) {
  std::vector<float> out(slot_row.size() * n);
  for (size_t p = 0; p < slot_row.size(); ++p) {
    for (int64_t col = 0; col < n; ++col) out[p * n + col] = Bf16ToFloat(y[slot_row[p] * n + col]);
  }
  return out;
}

// Both GEMMs of a layer (gate_up from token rows through the gather, down from rows in routing order)
// at every tile size, against one CPU reference.
void ExpectGroupedGemmsMatchCpu(const ExpertShapes& s, const Experts& w, int64_t tokens, Rng& rng) {
  SCOPED_TRACE(::testing::Message() << s.name << " tokens " << tokens);
  const int64_t pairs = tokens * s.top_k;
  const int64_t n1 = 2 * s.intermediate, k1 = s.hidden, n2 = s.hidden, k2 = s.intermediate;
  const std::vector<int32_t> ids = RandomTopkIds(rng, tokens, s.top_k, s.experts);
  const std::vector<uint16_t> hidden = RandomBf16(rng, tokens * k1);
  const std::vector<uint16_t> act = RandomBf16(rng, pairs * k2);  // rows in routing order

  DeviceBuffer<int32_t> d_ids(ids);
  DeviceBuffer<uint16_t> d_hidden(hidden), d_act(act), d_y1(pairs * n1), d_y2(pairs * n2);
  RoutingOnDevice d(tokens, s.top_k, s.experts);
  ASSERT_CUDA_OK(d_ids.error());
  ASSERT_CUDA_OK(d_hidden.error());
  ASSERT_CUDA_OK(d_act.error());
  ASSERT_CUDA_OK(d_y1.error());
  ASSERT_CUDA_OK(d_y2.error());
  ASSERT_CUDA_OK(d.workspace.error());

  std::vector<double> want1, want2;
  std::vector<int32_t> slot_row;
  for (int tile_rows : {16, 64, 128}) {
    SCOPED_TRACE(::testing::Message() << "tile_rows " << tile_rows);
    ASSERT_CUDA_OK(d.Carve(tokens, s.top_k, s.experts, tile_rows));
    ASSERT_CUDA_OK(LaunchMoeAlign(d_ids.get(), d.routing, nullptr, nullptr));
    ASSERT_CUDA_OK(d_y1.Poison());
    ASSERT_CUDA_OK(d_y2.Poison());
    ASSERT_CUDA_OK(LaunchMoeGroupedGemm({Bf16(d_hidden), true, Bf16(w.d_gate_up), n1, k1, Bf16(d_y1)}, d.routing,
                                        nullptr));
    ASSERT_CUDA_OK(LaunchMoeGroupedGemm({Bf16(d_act), false, Bf16(w.d_down), n2, k2, Bf16(d_y2)}, d.routing, nullptr));
    ASSERT_CUDA_OK(cudaDeviceSynchronize());
    if (want1.empty()) {  // the row order does not depend on the tile size; checked by the align test
      slot_row = ReadDevice(d.routing.slot_row, pairs);
      std::vector<int64_t> token_of(pairs), row_of(pairs);
      for (int64_t p = 0; p < pairs; ++p) {
        token_of[p] = p / s.top_k;
        row_of[p] = slot_row[p];
        ASSERT_TRUE(slot_row[p] >= 0 && slot_row[p] < pairs) << "pair " << p;
      }
      want1 = ReferenceGemm(ToFloat(hidden), token_of, ids, w.gate_up, n1, k1);
      want2 = ReferenceGemm(ToFloat(act), row_of, ids, w.down, n2, k2);
    }
    std::vector<uint16_t> y1, y2;
    ASSERT_CUDA_OK(d_y1.Read(&y1));
    ASSERT_CUDA_OK(d_y2.Read(&y2));
    ExpectClose(RowsInPairOrder(y1, slot_row, n1), want1, "gate_up (gathered rows)");
    ExpectClose(RowsInPairOrder(y2, slot_row, n2), want2, "down (rows in routing order)");
  }
}

TEST(MoeGroupedGemmTest, MatchesCpuOnV2LiteShapes) {
  COHORT_SKIP_WITHOUT_GPU();
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  Rng rng(seed);
  const ExpertShapes shapes{"V2-Lite", 64, 6, 2048, 1408};
  const Experts experts(shapes, rng);
  ASSERT_CUDA_OK(experts.d_gate_up.error());
  ASSERT_CUDA_OK(experts.d_down.error());
  for (int64_t tokens : {1, 3, 17, 64, 257, 2048}) ExpectGroupedGemmsMatchCpu(shapes, experts, tokens, rng);
}

TEST(MoeGroupedGemmTest, MatchesCpuOnV3Shapes) {
  COHORT_SKIP_WITHOUT_GPU();
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  Rng rng(seed);
  const ExpertShapes shapes{"V3 (16 of the 256 experts)", 16, 8, 7168, 2048};
  const Experts experts(shapes, rng);
  ASSERT_CUDA_OK(experts.d_gate_up.error());
  ASSERT_CUDA_OK(experts.d_down.error());
  for (int64_t tokens : {1, 3, 17, 64, 257, 2048}) ExpectGroupedGemmsMatchCpu(shapes, experts, tokens, rng);
}

TEST(MoeGroupedGemmTest, MatchesCpuOnSizesThatAreOnlyMultiplesOfEight) {
  COHORT_SKIP_WITHOUT_GPU();
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  Rng rng(seed);
  // gate_up 208 x 136, down 136 x 104: no size is a whole number of 64-column blocks or of k-steps.
  const ExpertShapes shapes{"odd sizes", 5, 2, 136, 104};
  const Experts experts(shapes, rng);
  ASSERT_CUDA_OK(experts.d_gate_up.error());
  ASSERT_CUDA_OK(experts.d_down.error());
  for (int64_t tokens : {1, 37, 300}) ExpectGroupedGemmsMatchCpu(shapes, experts, tokens, rng);
}

TEST(MoeGroupedGemmTest, RejectsSizesThatAreNotMultiplesOfEight) {
  COHORT_SKIP_WITHOUT_GPU();
  RoutingOnDevice d(4, 2, 8);
  ASSERT_CUDA_OK(d.workspace.error());
  ASSERT_CUDA_OK(d.Carve(4, 2, 8, 16));
  DeviceBuffer<uint16_t> a(4 * 104), w(8 * 64 * 104), y(8 * 64);
  EXPECT_EQ(LaunchMoeGroupedGemm({Bf16(a), true, Bf16(w), 64, 100, Bf16(y)}, d.routing, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(LaunchMoeGroupedGemm({Bf16(a), true, Bf16(w), 60, 104, Bf16(y)}, d.routing, nullptr), cudaErrorInvalidValue);
  MoeRouting odd_tiles = d.routing;
  odd_tiles.tile_rows = 32;
  EXPECT_EQ(LaunchMoeGroupedGemm({Bf16(a), true, Bf16(w), 64, 104, Bf16(y)}, odd_tiles, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(d.Carve(4, 2, 8, 32), cudaErrorInvalidValue);
}

// ------------------------------------------------------------------------------ silu-mul, combine

double Silu(double x) { return x / (1.0 + std::exp(-x)); }

TEST(MoeSiluMulTest, MatchesCpuForTheRowsInUse) {
  COHORT_SKIP_WITHOUT_GPU();
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  Rng rng(seed);
  struct Case {
    int64_t rows;
    int64_t inter;
    int in_use;  // -1: no device count
  };
  for (const Case& c : {Case{777, 1408, 500}, Case{64, 2048, -1}, Case{3, 8, 3}, Case{10, 24, 0}}) {
    const int64_t rows = c.rows, inter = c.inter;
    const int in_use = c.in_use;
    SCOPED_TRACE(::testing::Message() << rows << " rows of " << inter << ", in use " << in_use);
    const std::vector<uint16_t> gate_up = RandomBf16(rng, rows * 2 * inter, 4.0f);
    DeviceBuffer<uint16_t> d_in(gate_up), d_out(rows * inter);
    DeviceBuffer<int32_t> d_count(std::vector<int32_t>{in_use});
    ASSERT_CUDA_OK(d_in.error());
    ASSERT_CUDA_OK(d_count.error());
    ASSERT_CUDA_OK(d_out.Poison());
    ASSERT_CUDA_OK(LaunchMoeSiluMul(Bf16(d_in), rows, inter, in_use >= 0 ? d_count.get() : nullptr, Bf16(d_out), nullptr));
    std::vector<uint16_t> out;
    ASSERT_CUDA_OK(d_out.Read(&out));
    const int64_t used = in_use >= 0 ? in_use : rows;
    std::vector<float> got;
    std::vector<double> want;
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t i = 0; i < inter; ++i) {
        const uint16_t v = out[r * inter + i];
        if (r >= used) {
          ASSERT_EQ(v, 0xffff) << "row " << r << " past the count was written";
          continue;
        }
        got.push_back(Bf16ToFloat(v));
        want.push_back(Silu(Bf16ToFloat(gate_up[r * 2 * inter + i])) * Bf16ToFloat(gate_up[r * 2 * inter + inter + i]));
      }
    }
    ExpectClose(got, want, "silu(gate) * up");
  }
}

TEST(MoeCombineTest, SumsWeightedExpertRowsPlusTheSharedOutput) {
  COHORT_SKIP_WITHOUT_GPU();
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  Rng rng(seed);
  const int64_t tokens = 300, hidden = 2048;
  const int top_k = 6, experts = 64;
  std::vector<int32_t> ids = RandomTopkIds(rng, tokens, top_k, experts);
  for (int i = 0; i < 50; ++i) ids[rng.Below(static_cast<int>(ids.size()))] = -1;  // some slots on other ranks
  std::vector<float> weights(tokens * top_k);
  for (float& w : weights) w = rng.Uniform(0.0f, 1.0f);
  const std::vector<uint16_t> expert_out = RandomBf16(rng, tokens * top_k * hidden, 3.0f);
  const std::vector<uint16_t> add = RandomBf16(rng, tokens * hidden, 3.0f);

  RoutingOnDevice d(tokens, top_k, experts);
  DeviceBuffer<int32_t> d_ids(ids);
  DeviceBuffer<float> d_weights(weights);
  DeviceBuffer<uint16_t> d_expert_out(expert_out), d_add(add), d_out(tokens * hidden);
  ASSERT_CUDA_OK(d.workspace.error());
  ASSERT_CUDA_OK(d.Carve(tokens, top_k, experts, 16));
  ASSERT_CUDA_OK(LaunchMoeAlign(d_ids.get(), d.routing, nullptr, nullptr));
  const std::vector<int32_t> slot_row = ReadDevice(d.routing.slot_row, tokens * top_k);

  for (bool with_add : {true, false}) {
    SCOPED_TRACE(with_add ? "with add" : "without add");
    ASSERT_CUDA_OK(d_out.Poison());
    ASSERT_CUDA_OK(LaunchMoeCombine(Bf16(d_expert_out), d_weights.get(), d.routing, with_add ? Bf16(d_add) : nullptr,
                                    hidden, Bf16(d_out), nullptr));
    std::vector<uint16_t> out;
    ASSERT_CUDA_OK(d_out.Read(&out));
    std::vector<double> want(tokens * hidden);
    for (int64_t t = 0; t < tokens; ++t) {
      for (int64_t h = 0; h < hidden; ++h) {
        double sum = with_add ? Bf16ToFloat(add[t * hidden + h]) : 0.0;
        for (int j = 0; j < top_k; ++j) {
          const int32_t row = slot_row[t * top_k + j];
          if (ids[t * top_k + j] < 0) continue;
          sum += static_cast<double>(weights[t * top_k + j]) * Bf16ToFloat(expert_out[row * hidden + h]);
        }
        want[t * hidden + h] = sum;
      }
    }
    ExpectClose(ToFloat(out), want, "combine");
  }

  // In place: out aliases add.
  DeviceBuffer<uint16_t> d_inout(add);
  ASSERT_CUDA_OK(LaunchMoeCombine(Bf16(d_expert_out), d_weights.get(), d.routing, Bf16(d_inout), hidden,
                                  Bf16(d_inout), nullptr));
  std::vector<uint16_t> in_place, out_of_place;
  ASSERT_CUDA_OK(d_inout.Read(&in_place));
  ASSERT_CUDA_OK(LaunchMoeCombine(Bf16(d_expert_out), d_weights.get(), d.routing, Bf16(d_add), hidden, Bf16(d_out),
                                  nullptr));
  ASSERT_CUDA_OK(d_out.Read(&out_of_place));
  EXPECT_EQ(in_place, out_of_place);
}

// ------------------------------------------------------------------------------------ whole layer

struct LayerCase {
  const char* name;
  ModelConfig router;
  int hidden;
  int intermediate;
  bool bias;
};

// The routed experts of one MoE layer on the CPU: TopkRouter, then per chosen expert gate_up, SiLU
// and down in double, rounded to bf16 where the GPU stores bf16 (gate_up, act, the expert output y2),
// then the weighted sum plus the shared output, in double.
//
// Rounding at the same points does not make the two pipelines agree to the output's own precision:
// the GPU rounds an fp32 tensor-core sum and the CPU a double sum, and where the two straddle a
// rounding midpoint they land one bf16 ulp apart. Flips of y2 are what show: |y2| is some 400 for
// V2-Lite (ulp 2 to 4), the weights ~0.1, so a flip moves out[t, n] by ~0.3, which is several ulps of
// an output that the six weighted terms and the shared output partly cancel. `allowance` is therefore
// one ulp of each weighted term, sum_j |w_j| ulp(y2_j); flips of gate_up and act move y2 by far less
// than its ulp and fit in ExpectClose's own terms. A wrong expert, weight or row is off by a
// whole term, hundreds of these ulps.
struct LayerReference {
  std::vector<double> out;        // [T, H]
  std::vector<double> allowance;  // [T, H]
};
LayerReference ReferenceLayer(const LayerCase& c, const Experts& w, const std::vector<float>& logits,
                              const std::vector<float>& bias, const std::vector<uint16_t>& x,
                              const std::vector<uint16_t>& add, int64_t tokens) {
  const int experts = static_cast<int>(c.router.n_routed_experts);
  const int top_k = static_cast<int>(c.router.num_experts_per_tok);
  const int64_t h = c.hidden, inter = c.intermediate;
  const TopkRouter router(c.router);
  LayerReference ref{std::vector<double>(tokens * h), std::vector<double>(tokens * h, 0.0)};
#pragma omp parallel for schedule(dynamic)
  for (int64_t t = 0; t < tokens; ++t) {
    std::vector<int32_t> ids(top_k);
    std::vector<float> weights(top_k);
    router.Select(std::span<const float>(logits.data() + t * experts, experts), bias, ids, weights);
    const std::vector<float> xt = ToFloat(std::span<const uint16_t>(x.data() + t * h, h));
    std::vector<float> gate_up(2 * inter), act(inter);
    double* out = ref.out.data() + t * h;
    double* allowance = ref.allowance.data() + t * h;
    for (int64_t i = 0; i < h; ++i) out[i] = Bf16ToFloat(add[t * h + i]);
    for (int j = 0; j < top_k; ++j) {
      const uint16_t* wgu = w.gate_up.data() + static_cast<int64_t>(ids[j]) * 2 * inter * h;
      const uint16_t* wd = w.down.data() + static_cast<int64_t>(ids[j]) * h * inter;
      for (int64_t n = 0; n < 2 * inter; ++n) gate_up[n] = RoundBf16(DotBf16(xt.data(), wgu + n * h, h));
      for (int64_t i = 0; i < inter; ++i) act[i] = RoundBf16(Silu(gate_up[i]) * gate_up[inter + i]);
      for (int64_t n = 0; n < h; ++n) {
        const float y2 = RoundBf16(DotBf16(act.data(), wd + n * inter, inter));
        out[n] += static_cast<double>(weights[j]) * y2;
        allowance[n] += std::abs(static_cast<double>(weights[j])) * UlpBf16(y2);
      }
    }
  }
  return ref;
}

void ExpectLayerMatchesCpu(const LayerCase& c, const Experts& w, int64_t tokens, Rng& rng) {
  SCOPED_TRACE(::testing::Message() << c.name << " tokens " << tokens);
  const int experts = static_cast<int>(c.router.n_routed_experts);
  const int top_k = static_cast<int>(c.router.num_experts_per_tok);
  const int64_t h = c.hidden, inter = c.intermediate, pairs = tokens * top_k;
  std::vector<float> logits, bias;
  ASSERT_NO_FATAL_FAILURE(DrawRouterInputs(rng, c.router, tokens, c.bias, Logits::kContinuous, &logits, &bias));
  const std::vector<uint16_t> x = RandomBf16(rng, tokens * h);
  const std::vector<uint16_t> add = RandomBf16(rng, tokens * h);

  DeviceBuffer<float> d_logits(logits);
  DeviceBuffer<float> d_bias(c.bias ? bias : std::vector<float>{0.0f});
  DeviceBuffer<uint16_t> d_x(x), d_add(add), d_y1(pairs * 2 * inter), d_act(pairs * inter), d_y2(pairs * h),
      d_out(tokens * h);
  DeviceBuffer<int32_t> d_ids(pairs), d_used(std::vector<int32_t>{0});
  DeviceBuffer<float> d_weights(pairs);
  RoutingOnDevice d(tokens, top_k, experts);
  for (cudaError_t e : {w.d_gate_up.error(), w.d_down.error(), d_logits.error(), d_bias.error(), d_x.error(),
                        d_add.error(), d_y1.error(), d_act.error(), d_y2.error(), d_out.error(), d_ids.error(),
                        d_used.error(), d_weights.error(), d.workspace.error()}) {
    ASSERT_CUDA_OK(e);
  }
  ASSERT_CUDA_OK(d.Carve(tokens, top_k, experts, MoeDefaultTileRows(pairs, experts)));
  for (const auto* b : {&d_y1, &d_act, &d_y2, &d_out}) ASSERT_CUDA_OK(b->Poison());

  cudaStream_t stream;  // a blocking stream: ordered after the poisoning memsets
  ASSERT_CUDA_OK(cudaStreamCreate(&stream));
  auto layer = [&]() -> cudaError_t {
    cudaError_t e;
    if ((e = LaunchMoeGate(d_logits.get(), c.bias ? d_bias.get() : nullptr, tokens, GateParams(c.router),
                           d_ids.get(), d_weights.get(), stream)) != cudaSuccess) return e;
    if ((e = LaunchMoeAlign(d_ids.get(), d.routing, d_used.get(), stream)) != cudaSuccess) return e;
    if ((e = LaunchMoeGroupedGemm({Bf16(d_x), true, Bf16(w.d_gate_up), 2 * inter, h, Bf16(d_y1)}, d.routing,
                                  stream)) != cudaSuccess) return e;
    if ((e = LaunchMoeSiluMul(Bf16(d_y1), pairs, inter, d.routing.expert_offsets + experts, Bf16(d_act), stream)) !=
        cudaSuccess) return e;
    if ((e = LaunchMoeGroupedGemm({Bf16(d_act), false, Bf16(w.d_down), h, inter, Bf16(d_y2)}, d.routing, stream)) !=
        cudaSuccess) return e;
    return LaunchMoeCombine(Bf16(d_y2), d_weights.get(), d.routing, Bf16(d_add), h, Bf16(d_out), stream);
  };
  ASSERT_CUDA_OK(layer());
  ASSERT_CUDA_OK(cudaStreamSynchronize(stream));
  std::vector<uint16_t> eager;
  ASSERT_CUDA_OK(d_out.Read(&eager));
  const int32_t used = ReadDevice(d_used.get(), 1)[0];

  const LayerReference want = ReferenceLayer(c, w, logits, bias, x, add, tokens);
  ExpectClose(ToFloat(eager), want.out, "layer output", want.allowance);
  const std::vector<int32_t> ids = ReadDevice(d_ids.get(), pairs);
  std::vector<bool> hit(experts, false);
  for (int32_t id : ids) {
    ASSERT_TRUE(id >= 0 && id < experts) << "expert id " << id;
    hit[id] = true;
  }
  EXPECT_EQ(used, std::count(hit.begin(), hit.end(), true));

  // The same layer captured in a graph and replayed twice gives the same bits.
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  ASSERT_CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  const cudaError_t captured = layer();
  ASSERT_CUDA_OK(cudaStreamEndCapture(stream, &graph));
  ASSERT_CUDA_OK(captured);
  ASSERT_CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
  for (int replay = 0; replay < 2; ++replay) {
    ASSERT_CUDA_OK(d_out.Poison());
    ASSERT_CUDA_OK(cudaGraphLaunch(exec, stream));
    ASSERT_CUDA_OK(cudaStreamSynchronize(stream));
    std::vector<uint16_t> replayed;
    ASSERT_CUDA_OK(d_out.Read(&replayed));
    EXPECT_EQ(replayed, eager) << "replay " << replay;
  }
  EXPECT_EQ(ReadDevice(d_used.get(), 1)[0], 3 * used);
  ASSERT_CUDA_OK(cudaGraphExecDestroy(exec));
  ASSERT_CUDA_OK(cudaGraphDestroy(graph));
  ASSERT_CUDA_OK(cudaStreamDestroy(stream));
}

TEST(MoeLayerTest, MatchesCpuLoopEagerAndInAGraph) {
  COHORT_SKIP_WITHOUT_GPU();
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  Rng rng(seed);
  const LayerCase v2_lite{"V2-Lite", V2LiteRouter(), 2048, 1408, false};
  const LayerCase v3_small{"V3 routing, small experts",
                           RouterConfig(64, 8, 8, 4, ScoringFunc::kSigmoid, TopkMethod::kNoAuxTc, true, 2.5), 1024,
                           256, true};
  for (const LayerCase* c : {&v2_lite, &v3_small}) {
    const Experts w(ExpertShapes{c->name, static_cast<int>(c->router.n_routed_experts),
                                 static_cast<int>(c->router.num_experts_per_tok), c->hidden, c->intermediate},
                    rng);
    for (int64_t tokens : {int64_t{1}, int64_t{37}, int64_t{300}, int64_t{1500}}) {
      ExpectLayerMatchesCpu(*c, w, tokens, rng);
    }
  }
}

}  // namespace
}  // namespace cohort
