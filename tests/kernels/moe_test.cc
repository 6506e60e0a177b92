// The MoE kernels (kernels/moe.h) against CPU references: the gate against TopkRouter, the align's
// invariants, the fused route against gate then align (and from a router folded into the attention's
// projections against the same logits formed on the host, with the folded weights against the CPU),
// the grouped GEMM against a double-precision
// product (plain, and with its fused SiLU-and-mul epilogue), SiLU-and-mul, the combine (alone and
// folded into the next RMSNorm), and a whole layer (route -> gate_up with SiLU-and-mul -> down ->
// combine, routed and shared experts in the same grouped products; and with the separate SiLU-and-mul
// kernel) against a CPU loop that runs the shared experts as one dense MLP, eager
// and replayed from a CUDA graph. Inputs are fresh random values each run (the seed is printed on a
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
#include <span>
#include <vector>

#include "kernels/elementwise.h"
#include "tests/testing/gpu.h"
#include "worker/model/config.h"
#include "worker/model/cuda/moe_gate.h"
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

using testing::FreshSeed;  // each test traces its seed

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

double Silu(double x) { return x / (1.0 + std::exp(-x)); }

// The spacing of bf16 values (8 significant bits) at v; 0 at 0.
double UlpBf16(float v) { return v == 0.0f ? 0.0 : std::ldexp(1.0, std::ilogb(v) - 7); }

// Uniform in [-scale, scale), rounded to bf16; drawn in parallel chunks (expert weights are ~1e9 values).
void FillRandomBf16(Rng& rng, std::span<uint16_t> out, float scale = 1.0f) {
  constexpr int64_t kChunk = int64_t{1} << 16;
  const int64_t count = static_cast<int64_t>(out.size());
  const uint64_t seed = rng.Next();
#pragma omp parallel for schedule(static)
  for (int64_t chunk = 0; chunk < (count + kChunk - 1) / kChunk; ++chunk) {
    Rng local(seed ^ (static_cast<uint64_t>(chunk) * 0xd1b54a32d192ed03ull));
    const int64_t end = std::min(count, (chunk + 1) * kChunk);
    for (int64_t i = chunk * kChunk; i < end; ++i) out[i] = FloatToBf16(local.Uniform(-scale, scale));
  }
}

std::vector<uint16_t> RandomBf16(Rng& rng, int64_t count, float scale = 1.0f) {
  std::vector<uint16_t> out(count);
  FillRandomBf16(rng, out, scale);
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
  RoutingOnDevice(int64_t tokens, int top_k, int experts, int shared)
      : workspace(MoeRoutingWorkspaceBytes(tokens, top_k, experts, shared)),
        bytes(MoeRoutingWorkspaceBytes(tokens, top_k, experts, shared)) {}
  cudaError_t Carve(int64_t tokens, int top_k, int experts, int shared, int tile_rows) {
    return CarveMoeRouting(workspace.get(), bytes, tokens, top_k, experts, shared, tile_rows, &routing);
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
  ASSERT_CUDA_OK(LaunchMoeGate(d_logits.get(), with_bias ? d_bias.get() : nullptr, tokens, cuda::MoeGateParamsFor(c),
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
  MoeGateParams p = cuda::MoeGateParamsFor(V3Router());
  p.num_experts = 512;
  EXPECT_EQ(LaunchMoeGate(logits.get(), nullptr, 1, p, ids.get(), weights.get(), nullptr), cudaErrorInvalidValue);
  p = cuda::MoeGateParamsFor(V3Router());
  p.top_k = 9;
  EXPECT_EQ(LaunchMoeGate(logits.get(), nullptr, 1, p, ids.get(), weights.get(), nullptr), cudaErrorInvalidValue);
  p = cuda::MoeGateParamsFor(V3Router());
  p.n_group = 7;  // 256 experts do not split into 7 groups
  EXPECT_EQ(LaunchMoeGate(logits.get(), nullptr, 1, p, ids.get(), weights.get(), nullptr), cudaErrorInvalidValue);
}

// ------------------------------------------------------------------------------------------ align

// Routed rows grouped by expert in (token, slot) order, then `shared` experts of one row per token in
// token order; tiles over all of them; the rows past those in use untouched.
// With first_expert, ids [first_expert, first_expert + experts) are this GPU's experts 0.. (expert
// parallelism) and the others get no row.
void ExpectAlignInvariants(const std::vector<int32_t>& ids, int64_t tokens, int top_k, int experts, int shared,
                           int tile_rows, Rng& rng, int first_expert = 0) {
  SCOPED_TRACE(::testing::Message() << "tokens " << tokens << " top_k " << top_k << " experts " << experts
                                  << " shared " << shared << " tile_rows " << tile_rows << " first expert "
                                  << first_expert);
  const int64_t pairs = tokens * top_k, rows = tokens * (top_k + shared);
  const int all_experts = experts + shared;
  RoutingOnDevice d(tokens, top_k, experts, shared);
  ASSERT_CUDA_OK(d.workspace.error());
  ASSERT_CUDA_OK(d.Carve(tokens, top_k, experts, shared, tile_rows));
  d.routing.first_expert = first_expert;
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
  ASSERT_EQ(r.num_rows(), rows);
  ASSERT_EQ(r.num_pairs(), pairs);
  const int64_t max_tiles = r.max_tiles();
  const std::vector<int32_t> offsets = ReadDevice(r.expert_offsets, all_experts + 1);
  const std::vector<int32_t> row_token = ReadDevice(r.row_token, rows);
  const std::vector<int32_t> slot_row = ReadDevice(r.slot_row, pairs);
  const std::vector<int32_t> tile_expert = ReadDevice(r.tile_expert, max_tiles);
  const std::vector<int32_t> tile_row = ReadDevice(r.tile_row, max_tiles);
  const int32_t num_tiles = ReadDevice(r.num_tiles, 1)[0];
  const int32_t counter_end = ReadDevice(counter.get(), 1)[0];

  // Expected rows per routed expert, in (token, slot) order.
  std::vector<std::vector<int64_t>> pairs_of(experts);
  auto local = [&](int64_t pair) { return ids[pair] - first_expert; };  // outside [0, experts): no row
  for (int64_t i = 0; i < pairs; ++i) {
    if (local(i) >= 0 && local(i) < experts) pairs_of[local(i)].push_back(i);
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
    if (local(i) < 0 || local(i) >= experts) {
      ASSERT_EQ(slot_row[i], -1) << "pair " << i << " with id " << ids[i];
    }
  }
  // Shared expert s: token t at offsets[E] + s*T + t.
  for (int s = 0; s < shared; ++s) {
    ASSERT_EQ(offsets[experts + s], offsets[experts] + s * tokens) << "shared expert " << s;
    ASSERT_EQ(offsets[experts + s + 1] - offsets[experts + s], tokens) << "shared expert " << s;
    want_tiles += (tokens + tile_rows - 1) / tile_rows;
    for (int64_t t = 0; t < tokens; ++t) {
      ASSERT_EQ(row_token[offsets[experts + s] + t], t) << "shared expert " << s << " token " << t;
    }
  }
  const int32_t in_use = offsets[all_experts];
  for (int64_t row = in_use; row < rows; ++row) {
    ASSERT_EQ(row_token[row], static_cast<int32_t>(0xa5a5a5a5)) << "row " << row << " past those in use";
  }
  EXPECT_EQ(counter_end, counter_start + 2 * used) << "routed experts used, counted twice";

  // The tiles cover every used row exactly once, each inside one expert, at multiples of tile_rows.
  ASSERT_EQ(num_tiles, want_tiles);
  ASSERT_LE(num_tiles, max_tiles);
  std::vector<int> covered(in_use, 0);
  for (int32_t t = 0; t < num_tiles; ++t) {
    const int32_t e = tile_expert[t];
    ASSERT_TRUE(e >= 0 && e < all_experts) << "tile " << t << " expert " << e;
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
  for (int shared : {0, 1, 2}) {
    for (int tile_rows : {16, 64, 128}) {
      for (int64_t tokens : {1, 3, 17, 64, 257, 342, 2048, 4096, 16384}) {
        ExpectAlignInvariants(RandomTopkIds(rng, tokens, 6, 64), tokens, 6, 64, shared, tile_rows, rng);
        // DeepSeek-V3 with its shared expert: 257 experts in the align.
        ExpectAlignInvariants(RandomTopkIds(rng, tokens, 8, 256), tokens, 8, 256, shared, tile_rows, rng);
        ExpectAlignInvariants(RandomTopkIds(rng, tokens, 6, 64, /*skewed=*/true), tokens, 6, 64, shared, tile_rows,
                              rng);
      }
    }
  }
  // The most of every limit: 256 routed experts, top-8, 8 shared experts.
  for (int64_t tokens : {1, 300}) {
    ExpectAlignInvariants(RandomTopkIds(rng, tokens, kMoeMaxTopK, kMoeMaxExperts), tokens, kMoeMaxTopK,
                          kMoeMaxExperts, kMoeMaxShared, 16, rng);
  }
}

TEST(MoeAlignTest, GivesIdsOutsideTheExpertsNoRow) {
  COHORT_SKIP_WITHOUT_GPU();
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  Rng rng(seed);
  for (int shared : {0, 1, 2}) {
    for (int64_t tokens : {1, 100, 3000}) {
      std::vector<int32_t> ids = RandomTopkIds(rng, tokens, 8, 160);
      for (int32_t& id : ids) id = id < 96 ? id : (rng.Below(2) ? -1 : id + 1000);  // experts 96.. elsewhere
      ExpectAlignInvariants(ids, tokens, 8, 96, shared, 16, rng);
    }
  }
}

// Expert parallelism: each of the GPUs that split 160 experts (unevenly, as 3 GPUs do) takes the
// rows of its own ids only, numbered from its first expert.
TEST(MoeAlignTest, TakesOnlyTheExpertsFromFirstExpertOn) {
  COHORT_SKIP_WITHOUT_GPU();
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  Rng rng(seed);
  for (int64_t tokens : {1, 2, 100, 3000}) {
    std::vector<int32_t> ids = RandomTopkIds(rng, tokens, 8, 160);
    ids[0] = -1;  // a padding row's slot
    for (const auto& [first, count] : std::vector<std::pair<int, int>>{{0, 53}, {53, 53}, {106, 54}}) {
      ExpectAlignInvariants(ids, tokens, 8, count, first == 0 ? 1 : 0, 16, rng, first);
    }
  }
}

// ------------------------------------------------------------------------------------------ route

// LaunchMoeRoute (one fused launch up to kMoeFusedRouteTokens tokens, gate + align above) writes
// exactly what LaunchMoeGate then LaunchMoeAlign write; with num_valid, the padding tokens past it get
// ids -1 and weights 0 and the align treats them as such. With `shard` = {first, count}, the routing
// takes the gate's experts [first, first + count) only (expert parallelism). With `group_valid`, the
// tokens are that many equal groups (GPUs' rows gathered), each with its own count of valid tokens,
// and `valid` is not used.
void ExpectRouteEqualsGateThenAlign(const ModelConfig& c, int64_t tokens, int shared, int64_t valid, Rng& rng,
                                    std::pair<int, int> shard = {0, 0}, std::vector<int32_t> group_valid = {}) {
  SCOPED_TRACE(::testing::Message() << "experts " << c.n_routed_experts << " tokens " << tokens << " shared "
                                  << shared << " valid " << valid << " shard " << shard.first << "+"
                                  << shard.second << " groups " << group_valid.size());
  const int64_t group_rows = group_valid.empty() ? 0 : tokens / static_cast<int64_t>(group_valid.size());
  auto padding = [&](int64_t token) {
    return group_rows > 0 ? token % group_rows >= group_valid[token / group_rows] : token >= valid;
  };
  const int experts = shard.second > 0 ? shard.second : static_cast<int>(c.n_routed_experts);
  const int top_k = static_cast<int>(c.num_experts_per_tok);
  const bool with_bias = c.topk_method == TopkMethod::kNoAuxTc;
  const int tile_rows = MoeDefaultTileRows(tokens, top_k, experts, shared);
  std::vector<float> logits, bias;
  ASSERT_NO_FATAL_FAILURE(DrawRouterInputs(rng, c, tokens, with_bias, Logits::kContinuous, &logits, &bias));
  DeviceBuffer<float> d_logits(logits), d_bias(with_bias ? bias : std::vector<float>{0.0f});
  const float* bias_ptr = with_bias ? d_bias.get() : nullptr;
  const MoeGateParams gate = cuda::MoeGateParamsFor(c);

  // Reference: the two launches, the padding tokens' choice overwritten on the host in between.
  RoutingOnDevice want(tokens, top_k, experts, shared);
  DeviceBuffer<int32_t> want_ids(tokens * top_k), want_used(std::vector<int32_t>{7});
  DeviceBuffer<float> want_weights(tokens * top_k);
  ASSERT_CUDA_OK(want.Carve(tokens, top_k, experts, shared, tile_rows));
  want.routing.first_expert = shard.first;
  ASSERT_CUDA_OK(want.workspace.Poison(0xa5));
  ASSERT_CUDA_OK(LaunchMoeGate(d_logits.get(), bias_ptr, tokens, gate, want_ids.get(), want_weights.get(), nullptr));
  std::vector<int32_t> ids;
  std::vector<float> weights;
  ASSERT_CUDA_OK(want_ids.Read(&ids));
  ASSERT_CUDA_OK(want_weights.Read(&weights));
  for (int64_t i = 0; i < tokens * top_k; ++i) {
    if (padding(i / top_k)) ids[i] = -1, weights[i] = 0.0f;
  }
  DeviceBuffer<int32_t> padded_ids(ids);
  ASSERT_CUDA_OK(LaunchMoeAlign(padded_ids.get(), want.routing, want_used.get(), nullptr));

  RoutingOnDevice got(tokens, top_k, experts, shared);
  const std::vector<int32_t> counts = group_rows > 0 ? group_valid : std::vector<int32_t>{static_cast<int32_t>(valid)};
  DeviceBuffer<int32_t> got_ids(tokens * top_k), got_used(std::vector<int32_t>{7}), d_valid(counts);
  DeviceBuffer<float> got_weights(tokens * top_k);
  ASSERT_CUDA_OK(got.Carve(tokens, top_k, experts, shared, tile_rows));
  got.routing.first_expert = shard.first;
  ASSERT_CUDA_OK(got.workspace.Poison(0xa5));
  ASSERT_CUDA_OK(got_ids.Poison());
  ASSERT_CUDA_OK(got_weights.Poison());
  ASSERT_CUDA_OK(LaunchMoeRoute(d_logits.get(), bias_ptr, gate, group_rows > 0 || valid < tokens ? d_valid.get() : nullptr,
                                got_ids.get(), got_weights.get(), got.routing, got_used.get(), nullptr, group_rows));
  ASSERT_CUDA_OK(cudaDeviceSynchronize());

  std::vector<int32_t> route_ids;
  std::vector<float> route_weights;
  ASSERT_CUDA_OK(got_ids.Read(&route_ids));
  ASSERT_CUDA_OK(got_weights.Read(&route_weights));
  EXPECT_EQ(route_ids, ids);
  EXPECT_EQ(route_weights, weights);
  EXPECT_EQ(ReadDevice(got_used.get(), 1), ReadDevice(want_used.get(), 1)) << "routed experts used";
  // Every routing buffer, byte for byte (the unused parts keep the same poison on both sides).
  std::vector<uint8_t> got_bytes, want_bytes;
  ASSERT_CUDA_OK(got.workspace.Read(&got_bytes));
  ASSERT_CUDA_OK(want.workspace.Read(&want_bytes));
  EXPECT_TRUE(got_bytes == want_bytes) << "the routing buffers differ";
}

TEST(MoeRouteTest, EqualsGateThenAlignWithAndWithoutPadding) {
  COHORT_SKIP_WITHOUT_GPU();
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  Rng rng(seed);
  // Both sides of kMoeWarpRouteTokens and kMoeFusedRouteTokens (three kernels), with padding tokens
  // from num_valid on, and V2-Lite / V3 routers.
  for (int64_t tokens : {int64_t{1}, int64_t{2}, kMoeWarpRouteTokens, kMoeWarpRouteTokens + 1, kMoeFusedRouteTokens,
                         kMoeFusedRouteTokens + 1, int64_t{200}}) {
    for (int64_t valid : {tokens, std::max<int64_t>(1, tokens - 3), int64_t{0}}) {
      ExpectRouteEqualsGateThenAlign(V2LiteRouter(), tokens, 2, valid, rng);
      ExpectRouteEqualsGateThenAlign(V3Router(), tokens, 1, valid, rng);
      ExpectRouteEqualsGateThenAlign(V2GroupRouter(), tokens, 0, valid, rng);
      // The second of two GPUs that split V2-Lite's experts, and the third of four for V3.
      ExpectRouteEqualsGateThenAlign(V2LiteRouter(), tokens, 1, valid, rng, {32, 32});
      ExpectRouteEqualsGateThenAlign(V3Router(), tokens, 0, valid, rng, {128, 64});
    }
  }
  // Two and four GPUs' rows gathered, each GPU with its own count of tokens before its padding.
  for (int64_t rows : {int64_t{1}, int64_t{8}, int64_t{100}}) {
    ExpectRouteEqualsGateThenAlign(V2LiteRouter(), 2 * rows, 1, 0, rng, {0, 32},
                                   {static_cast<int32_t>(rows), static_cast<int32_t>(rows / 2)});
    ExpectRouteEqualsGateThenAlign(V3Router(), 4 * rows, 0, 0, rng, {64, 64},
                                   {0, static_cast<int32_t>(rows), 1, static_cast<int32_t>(rows - 1)});
  }
}

// The folded routers' weights (LaunchFoldRouter) against the CPU in double: the router scaled by the
// two norms' weights, and multiplied through o_proj; V2-Lite's shapes and small odd ones.
TEST(MoeRouteTest, FoldedRouterWeightsMatchCpu) {
  COHORT_SKIP_WITHOUT_GPU();
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  Rng rng(seed);
  for (const auto& [experts, hidden, width] :
       std::vector<std::tuple<int64_t, int64_t, int64_t>>{{64, 2048, 2048}, {8, 104, 200}, {3, 16, 24}}) {
    SCOPED_TRACE(::testing::Message() << "experts " << experts << " hidden " << hidden << " width " << width);
    const std::vector<uint16_t> router = RandomBf16(rng, experts * hidden), o_proj = RandomBf16(rng, hidden * width),
                                g_post = RandomBf16(rng, hidden, 2.0f);
    std::vector<uint16_t> g_in = RandomBf16(rng, hidden, 2.0f);
    for (uint16_t& g : g_in) {
      if (Bf16ToFloat(g) == 0.0f) g = FloatToBf16(0.5f);  // the fold's contract: no zero
    }
    DeviceBuffer<uint16_t> d_router(router), d_o_proj(o_proj), d_g_in(g_in), d_g_post(g_post),
        d_from_input(experts * hidden), d_from_attention(experts * width);
    ASSERT_CUDA_OK(d_from_input.Poison());
    ASSERT_CUDA_OK(d_from_attention.Poison());
    ASSERT_CUDA_OK(LaunchFoldRouter(Bf16(d_router), Bf16(d_g_in), Bf16(d_g_post), Bf16(d_o_proj), experts, hidden,
                                    width, Bf16(d_from_input), Bf16(d_from_attention), nullptr));
    std::vector<uint16_t> from_input, from_attention;
    ASSERT_CUDA_OK(d_from_input.Read(&from_input));
    ASSERT_CUDA_OK(d_from_attention.Read(&from_attention));
    std::vector<double> want_input(experts * hidden), want_attention(experts * width, 0.0);
    for (int64_t e = 0; e < experts; ++e) {
      for (int64_t j = 0; j < hidden; ++j) {
        const double scaled = static_cast<double>(Bf16ToFloat(router[e * hidden + j])) * Bf16ToFloat(g_post[j]);
        want_input[e * hidden + j] = scaled / Bf16ToFloat(g_in[j]);
        for (int64_t a = 0; a < width; ++a) {
          want_attention[e * width + a] += scaled * Bf16ToFloat(o_proj[j * width + a]);
        }
      }
    }
    ExpectClose(ToFloat(from_input), want_input, "router / g_in * g_post");
    ExpectClose(ToFloat(from_attention), want_attention, "router * g_post . o_proj");
  }
}

// A router folded into the attention's projections (MoeRouterFold): the route forms each logit from
// its parts and the two norms' scales, then routes exactly as over the same logits formed on the
// host (the same rounded steps), for every route kernel and with padding tokens.
TEST(MoeRouteTest, FoldedRouterRoutesAsItsLogits) {
  COHORT_SKIP_WITHOUT_GPU();
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  Rng rng(seed);
  for (const ModelConfig& c : {V2LiteRouter(), V3Router()}) {
    for (int64_t tokens : {int64_t{1}, int64_t{2}, kMoeWarpRouteTokens, kMoeWarpRouteTokens + 3, int64_t{40}}) {
      SCOPED_TRACE(::testing::Message() << "experts " << c.n_routed_experts << " tokens " << tokens);
      const int64_t experts = c.n_routed_experts, stride = experts + 24, valid = std::max<int64_t>(1, tokens - 1);
      const int top_k = static_cast<int>(c.num_experts_per_tok);
      const bool with_bias = c.topk_method == TopkMethod::kNoAuxTc;
      std::vector<float> from_input(tokens * stride), from_attention(tokens * experts), inv_rms_in(tokens),
          inv_rms_post(tokens), bias(experts), logits(tokens * experts);
      for (float& v : from_input) v = rng.Uniform(-2.0f, 2.0f);
      for (float& v : from_attention) v = rng.Uniform(-3.0f, 3.0f);
      for (float& v : bias) v = rng.Uniform(-0.1f, 0.1f);
      for (int64_t t = 0; t < tokens; ++t) {
        inv_rms_in[t] = rng.Uniform(0.05f, 4.0f);
        inv_rms_post[t] = rng.Uniform(0.05f, 4.0f);
        const float rms_in = 1.0f / inv_rms_in[t];
        for (int64_t e = 0; e < experts; ++e) {
          logits[t * experts + e] = std::fma(from_input[t * stride + e], rms_in, from_attention[t * experts + e]) *
                                    inv_rms_post[t];
        }
      }
      DeviceBuffer<float> d_from_input(from_input), d_from_attention(from_attention), d_inv_in(inv_rms_in),
          d_inv_post(inv_rms_post), d_bias(bias), d_logits(logits);
      DeviceBuffer<int32_t> d_valid(std::vector<int32_t>{static_cast<int32_t>(valid)});
      const MoeGateParams gate = cuda::MoeGateParamsFor(c);
      const MoeRouterFold fold{d_from_input.get(), stride, d_from_attention.get(), d_inv_in.get(), d_inv_post.get()};
      std::vector<int32_t> ids[2];
      std::vector<float> weights[2];
      std::vector<uint8_t> buffers[2];
      for (int folded = 0; folded < 2; ++folded) {
        RoutingOnDevice d(tokens, top_k, static_cast<int>(experts), 1);
        DeviceBuffer<int32_t> d_ids(tokens * top_k);
        DeviceBuffer<float> d_weights(tokens * top_k);
        ASSERT_CUDA_OK(d.Carve(tokens, top_k, static_cast<int>(experts), 1,
                               MoeDefaultTileRows(tokens, top_k, static_cast<int>(experts), 1)));
        ASSERT_CUDA_OK(d.workspace.Poison(0xa5));
        ASSERT_CUDA_OK(d_ids.Poison());
        ASSERT_CUDA_OK(LaunchMoeRoute(folded ? nullptr : d_logits.get(), with_bias ? d_bias.get() : nullptr, gate,
                                      d_valid.get(), d_ids.get(), d_weights.get(), d.routing, nullptr, nullptr, 0,
                                      folded ? fold : MoeRouterFold{}));
        ASSERT_CUDA_OK(d_ids.Read(&ids[folded]));
        ASSERT_CUDA_OK(d_weights.Read(&weights[folded]));
        ASSERT_CUDA_OK(d.workspace.Read(&buffers[folded]));
      }
      EXPECT_EQ(ids[1], ids[0]);
      EXPECT_EQ(weights[1], weights[0]);
      EXPECT_TRUE(buffers[1] == buffers[0]) << "the routing buffers differ";
      EXPECT_EQ(std::count(ids[1].begin(), ids[1].end(), -1), (tokens - valid) * top_k) << "padding tokens";
      // A fold without its scales is refused, as are logits from neither.
      RoutingOnDevice d(tokens, top_k, static_cast<int>(experts), 1);
      ASSERT_CUDA_OK(d.Carve(tokens, top_k, static_cast<int>(experts), 1, 16));
      DeviceBuffer<int32_t> d_ids(tokens * top_k);
      DeviceBuffer<float> d_weights(tokens * top_k);
      MoeRouterFold unscaled = fold;
      unscaled.inv_rms_post = nullptr;
      EXPECT_EQ(LaunchMoeRoute(nullptr, nullptr, gate, nullptr, d_ids.get(), d_weights.get(), d.routing, nullptr,
                               nullptr, 0, unscaled),
                cudaErrorInvalidValue);
      EXPECT_EQ(LaunchMoeRoute(nullptr, nullptr, gate, nullptr, d_ids.get(), d_weights.get(), d.routing, nullptr,
                               nullptr),
                cudaErrorInvalidValue);
    }
  }
}

// A route that does the post-attention norm first (MoeRouteNorm) writes what the norm launch then the
// route with the norm's scale write, bit for bit: the residual, the normalised row, the choice and
// every routing buffer; for V2-Lite's and V3's routers, V2-Lite's hidden size (the kernel compiled
// for it), V3's and small odd ones, and a padding token. Shapes outside its contract are refused.
TEST(MoeRouteTest, NormInRouteEqualsTheNormThenTheRoute) {
  COHORT_SKIP_WITHOUT_GPU();
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  Rng rng(seed);
  constexpr float kEps = 1e-6f;
  for (const ModelConfig& c : {V2LiteRouter(), V3Router()}) {
    for (int64_t hidden : {int64_t{2048}, int64_t{7168}, int64_t{104}, int64_t{48}}) {
      for (int32_t valid : {1, 0}) {
        SCOPED_TRACE(::testing::Message() << "experts " << c.n_routed_experts << " hidden " << hidden << " valid "
                                        << valid);
        const int64_t experts = c.n_routed_experts, stride = experts + 8;
        const int top_k = static_cast<int>(c.num_experts_per_tok);
        const bool with_bias = c.topk_method == TopkMethod::kNoAuxTc;
        std::vector<float> from_input(stride), from_attention(experts), bias(experts), residual(hidden);
        for (float& v : from_input) v = rng.Uniform(-2.0f, 2.0f);
        for (float& v : from_attention) v = rng.Uniform(-3.0f, 3.0f);
        for (float& v : bias) v = rng.Uniform(-0.1f, 0.1f);
        for (float& v : residual) v = rng.Uniform(-4.0f, 4.0f);
        const std::vector<uint16_t> delta = RandomBf16(rng, hidden, 3.0f);
        const std::vector<uint16_t> weight = RandomBf16(rng, hidden, 2.0f);
        DeviceBuffer<float> d_from_input(from_input), d_from_attention(from_attention),
            d_inv_in(std::vector<float>{rng.Uniform(0.05f, 4.0f)}), d_bias(bias);
        DeviceBuffer<uint16_t> d_delta(delta), d_weight(weight);
        DeviceBuffer<int32_t> d_valid(std::vector<int32_t>{valid});
        const MoeGateParams gate = cuda::MoeGateParamsFor(c);

        std::vector<float> residuals[2];
        std::vector<uint16_t> outs[2];
        std::vector<int32_t> ids[2];
        std::vector<float> weights[2];
        std::vector<uint8_t> buffers[2];
        for (int fused = 0; fused < 2; ++fused) {
          DeviceBuffer<float> d_residual(residual), d_inv_post(1);
          DeviceBuffer<uint16_t> d_out(hidden);
          RoutingOnDevice d(1, top_k, static_cast<int>(experts), 1);
          DeviceBuffer<int32_t> d_ids(top_k);
          DeviceBuffer<float> d_weights(top_k);
          ASSERT_CUDA_OK(d.Carve(1, top_k, static_cast<int>(experts), 1,
                                 MoeDefaultTileRows(1, top_k, static_cast<int>(experts), 1)));
          ASSERT_CUDA_OK(d.workspace.Poison(0xa5));
          ASSERT_CUDA_OK(d_ids.Poison());
          ASSERT_CUDA_OK(d_out.Poison());
          ASSERT_CUDA_OK(d_inv_post.Poison());
          MoeRouterFold fold{d_from_input.get(), stride, d_from_attention.get(), d_inv_in.get(), d_inv_post.get()};
          MoeRouteNorm norm;
          if (fused) {
            fold.inv_rms_post = nullptr;
            norm = {d_residual.get(), Bf16(d_delta), Bf16(d_weight), static_cast<int>(hidden), kEps, Bf16(d_out)};
          } else {
            ASSERT_CUDA_OK(kernels::LaunchAddRmsNorm(d_residual.get(), Bf16(d_delta), Bf16(d_weight), 1,
                                                     static_cast<int>(hidden), kEps, Bf16(d_out), nullptr,
                                                     d_inv_post.get()));
          }
          ASSERT_CUDA_OK(LaunchMoeRoute(nullptr, with_bias ? d_bias.get() : nullptr, gate, d_valid.get(), d_ids.get(),
                                        d_weights.get(), d.routing, nullptr, nullptr, 0, fold, norm));
          ASSERT_CUDA_OK(d_residual.Read(&residuals[fused]));
          ASSERT_CUDA_OK(d_out.Read(&outs[fused]));
          ASSERT_CUDA_OK(d_ids.Read(&ids[fused]));
          ASSERT_CUDA_OK(d_weights.Read(&weights[fused]));
          ASSERT_CUDA_OK(d.workspace.Read(&buffers[fused]));
        }
        EXPECT_EQ(residuals[1], residuals[0]) << "the residual";
        EXPECT_EQ(outs[1], outs[0]) << "the normalised row";
        EXPECT_NE(residuals[1], residual) << "delta joined the residual";
        EXPECT_EQ(ids[1], ids[0]);
        EXPECT_EQ(weights[1], weights[0]);
        EXPECT_TRUE(buffers[1] == buffers[0]) << "the routing buffers differ";
        EXPECT_EQ(std::count(ids[1].begin(), ids[1].end(), -1), valid == 0 ? top_k : 0) << "a padding token";
      }
    }
  }

  // Refused: more than one token, a row longer than the norm takes, no fold, groups of rows, no output.
  const ModelConfig c = V2LiteRouter();
  const int top_k = static_cast<int>(c.num_experts_per_tok);
  const int64_t tokens = 2, hidden = kMoeRouteNormMaxDim + 8;
  // Zero rows and parts, unit scales: the launch that is taken runs on defined values.
  DeviceBuffer<float> logits(tokens * 64), parts(std::vector<float>(tokens * 64, 0.0f)),
      scales(std::vector<float>(tokens, 1.0f)), residual(std::vector<float>(tokens * hidden, 0.0f)),
      d_weights(tokens * top_k);
  DeviceBuffer<uint16_t> rows(std::vector<uint16_t>(tokens * hidden, 0)), weight(std::vector<uint16_t>(hidden, 0)),
      out(tokens * hidden);
  DeviceBuffer<int32_t> d_ids(tokens * top_k);
  const MoeGateParams gate = cuda::MoeGateParamsFor(c);
  const MoeRouterFold fold{parts.get(), 64, parts.get(), scales.get(), nullptr};
  const MoeRouteNorm norm{residual.get(), Bf16(rows), Bf16(weight), 64, kEps, Bf16(out)};
  auto route = [&](int64_t route_tokens, const MoeRouterFold& f, const MoeRouteNorm& n, int64_t group_rows) {
    RoutingOnDevice r(route_tokens, top_k, 64, 1);
    EXPECT_EQ(r.Carve(route_tokens, top_k, 64, 1, 16), cudaSuccess);
    return LaunchMoeRoute(logits.get(), nullptr, gate, nullptr, d_ids.get(), d_weights.get(), r.routing, nullptr,
                          nullptr, group_rows, f, n);
  };
  EXPECT_EQ(route(1, fold, norm, 0), cudaSuccess);
  EXPECT_EQ(route(tokens, fold, norm, 0), cudaErrorInvalidValue);
  MoeRouteNorm long_row = norm;
  long_row.dim = static_cast<int>(hidden);
  EXPECT_EQ(route(1, fold, long_row, 0), cudaErrorInvalidValue);
  EXPECT_EQ(route(1, MoeRouterFold{}, norm, 0), cudaErrorInvalidValue);
  EXPECT_EQ(route(1, fold, norm, 1), cudaErrorInvalidValue);
  MoeRouteNorm no_output = norm;
  no_output.out = nullptr;
  EXPECT_EQ(route(1, fold, no_output, 0), cudaErrorInvalidValue);
  ASSERT_CUDA_OK(cudaDeviceSynchronize());
}

TEST(MoeRouteTest, RejectsGateAndRoutingThatDisagree) {
  COHORT_SKIP_WITHOUT_GPU();
  RoutingOnDevice d(4, 6, 64, 2);
  ASSERT_CUDA_OK(d.Carve(4, 6, 64, 2, 16));
  DeviceBuffer<float> logits(4 * 64), weights(4 * 8);
  DeviceBuffer<int32_t> ids(4 * 8);
  const MoeGateParams v3 = cuda::MoeGateParamsFor(V3Router());  // 256 experts, top-8
  EXPECT_EQ(LaunchMoeRoute(logits.get(), nullptr, v3, nullptr, ids.get(), weights.get(), d.routing, nullptr, nullptr),
            cudaErrorInvalidValue);
  // The routing's 64 experts from expert 32 on are not all among a 64-expert gate's.
  const MoeGateParams v2 = cuda::MoeGateParamsFor(V2LiteRouter());
  d.routing.first_expert = 32;
  EXPECT_EQ(LaunchMoeRoute(logits.get(), nullptr, v2, nullptr, ids.get(), weights.get(), d.routing, nullptr, nullptr),
            cudaErrorInvalidValue);
}

// Host only: the layout fits the workspace, the buffers do not overlap, and shapes past the limits
// are refused.
TEST(MoeRoutingTest, CarvesDisjointBuffersWithinTheWorkspace) {
  struct Shape {
    int64_t tokens;
    int top_k, experts, shared;
  };
  for (const Shape& shape : {Shape{1, 6, 64, 2}, Shape{4096, 8, 256, 1}, Shape{300, 8, 256, 8}, Shape{0, 2, 8, 0},
                             Shape{17, 1, 1, 0}}) {
    for (int tile_rows : {16, 64, 128}) {
      SCOPED_TRACE(::testing::Message() << "tokens " << shape.tokens << " top_k " << shape.top_k << " experts "
                                      << shape.experts << " shared " << shape.shared << " tile_rows " << tile_rows);
      const int64_t bytes = MoeRoutingWorkspaceBytes(shape.tokens, shape.top_k, shape.experts, shape.shared);
      std::vector<int32_t> host(bytes / sizeof(int32_t) + 4);
      void* workspace = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(host.data()) + 15) & ~uintptr_t{15});
      MoeRouting r;
      ASSERT_EQ(
          CarveMoeRouting(workspace, bytes, shape.tokens, shape.top_k, shape.experts, shape.shared, tile_rows, &r),
          cudaSuccess);
      EXPECT_EQ(r.num_shared, shape.shared);
      EXPECT_EQ(r.num_rows(), shape.tokens * (shape.top_k + shape.shared));
      EXPECT_EQ(r.num_pairs(), shape.tokens * shape.top_k);
      const int64_t rows = r.num_rows(), pairs = r.num_pairs();
      // The most tiles any routing needs: every used routed expert opens a tile with its first row
      // and another every tile_rows rows after it; each shared expert needs ceil(T / tile_rows).
      const int64_t worst_routed = pairs <= shape.experts ? pairs : shape.experts + (pairs - shape.experts) / tile_rows;
      EXPECT_GE(r.max_tiles(), worst_routed + shape.shared * ((shape.tokens + tile_rows - 1) / tile_rows));
      struct Span {
        const int32_t* begin;
        int64_t ints;
      };
      std::vector<Span> spans = {{r.expert_offsets, shape.experts + shape.shared + 1}, {r.row_token, rows},
                                 {r.slot_row, r.num_pairs()}, {r.tile_expert, r.max_tiles()},
                                 {r.tile_row, r.max_tiles()}, {r.num_tiles, 1}, {r.item_counters, 2}};
      // More than 2048 pairs are aligned a block per 2048, each block's counts in scratch of its own.
      const int64_t chunks = (pairs + 2047) / 2048;
      if (chunks > 1) {
        ASSERT_NE(r.chunk_counts, nullptr);
        spans.push_back({r.chunk_counts, chunks * shape.experts});
      } else {
        EXPECT_EQ(r.chunk_counts, nullptr);
      }
      std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.begin < b.begin; });
      for (size_t i = 0; i < spans.size(); ++i) {
        EXPECT_EQ(reinterpret_cast<uintptr_t>(spans[i].begin) % 16, 0u) << "buffer " << i;
        const int32_t* end = spans[i].begin + spans[i].ints;
        if (i + 1 < spans.size()) {
          EXPECT_LE(end, spans[i + 1].begin) << "buffer " << i << " overlaps the next";
        }
        EXPECT_LE(reinterpret_cast<const char*>(end), static_cast<const char*>(workspace) + bytes) << "buffer " << i;
      }
    }
  }
  std::vector<int32_t> host(1 << 16);
  void* workspace = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(host.data()) + 15) & ~uintptr_t{15});
  const int64_t bytes = (int64_t{1} << 18) - 16;
  MoeRouting r;
  EXPECT_EQ(CarveMoeRouting(workspace, bytes, 4, kMoeMaxTopK, kMoeMaxExperts, kMoeMaxShared, 16, &r), cudaSuccess);
  EXPECT_EQ(CarveMoeRouting(workspace, bytes, 4, 8, kMoeMaxExperts + 1, 1, 16, &r), cudaErrorInvalidValue);
  EXPECT_EQ(CarveMoeRouting(workspace, bytes, 4, kMoeMaxTopK + 1, 256, 1, 16, &r), cudaErrorInvalidValue);
  EXPECT_EQ(CarveMoeRouting(workspace, bytes, 4, 8, 256, kMoeMaxShared + 1, 16, &r), cudaErrorInvalidValue);
  EXPECT_EQ(CarveMoeRouting(workspace, bytes, 4, 8, 256, -1, 16, &r), cudaErrorInvalidValue);
  EXPECT_EQ(CarveMoeRouting(workspace, MoeRoutingWorkspaceBytes(4, 8, 256, 1) - 16, 4, 8, 256, 1, 16, &r),
            cudaErrorInvalidValue);
  // A routing of more pairs than one align block takes, without the blocks' scratch: refused before
  // anything runs.
  ASSERT_EQ(CarveMoeRouting(workspace, bytes, 400, 6, 64, 0, 16, &r), cudaSuccess);
  ASSERT_NE(r.chunk_counts, nullptr);
  r.chunk_counts = nullptr;
  const int32_t* ids = static_cast<const int32_t*>(workspace);
  EXPECT_EQ(LaunchMoeAlign(ids, r, nullptr, nullptr), cudaErrorInvalidValue);
}

// Host only: with shared experts (a row a token each), 16-row tiles up to 96 tokens, then the tile
// size follows the rows per expert that gets any, shared experts included (the switch-overs measured
// for V2-Lite with its 2 shared experts).
TEST(MoeRoutingTest, DefaultTileRowsFollowRowsPerExpert) {
  EXPECT_EQ(MoeDefaultTileRows(0, 6, 64, 2), 16);
  EXPECT_EQ(MoeDefaultTileRows(1, 6, 64, 2), 16);     // 1 row per expert
  EXPECT_EQ(MoeDefaultTileRows(96, 6, 64, 2), 16);    // 11 rows per expert
  EXPECT_EQ(MoeDefaultTileRows(97, 6, 64, 2), 64);    // 11, but the shared experts' 97 rows in 7 tiles
  EXPECT_EQ(MoeDefaultTileRows(160, 6, 64, 2), 64);   // 19
  EXPECT_EQ(MoeDefaultTileRows(192, 6, 64, 2), 64);   // 23
  EXPECT_EQ(MoeDefaultTileRows(512, 6, 64, 2), 64);   // 62
  EXPECT_EQ(MoeDefaultTileRows(768, 6, 64, 2), 128);  // 93
  EXPECT_EQ(MoeDefaultTileRows(200, 6, 64, 0), 16);   // 18, routed only
  EXPECT_EQ(MoeDefaultTileRows(4096, 8, 256, 1), 128);
}

// ------------------------------------------------------------------------------------ grouped GEMM

struct ExpertShapes {
  const char* name;
  int experts;  // routed
  int top_k;
  int hidden;
  int intermediate;
  int shared;  // shared experts: one MLP of intermediate shared * intermediate
};
constexpr ExpertShapes kV2LiteExperts{"V2-Lite", 64, 6, 2048, 1408, /*shared=*/2};

// The experts of one shape set, on the host (bf16 bits) and on the device. The routed experts are
// random; the shared MLP is random in the published layout and then split into `shared` experts after
// the routed ones, as the engine loads it (worker/model/cuda/device_weights.cc): shared expert s takes
// gate and up rows [s I, (s + 1) I) and down columns [s I, (s + 1) I).
struct Experts {
  Experts(const ExpertShapes& s, Rng& rng)
      : shared_gate(RandomBf16(rng, int64_t{s.shared} * s.intermediate * s.hidden, 0.5f)),
        shared_up(RandomBf16(rng, int64_t{s.shared} * s.intermediate * s.hidden, 0.5f)),
        shared_down(RandomBf16(rng, int64_t{s.hidden} * s.shared * s.intermediate, 0.5f)),
        gate_up(StackGateUp(s, shared_gate, shared_up, rng)),
        down(StackDown(s, shared_down, rng)),
        d_gate_up(gate_up),
        d_down(down) {}

  std::vector<uint16_t> shared_gate;  // [S*I, H]
  std::vector<uint16_t> shared_up;    // [S*I, H]
  std::vector<uint16_t> shared_down;  // [H, S*I]
  std::vector<uint16_t> gate_up;      // [E + S, 2I, H]
  std::vector<uint16_t> down;         // [E + S, H, I]
  DeviceBuffer<uint16_t> d_gate_up;
  DeviceBuffer<uint16_t> d_down;

 private:
  static std::vector<uint16_t> StackGateUp(const ExpertShapes& s, const std::vector<uint16_t>& gate,
                                           const std::vector<uint16_t>& up, Rng& rng) {
    const int64_t slice = int64_t{s.intermediate} * s.hidden, routed = int64_t{s.experts} * 2 * slice;
    std::vector<uint16_t> out(routed + int64_t{s.shared} * 2 * slice);
    FillRandomBf16(rng, std::span<uint16_t>(out.data(), routed), 0.5f);
    for (int64_t e = 0; e < s.shared; ++e) {
      std::copy_n(gate.begin() + e * slice, slice, out.begin() + routed + 2 * e * slice);
      std::copy_n(up.begin() + e * slice, slice, out.begin() + routed + (2 * e + 1) * slice);
    }
    return out;
  }
  static std::vector<uint16_t> StackDown(const ExpertShapes& s, const std::vector<uint16_t>& down, Rng& rng) {
    const int64_t h = s.hidden, inter = s.intermediate, routed = int64_t{s.experts} * h * inter;
    std::vector<uint16_t> out(routed + s.shared * h * inter);
    FillRandomBf16(rng, std::span<uint16_t>(out.data(), routed), 0.5f);
    for (int64_t e = 0; e < s.shared; ++e) {
      for (int64_t n = 0; n < h; ++n) {
        std::copy_n(down.begin() + n * s.shared * inter + e * inter, inter,
                    out.begin() + routed + (e * h + n) * inter);
      }
    }
    return out;
  }
};

// y[i] = a[source_row[i]] . w[ids[i]]^T for every row i of a list. Work items are (expert, 64 weight
// rows), so the weight block stays in cache while the expert's rows pass.
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

// Rows of the device matrix y [rows, n], reordered to a list's order through the device row of each.
std::vector<float> RowsInListOrder(const std::vector<uint16_t>& y, const std::vector<int64_t>& device_row, int64_t n) {
  std::vector<float> out(device_row.size() * n);
  for (size_t p = 0; p < device_row.size(); ++p) {
    for (int64_t col = 0; col < n; ++col) out[p * n + col] = Bf16ToFloat(y[device_row[p] * n + col]);
  }
  return out;
}

// The rows of an aligned routing as a list: the routed (token, slot) pairs whose expert is on this rank
// in pair order, then shared expert s's row of token t for each s, t; with each row's expert, token
// and device row. The list's length is the routing's rows in use.
struct RowList {
  std::vector<int32_t> expert;
  std::vector<int64_t> token;
  std::vector<int64_t> device_row;
};

void ListRows(const std::vector<int32_t>& ids, const MoeRouting& r, RowList* list) {
  const int64_t pairs = r.num_pairs();
  const std::vector<int32_t> slot_row = ReadDevice(r.slot_row, pairs);
  const int32_t shared_first = ReadDevice(r.expert_offsets + r.num_experts, 1)[0];
  *list = RowList{};
  for (int64_t p = 0; p < pairs; ++p) {
    if (ids[p] < 0 || ids[p] >= r.num_experts) continue;
    ASSERT_TRUE(slot_row[p] >= 0 && slot_row[p] < shared_first) << "pair " << p;
    list->expert.push_back(ids[p]);
    list->token.push_back(p / r.top_k);
    list->device_row.push_back(slot_row[p]);
  }
  ASSERT_EQ(static_cast<int64_t>(list->expert.size()), shared_first) << "routed rows in use";
  for (int e = 0; e < r.num_shared; ++e) {
    for (int64_t t = 0; t < r.num_tokens; ++t) {
      list->expert.push_back(r.num_experts + e);
      list->token.push_back(t);
      list->device_row.push_back(shared_first + e * r.num_tokens + t);
    }
  }
}

// Both GEMMs of a layer (gate_up from token rows through the gather, down from rows in routing order)
// at every tile size, against one CPU reference over the routed (token, slot) pairs and the (token,
// shared expert) pairs. Without routed ids every id is -1: the shared experts' own routing, as the
// engine runs them beside the routing at one or two tokens. `fixed_ids` ([tokens, k]), when given,
// replace the random ones.
void ExpectGroupedGemmsMatchCpu(const ExpertShapes& s, const Experts& w, int64_t tokens, Rng& rng,
                                bool routed_ids = true, const std::vector<int32_t>& fixed_ids = {}) {
  SCOPED_TRACE(::testing::Message() << s.name << " shared " << s.shared << " tokens " << tokens);
  const int64_t rows = tokens * (s.top_k + s.shared);
  const int64_t n1 = 2 * s.intermediate, k1 = s.hidden, n2 = s.hidden, k2 = s.intermediate;
  std::vector<int32_t> ids = fixed_ids.empty() ? RandomTopkIds(rng, tokens, s.top_k, s.experts) : fixed_ids;
  if (!routed_ids) std::fill(ids.begin(), ids.end(), -1);
  const int64_t routed_rows = std::count_if(ids.begin(), ids.end(), [&](int32_t id) { return id >= 0; });
  const std::vector<uint16_t> hidden = RandomBf16(rng, tokens * k1);
  const std::vector<uint16_t> act = RandomBf16(rng, rows * k2);  // rows in routing order

  DeviceBuffer<int32_t> d_ids(ids);
  DeviceBuffer<uint16_t> d_hidden(hidden), d_act(act), d_y1(rows * n1), d_y2(rows * n2);
  RoutingOnDevice d(tokens, s.top_k, s.experts, s.shared);
  ASSERT_CUDA_OK(d_ids.error());
  ASSERT_CUDA_OK(d_hidden.error());
  ASSERT_CUDA_OK(d_act.error());
  ASSERT_CUDA_OK(d_y1.error());
  ASSERT_CUDA_OK(d_y2.error());
  ASSERT_CUDA_OK(d.workspace.error());

  std::vector<double> want1, want2;
  RowList list;
  for (int tile_rows : {16, 64, 128}) {
    SCOPED_TRACE(::testing::Message() << "tile_rows " << tile_rows);
    ASSERT_CUDA_OK(d.workspace.Poison(0xa5));  // the align must write all the products read
    ASSERT_CUDA_OK(d.Carve(tokens, s.top_k, s.experts, s.shared, tile_rows));
    ASSERT_CUDA_OK(LaunchMoeAlign(d_ids.get(), d.routing, nullptr, nullptr));
    ASSERT_CUDA_OK(d_y1.Poison());
    ASSERT_CUDA_OK(d_y2.Poison());
    ASSERT_CUDA_OK(LaunchMoeGroupedGemm({Bf16(d_hidden), true, Bf16(w.d_gate_up), n1, k1, Bf16(d_y1)}, d.routing,
                                        nullptr));
    // The align is two launches back: the down product may read the routing before its wait.
    ASSERT_CUDA_OK(LaunchMoeGroupedGemm({Bf16(d_act), false, Bf16(w.d_down), n2, k2, Bf16(d_y2), /*silu_mul=*/false,
                                         /*routing_ready=*/true},
                                        d.routing, nullptr));
    ASSERT_CUDA_OK(cudaDeviceSynchronize());
    if (want1.empty()) {  // the row order does not depend on the tile size; checked by the align test
      ASSERT_NO_FATAL_FAILURE(ListRows(ids, d.routing, &list));
      ASSERT_EQ(static_cast<int64_t>(list.device_row.size()), routed_rows + tokens * s.shared);
      want1 = ReferenceGemm(ToFloat(hidden), list.token, list.expert, w.gate_up, n1, k1);
      want2 = ReferenceGemm(ToFloat(act), list.device_row, list.expert, w.down, n2, k2);
    }
    std::vector<uint16_t> y1, y2;
    ASSERT_CUDA_OK(d_y1.Read(&y1));
    ASSERT_CUDA_OK(d_y2.Read(&y2));
    ExpectClose(RowsInListOrder(y1, list.device_row, n1), want1, "gate_up (gathered rows)");
    ExpectClose(RowsInListOrder(y2, list.device_row, n2), want2, "down (rows in routing order)");

    // Without routing_ready: the same bits.
    ASSERT_CUDA_OK(d_y2.Poison());
    ASSERT_CUDA_OK(LaunchMoeGroupedGemm({Bf16(d_act), false, Bf16(w.d_down), n2, k2, Bf16(d_y2)}, d.routing, nullptr));
    ASSERT_CUDA_OK(cudaDeviceSynchronize());
    std::vector<uint16_t> y2_waiting;
    ASSERT_CUDA_OK(d_y2.Read(&y2_waiting));
    EXPECT_TRUE(y2_waiting == y2) << "down product with and without routing_ready";
    // The 64- and 128-row tiles take their items from a queue in the routing: each launch leaves it
    // as it found it, so the same routing serves the next one (above, and every layer of a graph).
    EXPECT_EQ(ReadDevice(d.routing.item_counters, 2), (std::vector<int32_t>{0, 0})) << "the item queue";
  }
}

TEST(MoeGroupedGemmTest, MatchesCpuOnV2LiteShapes) {
  COHORT_SKIP_WITHOUT_GPU();
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  Rng rng(seed);
  const ExpertShapes shapes = kV2LiteExperts;
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
  const ExpertShapes shapes{"V3 (16 of the 256 experts)", 16, 8, 7168, 2048, /*shared=*/1};
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
  for (int shared : {0, 1, 2}) {
    const ExpertShapes shapes{"odd sizes", 5, 2, 136, 104, shared};
    const Experts experts(shapes, rng);
    ASSERT_CUDA_OK(experts.d_gate_up.error());
    ASSERT_CUDA_OK(experts.d_down.error());
    for (int64_t tokens : {1, 37, 300}) ExpectGroupedGemmsMatchCpu(shapes, experts, tokens, rng);
  }
}

// The gate_up product with silu_mul (the activation straight from the fp32 accumulators) at every
// tile size, against silu(gate) * up of the double-precision gate and up. `shared` experts in use (the
// weights may hold more); about one routed slot in ten on another rank, so the rows in use stop short
// of the buffer, and the rows past them must keep their poison.
void ExpectFusedGateUpMatchesCpu(const ExpertShapes& s, const Experts& w, int shared, int64_t tokens, Rng& rng,
                                 bool routed_ids = true, const std::vector<int32_t>& fixed_ids = {}) {
  SCOPED_TRACE(::testing::Message() << s.name << " shared " << shared << " tokens " << tokens);
  ASSERT_LE(shared, s.shared);
  const int64_t rows = tokens * (s.top_k + shared), inter = s.intermediate, h = s.hidden;
  std::vector<int32_t> ids = fixed_ids;
  if (ids.empty()) {
    ids = RandomTopkIds(rng, tokens, s.top_k, s.experts);
    for (int32_t& id : ids) id = !routed_ids || rng.Below(10) == 0 ? -1 : id;
  }
  const std::vector<uint16_t> hidden = RandomBf16(rng, tokens * h);

  DeviceBuffer<int32_t> d_ids(ids);
  DeviceBuffer<uint16_t> d_hidden(hidden), d_act(rows * inter);
  RoutingOnDevice d(tokens, s.top_k, s.experts, shared);
  ASSERT_CUDA_OK(d_ids.error());
  ASSERT_CUDA_OK(d_hidden.error());
  ASSERT_CUDA_OK(d_act.error());
  ASSERT_CUDA_OK(d.workspace.error());

  RowList list;
  std::vector<double> want;
  bool listed = false;
  for (int tile_rows : {16, 64, 128}) {
    SCOPED_TRACE(::testing::Message() << "tile_rows " << tile_rows);
    ASSERT_CUDA_OK(d.Carve(tokens, s.top_k, s.experts, shared, tile_rows));
    ASSERT_CUDA_OK(LaunchMoeAlign(d_ids.get(), d.routing, nullptr, nullptr));
    ASSERT_CUDA_OK(d_act.Poison());
    ASSERT_CUDA_OK(LaunchMoeGroupedGemm({Bf16(d_hidden), true, Bf16(w.d_gate_up), inter, h, Bf16(d_act),
                                         /*silu_mul=*/true},
                                        d.routing, nullptr));
    ASSERT_CUDA_OK(cudaDeviceSynchronize());
    if (!listed) {  // the row order does not depend on the tile size
      ASSERT_NO_FATAL_FAILURE(ListRows(ids, d.routing, &list));
      const std::vector<double> gate_up =
          ReferenceGemm(ToFloat(hidden), list.token, list.expert, w.gate_up, 2 * inter, h);
      want.resize(list.token.size() * inter);
      for (size_t p = 0; p < list.token.size(); ++p) {
        const double* y = gate_up.data() + p * 2 * inter;
        for (int64_t i = 0; i < inter; ++i) want[p * inter + i] = Silu(y[i]) * y[inter + i];
      }
      listed = true;
    }
    std::vector<uint16_t> act;
    ASSERT_CUDA_OK(d_act.Read(&act));
    ExpectClose(RowsInListOrder(act, list.device_row, inter), want, "silu(gate) * up");
    const int64_t in_use = static_cast<int64_t>(list.device_row.size());
    EXPECT_EQ(std::count(act.begin() + in_use * inter, act.end(), uint16_t{0xffff}), (rows - in_use) * inter)
        << "rows " << in_use << " .. " << rows << " past those in use were written";
  }
}

TEST(MoeGroupedGemmTest, FusedSiluMulMatchesCpuOnV2LiteShapes) {
  COHORT_SKIP_WITHOUT_GPU();
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  Rng rng(seed);
  const ExpertShapes shapes = kV2LiteExperts;
  const Experts experts(shapes, rng);
  ASSERT_CUDA_OK(experts.d_gate_up.error());
  for (int shared : {0, 2}) {
    for (int64_t tokens : {1, 37, 300}) ExpectFusedGateUpMatchesCpu(shapes, experts, shared, tokens, rng);
  }
}

TEST(MoeGroupedGemmTest, FusedSiluMulMatchesCpuOnSizesThatAreOnlyMultiplesOfEight) {
  COHORT_SKIP_WITHOUT_GPU();
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  Rng rng(seed);
  // An item covers 32 act columns (16-row tiles) or 128 (64- and 128-row tiles; with 64 rows each
  // consumer warpgroup takes 64 of them). I = 200 leaves one group of 8 columns in the last item of 32,
  // nine of sixteen in the last of 128 (one of eight in its second half); I = 1400 three of four,
  // fifteen of sixteen (seven of eight); I = 136 one of sixteen, and nothing in the second half, whose
  // weight rows lie wholly past the matrix. Hidden 136 and 264 are no whole number of k-steps.
  for (const ExpertShapes& shapes : {ExpertShapes{"I = 200", 5, 2, 136, 200, /*shared=*/2},
                                     ExpertShapes{"I = 1400", 8, 2, 264, 1400, /*shared=*/2},
                                     ExpertShapes{"I = 136", 5, 2, 136, 136, /*shared=*/2}}) {
    const Experts experts(shapes, rng);
    ASSERT_CUDA_OK(experts.d_gate_up.error());
    for (int shared : {0, 2}) {
      for (int64_t tokens : {1, 37, 300, 1000}) ExpectFusedGateUpMatchesCpu(shapes, experts, shared, tokens, rng);
    }
  }
}

// The engine's shared experts beside the routing at one or two tokens: a routing of one -1 id per
// token, so the products have few items (the down product on the decode tiles of two blocks a SM,
// its first weights requested before its wait).
TEST(MoeGroupedGemmTest, MatchesCpuForSharedExpertsAlone) {
  COHORT_SKIP_WITHOUT_GPU();
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  Rng rng(seed);
  const ExpertShapes shapes{"V2-Lite, shared experts alone", 64, /*top_k=*/1, 2048, 1408, /*shared=*/2};
  const Experts experts(shapes, rng);
  ASSERT_CUDA_OK(experts.d_gate_up.error());
  ASSERT_CUDA_OK(experts.d_down.error());
  for (int64_t tokens : {1, 2}) {
    ExpectGroupedGemmsMatchCpu(shapes, experts, tokens, rng, /*routed_ids=*/false);
    ExpectFusedGateUpMatchesCpu(shapes, experts, shapes.shared, tokens, rng, /*routed_ids=*/false);
  }
}

// One token, the decode step of one request: when each of its k + S experts got a row, tile t is row t
// and the products take a block's tile from its index (a gate_up block whose tile is a shared
// expert's requests its weights before the wait). An id without a row (an expert of another rank) or
// two slots on one expert leave fewer tiles: the products must notice and look every tile up.
TEST(MoeGroupedGemmTest, OneTokenMatchesCpuWhateverItsTiles) {
  COHORT_SKIP_WITHOUT_GPU();
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  Rng rng(seed);
  const ExpertShapes shapes = kV2LiteExperts;
  const Experts experts(shapes, rng);
  ASSERT_CUDA_OK(experts.d_gate_up.error());
  ASSERT_CUDA_OK(experts.d_down.error());
  const std::vector<std::vector<int32_t>> routings = {
      {5, 63, 0, 17, 42, 8},   // k + S tiles
      {5, 63, -1, 17, 42, 8},  // one id without a row: k + S - 1 tiles
      {5, 5, 0, 17, 42, 8},    // two rows for expert 5: k + S - 1 tiles
  };
  for (const std::vector<int32_t>& ids : routings) {
    ExpectGroupedGemmsMatchCpu(shapes, experts, 1, rng, /*routed_ids=*/true, ids);
    ExpectFusedGateUpMatchesCpu(shapes, experts, shapes.shared, 1, rng, /*routed_ids=*/true, ids);
    ExpectFusedGateUpMatchesCpu(shapes, experts, /*shared=*/0, 1, rng, /*routed_ids=*/true, ids);
  }
}

TEST(MoeGroupedGemmTest, RejectsSizesThatAreNotMultiplesOfEight) {
  COHORT_SKIP_WITHOUT_GPU();
  RoutingOnDevice d(4, 2, 8, 0);
  ASSERT_CUDA_OK(d.workspace.error());
  ASSERT_CUDA_OK(d.Carve(4, 2, 8, 0, 16));
  DeviceBuffer<uint16_t> a(4 * 104), w(8 * 64 * 104), y(8 * 64);
  EXPECT_EQ(LaunchMoeGroupedGemm({Bf16(a), true, Bf16(w), 64, 100, Bf16(y)}, d.routing, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(LaunchMoeGroupedGemm({Bf16(a), true, Bf16(w), 60, 104, Bf16(y)}, d.routing, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(LaunchMoeGroupedGemm({Bf16(a), true, Bf16(w), 28, 104, Bf16(y), /*silu_mul=*/true}, d.routing, nullptr),
            cudaErrorInvalidValue);
  MoeRouting odd_tiles = d.routing;
  odd_tiles.tile_rows = 32;
  EXPECT_EQ(LaunchMoeGroupedGemm({Bf16(a), true, Bf16(w), 64, 104, Bf16(y)}, odd_tiles, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(d.Carve(4, 2, 8, 0, 32), cudaErrorInvalidValue);
  // Tiles of 64 rows take their items from the routing's queue: a routing without one is refused.
  ASSERT_CUDA_OK(d.Carve(4, 2, 8, 0, 64));
  MoeRouting no_queue = d.routing;
  no_queue.item_counters = nullptr;
  EXPECT_EQ(LaunchMoeGroupedGemm({Bf16(a), true, Bf16(w), 64, 104, Bf16(y)}, no_queue, nullptr), cudaErrorInvalidValue);
}

// ------------------------------------------------------------------------------ silu-mul, combine

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

// out[t] = add[t] + sum_j w[t, j] y[slot_row[t, j]] + sum_s y[offsets[E] + s T + t], with and without
// `add`, in place and out of place, with some routed slots on other ranks (so the shared rows start
// before T*k).
void ExpectCombineMatchesCpu(int shared, Rng& rng) {
  SCOPED_TRACE(::testing::Message() << "shared " << shared);
  const int64_t tokens = 300, hidden = 2048;
  const int top_k = 6, experts = 64;
  const int64_t rows = tokens * (top_k + shared);
  std::vector<int32_t> ids = RandomTopkIds(rng, tokens, top_k, experts);
  for (int i = 0; i < 50; ++i) ids[rng.Below(static_cast<int>(ids.size()))] = -1;  // some slots on other ranks
  std::vector<float> weights(tokens * top_k);
  for (float& w : weights) w = rng.Uniform(0.0f, 1.0f);
  const std::vector<uint16_t> expert_out = RandomBf16(rng, rows * hidden, 3.0f);
  const std::vector<uint16_t> add = RandomBf16(rng, 2 * tokens * hidden, 3.0f);  // two matrices [T, H]

  RoutingOnDevice d(tokens, top_k, experts, shared);
  DeviceBuffer<int32_t> d_ids(ids);
  DeviceBuffer<float> d_weights(weights);
  DeviceBuffer<uint16_t> d_expert_out(expert_out), d_add(add), d_out(tokens * hidden);
  ASSERT_CUDA_OK(d.workspace.error());
  ASSERT_CUDA_OK(d.Carve(tokens, top_k, experts, shared, 16));
  ASSERT_CUDA_OK(LaunchMoeAlign(d_ids.get(), d.routing, nullptr, nullptr));
  const std::vector<int32_t> slot_row = ReadDevice(d.routing.slot_row, tokens * top_k);
  const int32_t shared_first = ReadDevice(d.routing.expert_offsets + experts, 1)[0];
  ASSERT_LT(shared_first, tokens * top_k);

  for (int32_t adds : {2, 1, 0}) {
    SCOPED_TRACE(::testing::Message() << adds << " added matrices");
    ASSERT_CUDA_OK(d_out.Poison());
    ASSERT_CUDA_OK(LaunchMoeCombine(Bf16(d_expert_out), d_weights.get(), d.routing, {Bf16(d_add), adds}, hidden,
                                    Bf16(d_out), nullptr));
    std::vector<uint16_t> out;
    ASSERT_CUDA_OK(d_out.Read(&out));
    std::vector<double> want(tokens * hidden);
    for (int64_t t = 0; t < tokens; ++t) {
      for (int64_t h = 0; h < hidden; ++h) {
        double sum = 0.0;
        for (int a = 0; a < adds; ++a) sum += Bf16ToFloat(add[(a * tokens + t) * hidden + h]);
        for (int j = 0; j < top_k; ++j) {
          const int32_t row = slot_row[t * top_k + j];
          if (ids[t * top_k + j] < 0) continue;
          sum += static_cast<double>(weights[t * top_k + j]) * Bf16ToFloat(expert_out[row * hidden + h]);
        }
        for (int e = 0; e < shared; ++e) sum += Bf16ToFloat(expert_out[(shared_first + e * tokens + t) * hidden + h]);
        want[t * hidden + h] = sum;
      }
    }
    ExpectClose(ToFloat(out), want, "combine");

    // In fp32 (expert parallelism's partial sums): the same sum before its one rounding.
    DeviceBuffer<float> d_out_f32(tokens * hidden);
    ASSERT_CUDA_OK(d_out_f32.Poison());
    ASSERT_CUDA_OK(LaunchMoeCombine(Bf16(d_expert_out), d_weights.get(), d.routing, {Bf16(d_add), adds}, hidden,
                                    d_out_f32.get(), nullptr));
    std::vector<float> out_f32;
    ASSERT_CUDA_OK(d_out_f32.Read(&out_f32));
    for (int64_t i = 0; i < tokens * hidden; ++i) {
      ASSERT_EQ(FloatToBf16(out_f32[i]), out[i]) << "fp32 combine " << out_f32[i] << " at " << i;
    }
  }

  // In place: out aliases the first added matrix.
  DeviceBuffer<uint16_t> d_inout(add);
  ASSERT_CUDA_OK(LaunchMoeCombine(Bf16(d_expert_out), d_weights.get(), d.routing, {Bf16(d_inout), 2}, hidden,
                                  Bf16(d_inout), nullptr));
  std::vector<uint16_t> in_place, out_of_place;
  ASSERT_CUDA_OK(d_inout.ReadFirst(tokens * hidden, &in_place));
  ASSERT_CUDA_OK(LaunchMoeCombine(Bf16(d_expert_out), d_weights.get(), d.routing, {Bf16(d_add), 2}, hidden,
                                  Bf16(d_out), nullptr));
  ASSERT_CUDA_OK(d_out.Read(&out_of_place));
  EXPECT_EQ(in_place, out_of_place);
}

TEST(MoeCombineTest, SumsWeightedRoutedRowsAndSharedRows) {
  COHORT_SKIP_WITHOUT_GPU();
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  Rng rng(seed);
  for (int shared : {0, 1, 2}) ExpectCombineMatchesCpu(shared, rng);
}

// The combine folded into the next RMSNorm equals the combine (bf16 rows) then residual += delta and
// the RMSNorm, on the CPU in double.
TEST(MoeCombineTest, FoldsIntoTheNextRmsNorm) {
  COHORT_SKIP_WITHOUT_GPU();
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  Rng rng(seed);
  const int top_k = 6, experts = 64;
  // (tokens, hidden, shared experts in the routing, matrices added): the last two as the engine
  // combines the shared experts run apart (none in the routing, two added) or on cuBLAS (one summed).
  for (const auto& [tokens, hidden, shared, adds] : std::vector<std::tuple<int64_t, int64_t, int, int32_t>>{
           {1, 2048, 2, 0}, {5, 2048, 0, 1}, {70, 7168, 1, 0}, {3, 104, 2, 1}, {2, 2048, 0, 2}, {7, 2048, 0, 1}}) {
    SCOPED_TRACE(::testing::Message() << "tokens " << tokens << " hidden " << hidden << " shared " << shared << ", "
                                    << adds << " added");
    const int64_t rows = tokens * (top_k + shared);
    std::vector<int32_t> ids = RandomTopkIds(rng, tokens, top_k, experts);
    ids[rng.Below(static_cast<int>(ids.size()))] = -1;  // a slot on another rank
    std::vector<float> weights(tokens * top_k), residual(tokens * hidden);
    for (float& w : weights) w = rng.Uniform(0.0f, 1.0f);
    for (float& r : residual) r = rng.Uniform(-4.0f, 4.0f);
    const std::vector<uint16_t> expert_out = RandomBf16(rng, rows * hidden, 3.0f);
    const std::vector<uint16_t> add = RandomBf16(rng, std::max(adds, 1) * tokens * hidden, 3.0f);
    const std::vector<uint16_t> norm = RandomBf16(rng, hidden, 2.0f);

    RoutingOnDevice d(tokens, top_k, experts, shared);
    DeviceBuffer<int32_t> d_ids(ids);
    DeviceBuffer<float> d_weights(weights), d_residual(residual);
    DeviceBuffer<uint16_t> d_expert_out(expert_out), d_add(add), d_norm(norm), d_delta(tokens * hidden),
        d_out(tokens * hidden);
    ASSERT_CUDA_OK(d.Carve(tokens, top_k, experts, shared, 16));
    ASSERT_CUDA_OK(LaunchMoeAlign(d_ids.get(), d.routing, nullptr, nullptr));
    ASSERT_CUDA_OK(LaunchMoeCombine(Bf16(d_expert_out), d_weights.get(), d.routing, {Bf16(d_add), adds}, hidden,
                                    Bf16(d_delta), nullptr));
    ASSERT_CUDA_OK(d_out.Poison());
    DeviceBuffer<float> d_inv_rms(std::vector<float>(tokens, -1.0f));
    ASSERT_CUDA_OK(LaunchMoeCombineAddRmsNorm(Bf16(d_expert_out), d_weights.get(), d.routing, {Bf16(d_add), adds},
                                              hidden, d_residual.get(), Bf16(d_norm), 1e-6f, Bf16(d_out), nullptr,
                                              d_inv_rms.get()));
    std::vector<uint16_t> delta, out;
    std::vector<float> new_residual, inv_rms;
    ASSERT_CUDA_OK(d_delta.Read(&delta));
    ASSERT_CUDA_OK(d_out.Read(&out));
    ASSERT_CUDA_OK(d_residual.Read(&new_residual));
    ASSERT_CUDA_OK(d_inv_rms.Read(&inv_rms));
    std::vector<double> want(tokens * hidden);
    for (int64_t t = 0; t < tokens; ++t) {
      double sum_sq = 0.0;
      for (int64_t h = 0; h < hidden; ++h) {
        const int64_t i = t * hidden + h;
        const float sum = residual[i] + Bf16ToFloat(delta[i]);  // the combined row as the combine stores it
        ASSERT_EQ(new_residual[i], sum) << "residual of token " << t << " at " << h;
        sum_sq += static_cast<double>(sum) * sum;
      }
      const double inverse_rms = 1.0 / std::sqrt(sum_sq / hidden + 1e-6);
      ASSERT_NEAR(inv_rms[t], inverse_rms, 1e-5 * inverse_rms) << "token " << t << "'s scale";
      for (int64_t h = 0; h < hidden; ++h) {
        want[t * hidden + h] = new_residual[t * hidden + h] * inverse_rms * Bf16ToFloat(norm[h]);
      }
    }
    ExpectClose(ToFloat(out), want, "combine + RMSNorm");
  }
}

// ------------------------------------------------------------------------------------ whole layer

struct LayerCase {
  const char* name;
  ModelConfig router;
  int hidden;
  int intermediate;
  bool bias;
  int shared;  // shared experts
};

// One MoE layer on the CPU, the way a model defines it: TopkRouter, then per chosen expert gate_up,
// SiLU and down in double, rounded to bf16 where the GPU stores bf16 (gate_up unless the GPU's gate_up
// product ends in the SiLU-and-mul, act, the expert output y2), weighted and summed in double; plus the
// shared experts as one dense MLP of intermediate S*I over the published [S*I, H] / [H, S*I] matrices,
// rounded to bf16 at gate and up (likewise) and act.
//
// Rounding at the same points does not make the two pipelines agree to the output's own precision:
// the GPU rounds an fp32 tensor-core sum and the CPU a double sum, and where the two straddle a
// rounding midpoint they land one bf16 ulp apart. Flips of y2 are what show: |y2| is some 400 for
// V2-Lite (ulp 2 to 4), the weights ~0.1, so a flip moves out[t, n] by ~0.3, which is several ulps of
// an output that the weighted terms and the shared output partly cancel. `allowance` is therefore one
// ulp of each weighted term, sum_j |w_j| ulp(y2_j); flips of gate_up and act move y2 by far less than
// its ulp and fit in ExpectClose's own terms. The GPU also rounds each shared expert's y2 (the part of
// the dense down product over its slice of the intermediate units), which the dense reference does
// not: one ulp of each such part joins the allowance. A wrong expert, weight or row is off by a whole
// term, hundreds of these ulps.
struct LayerReference {
  std::vector<double> out;        // [T, H]
  std::vector<double> allowance;  // [T, H]
  std::vector<double> gate_up;    // [rows, 2I] in the device's row order, the exact products, given a DeviceGateUp
};
// Without silu_mul the gate_up product is rounded to bf16 before the SiLU-and-mul. Where an exact
// product lies within its fp32 sum's error of a bf16 rounding midpoint, the device's value is the
// other neighbour, one bf16 step (0.4%) off, and the step carries through the activation into every
// output of its token. So that check compares the gate_up product on its own (`gate_up` above), and
// the reference then carries on from the values the device wrote.
struct DeviceGateUp {
  std::vector<uint16_t> y1;        // [rows, 2I]
  std::vector<int32_t> slot_row;   // [T*k]: the row of the device's routed pair (t, j)
  std::vector<int32_t> offsets;    // [E + S + 1]: shared expert s's row for token t is offsets[E + s] + t

  // The row of token t's pair with `expert`, or -1.
  int64_t RoutedRow(int64_t t, int top_k, int32_t expert) const {
    for (int j = 0; j < top_k; ++j) {
      const int32_t row = slot_row[t * top_k + j];
      if (row >= offsets[expert] && row < offsets[expert + 1]) return row;
    }
    return -1;
  }
};
LayerReference ReferenceLayer(const LayerCase& c, const Experts& w, const std::vector<float>& logits,
                              const std::vector<float>& bias, const std::vector<uint16_t>& x, int64_t tokens,
                              const DeviceGateUp* device) {
  const int experts = static_cast<int>(c.router.n_routed_experts);
  const int top_k = static_cast<int>(c.router.num_experts_per_tok);
  const int64_t h = c.hidden, inter = c.intermediate, shared_inter = int64_t{c.shared} * c.intermediate;
  const TopkRouter router(c.router);
  LayerReference ref{std::vector<double>(tokens * h, 0.0), std::vector<double>(tokens * h, 0.0), {}};
  if (device != nullptr) ref.gate_up.assign(device->y1.size(), 0.0);
  // Gate or up value n of device row `row`: records the exact product, returns what the layer goes on
  // with (with silu_mul, no device rows: the exact product, as the device's fp32 sums are not rounded).
  const auto gate_up_at = [&](int64_t row, int64_t n, double exact) -> double {
    if (device == nullptr) return exact;
    ref.gate_up[row * 2 * inter + n] = exact;
    return Bf16ToFloat(device->y1[row * 2 * inter + n]);
  };
#pragma omp parallel for schedule(dynamic)
  for (int64_t t = 0; t < tokens; ++t) {
    std::vector<int32_t> ids(top_k);
    std::vector<float> weights(top_k);
    router.Select(std::span<const float>(logits.data() + t * experts, experts), bias, ids, weights);
    const std::vector<float> xt = ToFloat(std::span<const uint16_t>(x.data() + t * h, h));
    std::vector<double> gate_up(2 * inter);
    std::vector<float> act(inter);
    double* out = ref.out.data() + t * h;
    double* allowance = ref.allowance.data() + t * h;
    for (int j = 0; j < top_k; ++j) {
      const uint16_t* wgu = w.gate_up.data() + static_cast<int64_t>(ids[j]) * 2 * inter * h;
      const uint16_t* wd = w.down.data() + static_cast<int64_t>(ids[j]) * h * inter;
      const int64_t row = device != nullptr ? device->RoutedRow(t, top_k, ids[j]) : -1;
      if (device != nullptr && row < 0) {
        ADD_FAILURE() << "token " << t << ": expert " << ids[j] << " has no row on the device";
        continue;
      }
      for (int64_t n = 0; n < 2 * inter; ++n) gate_up[n] = gate_up_at(row, n, DotBf16(xt.data(), wgu + n * h, h));
      for (int64_t i = 0; i < inter; ++i) act[i] = RoundBf16(Silu(gate_up[i]) * gate_up[inter + i]);
      for (int64_t n = 0; n < h; ++n) {
        const float y2 = RoundBf16(DotBf16(act.data(), wd + n * inter, inter));
        out[n] += static_cast<double>(weights[j]) * y2;
        allowance[n] += std::abs(static_cast<double>(weights[j])) * UlpBf16(y2);
      }
    }
    if (c.shared == 0) continue;
    std::vector<float> shared_act(shared_inter);
    for (int64_t i = 0; i < shared_inter; ++i) {
      const int64_t row = device != nullptr ? device->offsets[experts + i / inter] + t : -1;
      const double gate = gate_up_at(row, i % inter, DotBf16(xt.data(), w.shared_gate.data() + i * h, h));
      const double up = gate_up_at(row, inter + i % inter, DotBf16(xt.data(), w.shared_up.data() + i * h, h));
      shared_act[i] = RoundBf16(Silu(gate) * up);
    }
    for (int64_t n = 0; n < h; ++n) {
      const uint16_t* row = w.shared_down.data() + n * shared_inter;
      out[n] += DotBf16(shared_act.data(), row, shared_inter);
      for (int e = 0; e < c.shared; ++e) {
        allowance[n] += UlpBf16(RoundBf16(DotBf16(shared_act.data() + e * inter, row + e * inter, inter)));
      }
    }
  }
  return ref;
}

// fused_silu_mul: the gate_up product writes the activation (as the engine runs a layer); otherwise it
// writes gate_up and LaunchMoeSiluMul makes the activation.
void ExpectLayerMatchesCpu(const LayerCase& c, const Experts& w, int64_t tokens, bool fused_silu_mul, Rng& rng) {
  SCOPED_TRACE(::testing::Message() << c.name << " tokens " << tokens);
  const int experts = static_cast<int>(c.router.n_routed_experts);
  const int top_k = static_cast<int>(c.router.num_experts_per_tok);
  const int64_t h = c.hidden, inter = c.intermediate, pairs = tokens * top_k, rows = tokens * (top_k + c.shared);
  std::vector<float> logits, bias;
  ASSERT_NO_FATAL_FAILURE(DrawRouterInputs(rng, c.router, tokens, c.bias, Logits::kContinuous, &logits, &bias));
  const std::vector<uint16_t> x = RandomBf16(rng, tokens * h);

  DeviceBuffer<float> d_logits(logits);
  DeviceBuffer<float> d_bias(c.bias ? bias : std::vector<float>{0.0f});
  DeviceBuffer<uint16_t> d_x(x), d_y1(fused_silu_mul ? 0 : rows * 2 * inter), d_act(rows * inter), d_y2(rows * h),
      d_out(tokens * h);
  DeviceBuffer<int32_t> d_ids(pairs), d_used(std::vector<int32_t>{0});
  DeviceBuffer<float> d_weights(pairs);
  RoutingOnDevice d(tokens, top_k, experts, c.shared);
  for (cudaError_t e : {w.d_gate_up.error(), w.d_down.error(), d_logits.error(), d_bias.error(), d_x.error(),
                        d_y1.error(), d_act.error(), d_y2.error(), d_out.error(), d_ids.error(), d_used.error(),
                        d_weights.error(), d.workspace.error()}) {
    ASSERT_CUDA_OK(e);
  }
  ASSERT_CUDA_OK(d.Carve(tokens, top_k, experts, c.shared, MoeDefaultTileRows(tokens, top_k, experts, c.shared)));
  for (const auto* b : {&d_y1, &d_act, &d_y2, &d_out}) ASSERT_CUDA_OK(b->Poison());

  cudaStream_t stream;  // a blocking stream: ordered after the poisoning memsets
  ASSERT_CUDA_OK(cudaStreamCreate(&stream));
  // As the engine runs a MoE layer: routed and shared experts in the same grouped products.
  auto layer = [&]() -> cudaError_t {
    cudaError_t e;
    if ((e = LaunchMoeRoute(d_logits.get(), c.bias ? d_bias.get() : nullptr, cuda::MoeGateParamsFor(c.router),
                            nullptr, d_ids.get(), d_weights.get(), d.routing, d_used.get(), stream)) != cudaSuccess) {
      return e;
    }
    if (fused_silu_mul) {
      if ((e = LaunchMoeGroupedGemm({Bf16(d_x), true, Bf16(w.d_gate_up), inter, h, Bf16(d_act), /*silu_mul=*/true},
                                    d.routing, stream)) != cudaSuccess) return e;
    } else {
      if ((e = LaunchMoeGroupedGemm({Bf16(d_x), true, Bf16(w.d_gate_up), 2 * inter, h, Bf16(d_y1)}, d.routing,
                                    stream)) != cudaSuccess) return e;
      if ((e = LaunchMoeSiluMul(Bf16(d_y1), rows, inter, d.routing.expert_offsets + experts + c.shared, Bf16(d_act),
                                stream)) != cudaSuccess) return e;
    }
    // The route is two or three launches back: as in the engine, the down product reads the routing
    // before its wait.
    if ((e = LaunchMoeGroupedGemm({Bf16(d_act), false, Bf16(w.d_down), h, inter, Bf16(d_y2), /*silu_mul=*/false,
                                   /*routing_ready=*/true},
                                  d.routing, stream)) != cudaSuccess) return e;
    return LaunchMoeCombine(Bf16(d_y2), d_weights.get(), d.routing, {}, h, Bf16(d_out), stream);
  };
  ASSERT_CUDA_OK(layer());
  ASSERT_CUDA_OK(cudaStreamSynchronize(stream));
  std::vector<uint16_t> eager;
  ASSERT_CUDA_OK(d_out.Read(&eager));
  const int32_t used = ReadDevice(d_used.get(), 1)[0];

  DeviceGateUp device_gate_up;
  if (!fused_silu_mul) {
    ASSERT_CUDA_OK(d_y1.Read(&device_gate_up.y1));
    device_gate_up.slot_row = ReadDevice(d.routing.slot_row, pairs);
    device_gate_up.offsets = ReadDevice(d.routing.expert_offsets, experts + c.shared + 1);
  }
  const LayerReference want =
      ReferenceLayer(c, w, logits, bias, x, tokens, fused_silu_mul ? nullptr : &device_gate_up);
  if (!fused_silu_mul) ExpectClose(ToFloat(device_gate_up.y1), want.gate_up, "gate_up product");
  ExpectClose(ToFloat(eager), want.out, "layer output", want.allowance);
  const std::vector<int32_t> ids = ReadDevice(d_ids.get(), pairs);
  std::vector<bool> hit(experts, false);
  for (int32_t id : ids) {
    ASSERT_TRUE(id >= 0 && id < experts) << "expert id " << id;
    hit[id] = true;
  }
  EXPECT_EQ(used, std::count(hit.begin(), hit.end(), true)) << "routed experts used (shared ones not counted)";

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

// Parameter: the gate_up product ends in the SiLU-and-mul (silu_mul, what the engine runs), or the
// separate LaunchMoeSiluMul follows it (what the dense MLP still uses).
class MoeLayerTest : public ::testing::TestWithParam<bool> {};

TEST_P(MoeLayerTest, MatchesCpuLoopEagerAndInAGraph) {
  COHORT_SKIP_WITHOUT_GPU();
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  Rng rng(seed);
  const LayerCase v2_lite{"V2-Lite", V2LiteRouter(), 2048, 1408, false, /*shared=*/2};
  const LayerCase v3_small{"V3 routing, small experts",
                           RouterConfig(64, 8, 8, 4, ScoringFunc::kSigmoid, TopkMethod::kNoAuxTc, true, 2.5), 1024,
                           256, true, /*shared=*/1};
  const LayerCase v2_group{"V2 group-limited routing, no shared experts", V2GroupRouter(), 512, 256, false,
                           /*shared=*/0};
  // All of V3's 256 routed experts and its shared one (257 experts in the grouped products), small.
  const LayerCase v3_tiny{"V3 routing, tiny experts", V3Router(), 256, 128, true, /*shared=*/1};
  for (const LayerCase* c : {&v2_lite, &v3_small, &v2_group, &v3_tiny}) {
    const Experts w(ExpertShapes{c->name, static_cast<int>(c->router.n_routed_experts),
                                 static_cast<int>(c->router.num_experts_per_tok), c->hidden, c->intermediate,
                                 c->shared},
                    rng);
    for (int64_t tokens : {int64_t{1}, int64_t{37}, int64_t{300}, int64_t{1500}}) {
      ExpectLayerMatchesCpu(*c, w, tokens, GetParam(), rng);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(SiluMul, MoeLayerTest, ::testing::Bool(),
                         [](const auto& info) { return info.param ? "Fused" : "Separate"; });

}  // namespace
}  // namespace cohort
