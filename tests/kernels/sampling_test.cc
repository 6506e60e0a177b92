// Device sampling (kernels/sampling.h, worker/model/cuda/device_sampler.h) against the CPU
// Sampler on fresh random logits: greedy rows must match exactly (ties included), sampled rows
// must draw the CPU's token for the same uniform number, logprobs and top logprobs must agree.
// Weights are float exponentials on both sides and sums are double in different orders, so a
// sampled token may differ only where the CPU's decision was a near-tie: a cumulative sum within
// 1e-6 (relative) of its target (top-p's or the draw's), or a weight within 1e-6 of min_p. Such
// rows are counted and must stay rare.
#include "kernels/sampling.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tests/testing/gpu.h"
#include "worker/model/cuda/device_sampler.h"
#include "worker/sampling/sampler.h"

namespace cohort {
namespace {

using testing::DeviceVector;

constexpr double kNearTie = 1e-6;
constexpr double kLogprobTolerance = 1e-4;

// ---------------------------------------------------------------------------------------------
// Inputs

enum class Logits {
  kNormal1,    // N(0, 1): flat, top-p keeps most of the vocabulary
  kNormal4,    // N(0, 4): peaked like a language model's
  kNormal12,   // N(0, 12): very peaked
  kBf16,       // N(0, 3) rounded to bfloat16: ties between tokens are common
  kHalves,     // N(0, 3) rounded to multiples of 0.5: large groups of equal logits
  kFewLevels,  // three values: huge ties at every cut
};
constexpr Logits kAllLogits[] = {Logits::kNormal1, Logits::kNormal4, Logits::kNormal12,
                                 Logits::kBf16,    Logits::kHalves,  Logits::kFewLevels};

const char* Name(Logits kind) {
  switch (kind) {
    case Logits::kNormal1: return "normal1";
    case Logits::kNormal4: return "normal4";
    case Logits::kNormal12: return "normal12";
    case Logits::kBf16: return "bf16";
    case Logits::kHalves: return "halves";
    case Logits::kFewLevels: return "few-levels";
  }
  return "?";
}

float RandomLogit(Logits kind, std::mt19937_64& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  switch (kind) {
    case Logits::kNormal1: return normal(rng);
    case Logits::kNormal4: return 4.0f * normal(rng);
    case Logits::kNormal12: return 12.0f * normal(rng);
    case Logits::kBf16: {
      const float x = 3.0f * normal(rng);
      uint32_t bits;
      std::memcpy(&bits, &x, sizeof bits);
      bits &= 0xffff0000u;
      float y;
      std::memcpy(&y, &bits, sizeof y);
      return y;
    }
    case Logits::kHalves: return std::round(6.0f * normal(rng)) / 2.0f;
    case Logits::kFewLevels: return static_cast<float>(static_cast<int>(rng() % 3)) - 1.0f;
  }
  return 0.0f;
}

// Calls row(r) for every r in [0, rows), spread over the machine's cores. The CPU's share of these tests
// (drawing rows of 100k random logits, the CPU Sampler's and the reference's draws over them) takes
// milliseconds a row and was most of their time; the GPU machines have many cores.
template <class F>
void ForEachRowOnAllCores(int rows, const F& row) {
  const int threads = std::min<int>(rows, std::max(1u, std::thread::hardware_concurrency()));
  std::vector<std::thread> pool;
  for (int i = 0; i < threads; ++i) {
    pool.emplace_back([&, i] {
      for (int r = i; r < rows; r += threads) row(r);
    });
  }
  for (std::thread& t : pool) t.join();
}

// rows x stride floats; the padding after each row's vocab values is NaN, which must never be read.
// Each row from a generator of its own, seeded from `rng`.
std::vector<float> RandomLogits(int rows, int64_t stride, int vocab, Logits kind, std::mt19937_64& rng) {
  std::vector<float> logits(static_cast<size_t>(rows) * stride, std::numeric_limits<float>::quiet_NaN());
  std::vector<uint64_t> seeds(rows);
  for (uint64_t& seed : seeds) seed = rng();
  ForEachRowOnAllCores(rows, [&](int r) {
    std::mt19937_64 row_rng(seeds[r]);
    for (int t = 0; t < vocab; ++t) logits[static_cast<size_t>(r) * stride + t] = RandomLogit(kind, row_rng);
  });
  return logits;
}

// Settings for one row, drawn from a wide mix (or only greedy ones).
SamplingConfig RandomConfig(int vocab, bool greedy, std::mt19937_64& rng) {
  auto pick = [&](auto values) { return values[rng() % values.size()]; };
  SamplingConfig c;
  c.seed = rng();
  c.top_logprobs = rng() % 3 == 0 ? static_cast<int32_t>(rng() % (kMaxTopLogprobs + 1)) : 0;
  if (rng() % 5 == 0) {
    c.repetition_penalty = pick(std::vector<float>{0.8f, 1.0f, 1.3f});
    c.presence_penalty = pick(std::vector<float>{0.0f, 0.5f, -0.4f});
    c.frequency_penalty = pick(std::vector<float>{0.0f, 0.3f, 1.5f});
  }
  if (greedy || rng() % 6 == 0) {
    c.temperature = 0.0f;
    return c;
  }
  c.temperature = pick(std::vector<float>{0.05f, 0.3f, 0.7f, 1.0f, 1.6f});
  c.top_k = pick(std::vector<int32_t>{0, 0, 0, 1, 5, 50, 1000, vocab - 1, vocab, vocab + 7,
                                      1 + static_cast<int32_t>(rng() % static_cast<uint64_t>(vocab))});
  if (c.top_k < 0) c.top_k = 0;
  c.top_p = pick(std::vector<float>{1.0f, 1.0f, 0.95f, 0.9f, 0.5f, 0.1f, 0.999f});
  c.min_p = pick(std::vector<float>{0.0f, 0.0f, 0.0f, 0.01f, 0.1f, 0.5f});
  return c;
}

std::vector<int32_t> RandomPrompt(int vocab, std::mt19937_64& rng) {
  std::vector<int32_t> prompt(1 + rng() % 200);
  for (auto& t : prompt) t = static_cast<int32_t>(rng() % static_cast<uint64_t>(vocab));
  return prompt;
}

// ---------------------------------------------------------------------------------------------
// The CPU side

// Sampler::Sample's steps re-done on a copy of its inputs, reporting how close each decision of the
// draw came to going the other way (min over relative distances; infinity when nothing was close).
struct Reference {
  int32_t token = -1;
  double closest = std::numeric_limits<double>::infinity();
};

struct HigherFirst {
  const float* values;
  bool operator()(int32_t a, int32_t b) const { return values[a] > values[b] || (values[a] == values[b] && a < b); }
};

std::vector<float> Penalised(std::span<const float> logits, const Sampler& s) {
  std::vector<float> work(logits.begin(), logits.end());
  const SamplingConfig& c = s.config();
  for (int32_t t : s.history_tokens()) {
    float& logit = work[t];
    if (c.repetition_penalty != 1.0f) logit = logit > 0.0f ? logit / c.repetition_penalty : logit * c.repetition_penalty;
    const int32_t count = s.generated_count(t);
    if (count > 0) logit -= c.presence_penalty + c.frequency_penalty * static_cast<float>(count);
  }
  return work;
}

Reference ReferenceDraw(const std::vector<float>& work, const SamplingConfig& c, double uniform) {
  const int32_t vocab = static_cast<int32_t>(work.size());
  Reference ref;
  std::vector<int32_t> candidates(vocab);
  std::iota(candidates.begin(), candidates.end(), 0);
  if (c.top_k > 0 && c.top_k < vocab) {
    std::nth_element(candidates.begin(), candidates.begin() + c.top_k, candidates.end(), HigherFirst{work.data()});
    candidates.resize(c.top_k);
  }
  float best = -INFINITY;
  for (int32_t t : candidates) best = std::max(best, work[t]);
  std::vector<float> weights(vocab, 0.0f);
  for (int32_t t : candidates) weights[t] = std::exp((work[t] - best) / c.temperature);
  if (c.min_p > 0.0f) {
    for (int32_t t : candidates) {
      ref.closest = std::min(ref.closest, std::fabs(static_cast<double>(weights[t]) - c.min_p) / c.min_p);
    }
    std::erase_if(candidates, [&](int32_t t) { return weights[t] < c.min_p; });
  }
  if (c.top_p < 1.0f) {
    double mass = 0.0;
    for (int32_t t : candidates) mass += weights[t];
    const double target = c.top_p * mass;
    std::sort(candidates.begin(), candidates.end(), HigherFirst{weights.data()});
    double cumulative = 0.0;
    size_t keep = 0;
    while (keep < candidates.size() && cumulative < target) {
      cumulative += weights[candidates[keep++]];
      ref.closest = std::min(ref.closest, std::fabs(cumulative - target) / target);
    }
    candidates.resize(keep);
  }
  std::sort(candidates.begin(), candidates.end());
  double total = 0.0;
  for (int32_t t : candidates) total += weights[t];
  const double target = uniform * total;
  double cumulative = 0.0;
  for (int32_t t : candidates) {
    if (weights[t] <= 0.0f) continue;
    cumulative += weights[t];
    if (target > 0.0) ref.closest = std::min(ref.closest, std::fabs(cumulative - target) / target);
    if (ref.token < 0 && cumulative > target) ref.token = t;
  }
  if (ref.token < 0) {  // the last possible
    for (int32_t t : candidates) {
      if (weights[t] > 0.0f) ref.token = t;
    }
  }
  return ref;
}

// log softmax(logits)[token], in double.
double LogProb(std::span<const float> logits, int32_t token) {
  const double max = *std::max_element(logits.begin(), logits.end());
  double sum = 0.0;
  for (float l : logits) sum += std::exp(l - max);
  return logits[token] - max - std::log(sum);
}

// Each row's device result against the CPU Sampler, which samples the same row with the same seed.
// Counts the sampled rows and the near-tie mismatches; a mismatch that is not a near-tie fails.
struct Tally {
  int sampled = 0;
  int near_tie_mismatches = 0;
};

// What the CPU makes of one row, worked out apart from the checks so that the rows of a launch can be
// worked out on all cores.
struct CpuRow {
  SamplingConfig config;
  SampledToken want;     // the CPU Sampler's token, logprob and top logprobs
  double uniform = 0;    // the number its draw used
  Reference reference;   // sampled rows: the test's own draw, and how close it came to a tie
  double logprob = NAN;  // log softmax of the device's token, when it is in the vocabulary
};

// `cpu` is in the state the device's Sampler was in before its BeginDeviceSample, and samples the row
// now; `token` is the device's.
CpuRow WorkOutCpuRow(Sampler& cpu, std::span<const float> logits, int32_t token) {
  CpuRow row;
  row.config = cpu.config();
  Sampler probe = cpu;  // draws the same uniform as the device's Sampler did, and sizes the counts
  row.uniform = probe.BeginDeviceSample(static_cast<int64_t>(logits.size()));
  row.want = cpu.Sample(logits);
  if (row.config.temperature != 0.0f) {
    row.reference = ReferenceDraw(Penalised(logits, probe), row.config, row.uniform);
  }
  if (token >= 0 && token < static_cast<int32_t>(logits.size())) row.logprob = LogProb(logits, token);
  return row;
}

// The device's result for one row against the CPU's. Returns false for an allowed near-tie mismatch.
bool ExpectSameAsCpu(const CpuRow& cpu, int vocab, int32_t token, float logprob,
                     std::span<const SamplingTopLogprob> top, Tally& tally, const std::string& what) {
  const SamplingConfig& c = cpu.config;
  const SampledToken& want = cpu.want;
  bool same = true;
  if (c.temperature == 0.0f) {
    EXPECT_EQ(token, want.token) << what << ": greedy";
  } else {
    ++tally.sampled;
    const Reference& ref = cpu.reference;
    EXPECT_EQ(ref.token, want.token) << what << ": the test's reference disagrees with Sampler";
    if (token != want.token) {
      same = false;
      if (ref.closest < kNearTie) {
        ++tally.near_tie_mismatches;
      } else {
        ADD_FAILURE() << what << ": device token " << token << ", CPU " << want.token << " (closest decision "
                      << ref.closest << " relative, T " << c.temperature << " top_k " << c.top_k << " top_p "
                      << c.top_p << " min_p " << c.min_p << " uniform " << cpu.uniform << ")";
      }
    }
  }
  if (token >= 0 && token < vocab) {
    EXPECT_NEAR(logprob, cpu.logprob, kLogprobTolerance) << what << ": logprob of " << token;
  } else {
    ADD_FAILURE() << what << ": token " << token << " outside the vocabulary";
  }
  EXPECT_EQ(top.size(), want.top.size()) << what;
  for (size_t i = 0; i < std::min(top.size(), want.top.size()); ++i) {
    EXPECT_EQ(top[i].token, want.top[i].first) << what << ": top " << i;
    EXPECT_NEAR(top[i].logprob, want.top[i].second, kLogprobTolerance) << what << ": top " << i;
  }
  return same;
}

void ExpectNearTiesRare(const Tally& tally) {
  EXPECT_LE(tally.near_tie_mismatches, std::max(1, tally.sampled / 100))
      << tally.near_tie_mismatches << " near-tie mismatches in " << tally.sampled << " sampled rows";
}

// ---------------------------------------------------------------------------------------------
// One launch of the kernel over a set of rows, and its check.

// Rows sampled in one launch: each row's CPU Sampler, its twin in the same state (which draws the
// uniform number the device is given) and the kernel's inputs.
struct RowSet {
  explicit RowSet(int vocab) : vocab(vocab) {}

  int vocab;
  std::vector<std::unique_ptr<Sampler>> cpu, twin;
  std::vector<SamplingRowParams> params;
  std::vector<SamplingPenaltyToken> penalty_tokens;
  int32_t top_total = 0;
};

// Adds a row after `warm_up_steps` generated tokens, random ones recorded by both Samplers (presence
// and frequency penalties apply to them): BeginDeviceSample then EndDeviceSample moves a Sampler as
// Sample() would (tests/worker/sampling/sampler_test.cc), without a vocabulary of logits to draw and
// sample each step.
void AddRow(RowSet& set, const SamplingConfig& c, std::span<const int32_t> prompt, int warm_up_steps,
            std::mt19937_64& rng) {
  set.cpu.push_back(std::make_unique<Sampler>(c, 0, prompt));
  set.twin.push_back(std::make_unique<Sampler>(c, 0, prompt));
  Sampler& cpu = *set.cpu.back();
  Sampler& twin = *set.twin.back();
  for (int step = 0; step < warm_up_steps; ++step) {
    const auto token = static_cast<int32_t>(rng() % static_cast<uint64_t>(set.vocab));
    for (Sampler* s : {&cpu, &twin}) {
      s->BeginDeviceSample(set.vocab);
      s->EndDeviceSample(token);
    }
  }
  SamplingRowParams p = cuda::RowParams(c, twin.BeginDeviceSample(set.vocab));
  p.top_offset = set.top_total;
  set.top_total += std::min(c.top_logprobs, set.vocab);
  p.penalty_begin = static_cast<int32_t>(set.penalty_tokens.size());
  if (c.repetition_penalty != 1.0f || c.presence_penalty != 0.0f || c.frequency_penalty != 0.0f) {
    std::vector<int32_t> history(twin.history_tokens().begin(), twin.history_tokens().end());
    std::shuffle(history.begin(), history.end(), rng);  // any order
    for (int32_t t : history) set.penalty_tokens.push_back({t, twin.generated_count(t), 1});
  }
  p.penalty_end = static_cast<int32_t>(set.penalty_tokens.size());
  set.params.push_back(p);
}

// Samples the set's rows of `logits` (`stride` floats apart) in one launch and checks each row
// against its CPU Sampler.
void LaunchAndCheck(RowSet& set, const std::vector<float>& logits, int64_t stride, bool greedy_only, Tally& tally) {
  const int rows = static_cast<int>(set.params.size());
  DeviceVector<float> d_logits(logits);
  DeviceVector<SamplingRowParams> d_params(set.params);
  DeviceVector<SamplingPenaltyToken> d_penalty(set.penalty_tokens);
  const int32_t top_slots = set.top_total + 8;  // the extra slots must stay poisoned
  DeviceVector<SamplingRowResult> results(rows);  // poisoned: token -1, logprob NaN
  DeviceVector<SamplingTopLogprob> top(top_slots);
  SamplingArgs args;
  args.logits = d_logits.get();
  args.row_stride = stride;
  args.rows = rows;
  args.vocab = set.vocab;
  args.greedy_only = greedy_only;
  args.params = d_params.get();
  args.penalty_tokens = d_penalty.get();
  args.results = results.get();
  args.top = top.get();
  ASSERT_CUDA_OK(LaunchSampling(args, nullptr));
  ASSERT_CUDA_OK(cudaDeviceSynchronize());
  const std::vector<SamplingRowResult> got = results.ToHost();
  const std::vector<SamplingTopLogprob> got_top = top.ToHost();

  std::vector<CpuRow> cpu_rows(rows);
  ForEachRowOnAllCores(rows, [&](int r) {
    const std::span<const float> row(logits.data() + static_cast<size_t>(r) * stride, set.vocab);
    cpu_rows[r] = WorkOutCpuRow(*set.cpu[r], row, got[r].token);
  });
  for (int r = 0; r < rows; ++r) {
    const std::span<const SamplingTopLogprob> row_top(got_top.data() + set.params[r].top_offset,
                                                      std::min(set.params[r].top_logprobs, set.vocab));
    ExpectSameAsCpu(cpu_rows[r], set.vocab, got[r].token, got[r].logprob, row_top, tally, absl::StrCat("row ", r));
  }
  for (int32_t i = set.top_total; i < top_slots; ++i) {
    EXPECT_EQ(got_top[i].token, -1) << "top slot " << i << " past every row's entries was written";
  }
}

// A batch of fresh random rows with RandomConfig's settings.
struct KernelBatch {
  int vocab = 0;
  int rows = 0;
  int64_t stride = 0;
  Logits kind = Logits::kNormal4;
  bool greedy = false;       // every row greedy
  bool greedy_only = false;  // ... and no top logprobs, with the streaming kernel
  int warm_up_steps = 2;     // generated tokens before the checked one (penalties)
};

void RunAndCheck(const KernelBatch& b, std::mt19937_64& rng, Tally& tally) {
  SCOPED_TRACE(absl::StrCat("vocab ", b.vocab, ", ", b.rows, " rows, stride ", b.stride, ", ", Name(b.kind),
                            b.greedy_only ? ", greedy-only kernel" : ""));
  RowSet set(b.vocab);
  for (int r = 0; r < b.rows; ++r) {
    SamplingConfig c = RandomConfig(b.vocab, b.greedy, rng);
    if (b.greedy_only) c.top_logprobs = 0;
    AddRow(set, c, RandomPrompt(b.vocab, rng), b.warm_up_steps, rng);
  }
  LaunchAndCheck(set, RandomLogits(b.rows, b.stride, b.vocab, b.kind, rng), b.stride, b.greedy_only, tally);
}

// Token ids on both sides of every split of a row into 2..8 equal parts (plain and rounded to
// whole float4s): where the slices of a row that several blocks share may meet.
std::vector<int32_t> SplitNeighbours(int vocab) {
  std::vector<int32_t> ids;
  for (int parts = 2; parts <= 8; ++parts) {
    const int plain = (vocab + parts - 1) / parts;
    for (int slice : {plain, (plain + 3) / 4 * 4}) {
      for (int r = 1; r < parts; ++r) {
        for (int t : {r * slice - 1, r * slice}) {
          if (t >= 0 && t < vocab) ids.push_back(t);
        }
      }
    }
  }
  std::sort(ids.begin(), ids.end());
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  return ids;
}

struct Shape {
  int vocab;
  int rows;
};
// The real vocabularies (DeepSeek-V2 102400, V3 129280), the largest supported one, and small odd
// ones; a single row (its row spread over the most blocks) and many (over the fewest).
constexpr Shape kShapes[] = {{102400, 300}, {102400, 1}, {102401, 3}, {129280, 64}, {262144, 2}, {1, 5}, {2, 17},
                             {3, 33},       {7, 100},    {33, 300},   {1000, 257},  {4099, 64},  {50257, 20}};

int64_t StrideFor(int vocab, std::mt19937_64& rng) {
  // Aligned rows (float4 loads) and misaligned ones (an odd stride).
  return vocab + static_cast<int64_t>(rng() % 2 == 0 ? 0 : 1 + 2 * (rng() % 4));
}

// testing::FreshSeed (COHORT_TEST_SEED replays), printed.
uint64_t FreshSeed() {
  const uint64_t seed = testing::FreshSeed();
  std::printf("random seed %llu\n", static_cast<unsigned long long>(seed));
  return seed;
}

// ---------------------------------------------------------------------------------------------

// Greedy rows (with and without the greedy-only kernel) of every shape over logits with ties.
void CheckGreedy(std::span<const Shape> shapes) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  std::mt19937_64 rng(seed);
  Tally tally;
  for (const Shape& shape : shapes) {
    for (Logits kind : {Logits::kNormal4, Logits::kBf16, Logits::kFewLevels}) {
      for (bool greedy_only : {true, false}) {
        KernelBatch b{.vocab = shape.vocab, .rows = shape.rows, .stride = StrideFor(shape.vocab, rng), .kind = kind,
                      .greedy = true, .greedy_only = greedy_only};
        RunAndCheck(b, rng, tally);
      }
    }
  }
}

// RandomConfig's mix of sampled rows over each kind of logits, for every shape.
void CheckSampling(std::span<const Shape> shapes, std::span<const Logits> kinds) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  std::mt19937_64 rng(seed);
  Tally tally;
  for (const Shape& shape : shapes) {
    for (Logits kind : kinds) {
      KernelBatch b{.vocab = shape.vocab, .rows = shape.rows, .stride = StrideFor(shape.vocab, rng), .kind = kind};
      RunAndCheck(b, rng, tally);
    }
  }
  ExpectNearTiesRare(tally);
  std::printf("%d sampled rows, %d near-tie mismatches\n", tally.sampled, tally.near_tie_mismatches);
}

TEST(SamplingKernelTest, GreedyMatchesCpuIncludingTies) {
  COHORT_SKIP_WITHOUT_GPU();
  CheckGreedy(kShapes);
}

TEST(SamplingKernelTest, SeededSamplingMatchesCpu) {
  COHORT_SKIP_WITHOUT_GPU();
  CheckSampling(kShapes, kAllLogits);
}

// Many rows of one vocabulary with every combination of the truncations, at temperatures that make
// the kept sets small and large.
TEST(SamplingKernelTest, TruncationCombinationsMatchCpu) {
  COHORT_SKIP_WITHOUT_GPU();
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  std::mt19937_64 rng(seed);
  Tally tally;
  for (int vocab : {102400, 129280, 777}) {
    for (Logits kind : {Logits::kNormal1, Logits::kNormal4, Logits::kBf16}) {
      KernelBatch b{.vocab = vocab, .rows = 0, .stride = vocab, .kind = kind, .warm_up_steps = 1};
      // RandomConfig's mix at a larger batch: every top-k x top-p x min-p choice appears.
      b.rows = vocab > 1000 ? 200 : 300;
      RunAndCheck(b, rng, tally);
    }
  }
  ExpectNearTiesRare(tally);
}

// Greedy rows whose maximum appears several times, often where the slices of a row may meet: the
// lowest id wins, through both kernels, also when a repetition penalty (over a short or a long
// history) lowers the first copy. The general kernel's rows also return top logprobs, which then
// hold ties across slices.
TEST(SamplingKernelTest, GreedyTiesAcrossSlicesGoToTheLowestId) {
  COHORT_SKIP_WITHOUT_GPU();
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  std::mt19937_64 rng(seed);
  Tally tally;
  for (int vocab : {102400, 102401, 262144, 5000}) {
    const std::vector<int32_t> splits = SplitNeighbours(vocab);
    for (int rows : {1, 256}) {
      for (bool greedy_only : {true, false}) {
        SCOPED_TRACE(absl::StrCat("vocab ", vocab, ", ", rows, " rows", greedy_only ? ", greedy-only kernel" : ""));
        std::vector<float> logits = RandomLogits(rows, vocab, vocab, Logits::kNormal1, rng);
        RowSet set(vocab);
        for (int r = 0; r < rows; ++r) {
          const std::span<float> row(logits.data() + static_cast<size_t>(r) * vocab, vocab);
          const int copies = 2 + static_cast<int>(rng() % 4);
          for (int k = 0; k < copies; ++k) {
            const int32_t t = rng() % 2 == 0 ? splits[rng() % splits.size()] : static_cast<int32_t>(rng() % vocab);
            row[t] = 8.0f;
          }
          SamplingConfig c;
          c.temperature = 0.0f;
          c.top_logprobs = greedy_only ? 0 : 1 + static_cast<int32_t>(rng() % kMaxTopLogprobs);
          std::vector<int32_t> prompt;
          if (r % 3 != 0) {
            c.repetition_penalty = 1.5f;
            prompt.push_back(static_cast<int32_t>(std::max_element(row.begin(), row.end()) - row.begin()));
            if (r % 3 == 2) {  // a long history: more penalty tokens than a block has threads
              for (int i = 0; i < 3000; ++i) prompt.push_back(static_cast<int32_t>(rng() % vocab));
            }
          }
          AddRow(set, c, prompt, 0, rng);
        }
        LaunchAndCheck(set, logits, vocab, greedy_only, tally);
      }
    }
  }
}

// One launch of rows whose top-p or top-k cut falls inside a group of equal logits that is spread
// over the row (and over the places where slices may meet): the group's lowest ids are kept, as
// many as the CPU keeps. Logits in three levels: `high` tokens at 0, `middle` at -1, the rest at
// -30.
void CheckCutsInsideTieGroups(const Shape& shape, std::mt19937_64& rng, Tally& tally) {
  SCOPED_TRACE(absl::StrCat("vocab ", shape.vocab, ", ", shape.rows, " rows"));
  const int vocab = shape.vocab;
  const std::vector<int32_t> splits = SplitNeighbours(vocab);
  std::vector<float> logits(static_cast<size_t>(shape.rows) * vocab, -30.0f);
  RowSet set(vocab);
  for (int r = 0; r < shape.rows; ++r) {
    const int high = 1 + static_cast<int>(rng() % 40);
    const int middle = 100 + static_cast<int>(rng() % 3000);
    // Both groups get some of the split neighbours, then random places.
    std::vector<int32_t> places(splits);
    std::shuffle(places.begin(), places.end(), rng);
    places.resize(places.size() / 2);
    std::vector<int32_t> others(vocab);
    std::iota(others.begin(), others.end(), 0);
    std::shuffle(others.begin(), others.end(), rng);
    places.insert(places.end(), others.begin(), others.end());
    std::vector<bool> taken(vocab, false);
    std::vector<int32_t> members;
    for (int32_t t : places) {
      if (!taken[t]) {
        taken[t] = true;
        members.push_back(t);
        if (static_cast<int>(members.size()) == high + middle) break;
      }
    }
    std::shuffle(members.begin(), members.end(), rng);
    float* row = logits.data() + static_cast<size_t>(r) * vocab;
    for (int i = 0; i < high + middle; ++i) row[members[i]] = i < high ? 0.0f : -1.0f;

    SamplingConfig c;
    c.seed = rng();
    c.temperature = std::vector<float>{0.7f, 1.0f, 1.6f}[rng() % 3];
    c.top_logprobs = static_cast<int32_t>(rng() % (kMaxTopLogprobs + 1));
    // The weights as the CPU computes them, and where a cut after k + 0.5 tokens of a group lands.
    const double w_middle = std::exp(-1.0f / c.temperature);
    const double w_low = std::exp(-30.0f / c.temperature);
    const double mass = high + middle * w_middle + (vocab - high - middle) * w_low;
    switch (r % 4) {
      case 0:  // top-p inside the middle group
        c.top_p = static_cast<float>((high + (static_cast<double>(rng() % middle) + 0.5) * w_middle) / mass);
        break;
      case 1:  // top-p inside the high group
        c.top_p = static_cast<float>((static_cast<double>(rng() % high) + 0.5) / mass);
        break;
      case 2:  // top-k inside either group
        c.top_k = 1 + static_cast<int32_t>(rng() % (high + middle - 1));
        break;
      default: {  // both: top-k inside the middle group, top-p inside the part of it that top-k keeps
        c.top_k = high + 1 + static_cast<int32_t>(rng() % (middle - 1));
        const double kept_middle = c.top_k - high;
        const double k = static_cast<double>(rng() % (c.top_k - high));
        c.top_p = static_cast<float>((high + (k + 0.5) * w_middle) / (high + kept_middle * w_middle));
        break;
      }
    }
    if (!(c.top_p > 0.0f && c.top_p < 1.0f)) c.top_p = 1.0f;
    AddRow(set, c, {}, 0, rng);
  }
  LaunchAndCheck(set, logits, vocab, /*greedy_only=*/false, tally);
}

TEST(SamplingKernelTest, CutsInsideTieGroupsMatchCpu) {
  COHORT_SKIP_WITHOUT_GPU();
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  std::mt19937_64 rng(seed);
  Tally tally;
  for (const Shape shape : {Shape{102400, 1}, Shape{102400, 256}, Shape{129280, 3}, Shape{262144, 2}}) {
    CheckCutsInsideTieGroups(shape, rng, tally);
  }
  ExpectNearTiesRare(tally);
}

// The draw's extremes, against the reference directly (no near-tie allowance): uniform 0 picks the
// first kept token in id order, the largest uniform below 1 the last one (Sampler::Draw's fallback
// when rounding leaves the target at the top of the range), through the list and the whole-row
// paths. `rows` (a multiple of 8) cycle through four truncations and the two uniforms.
void CheckUniformExtremes(int vocab, int rows, std::mt19937_64& rng) {
  SCOPED_TRACE(absl::StrCat("vocab ", vocab, ", ", rows, " rows"));
  std::vector<SamplingConfig> configs(4);
  configs[1].min_p = 0.1f;
  configs[2].top_k = 20;
  configs[3].top_p = 0.5f;
  const std::vector<double> uniforms = {0.0, 0x1.fffffffffffffp-1};
  const std::vector<float> logits = RandomLogits(rows, vocab, vocab, Logits::kNormal1, rng);
  std::vector<SamplingRowParams> params(rows);
  for (int r = 0; r < rows; ++r) {
    const SamplingConfig& c = configs[r % configs.size()];
    params[r].uniform = uniforms[(r / configs.size()) % uniforms.size()];
    params[r].top_k = c.top_k;
    params[r].top_p = c.top_p;
    params[r].min_p = c.min_p;
  }
  DeviceVector<float> d_logits(logits);
  DeviceVector<SamplingRowParams> d_params(params);
  DeviceVector<SamplingRowResult> results(rows);
  SamplingArgs args;
  args.logits = d_logits.get();
  args.row_stride = vocab;
  args.rows = rows;
  args.vocab = vocab;
  args.params = d_params.get();
  args.results = results.get();
  ASSERT_CUDA_OK(LaunchSampling(args, nullptr));
  const std::vector<SamplingRowResult> got = results.ToHost();
  for (int r = 0; r < rows; ++r) {
    const std::vector<float> row(logits.begin() + static_cast<int64_t>(r) * vocab,
                                 logits.begin() + static_cast<int64_t>(r + 1) * vocab);
    EXPECT_EQ(got[r].token, ReferenceDraw(row, configs[r % configs.size()], params[r].uniform).token)
        << "row " << r << ", uniform " << params[r].uniform;
  }
}

TEST(SamplingKernelTest, UniformExtremesPickTheFirstAndLastKeptTokens) {
  COHORT_SKIP_WITHOUT_GPU();
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  std::mt19937_64 rng(seed);
  for (int vocab : {102400, 1000, 7}) CheckUniformExtremes(vocab, 8, rng);
}

// ---------------------------------------------------------------------------------------------
// The row split. A launch takes it when rows * ceil(vocab / 40960) exceeds twice the SM count
// (kernels/sampling.cu, LaunchSampling), else the cluster split. These batches take it on any
// device of fewer than 140 SMs (an H200 has 132), and are no larger than that needs: their float64
// references on the host are most of the test's time. So do the 256- and 300-row batches of
// 102400 and more above, while their few-row batches take the cluster split.
constexpr Shape kRowSplitShapes[] = {{102400, 100}, {129280, 80}, {262144, 40}, {50257, 140},
                                     {1000, 300},   {7, 300},     {1, 300}};

TEST(SamplingKernelTest, RowSplitGreedyMatchesCpuIncludingTies) {
  COHORT_SKIP_WITHOUT_GPU();
  CheckGreedy(kRowSplitShapes);
}

// RandomConfig's mix (penalties, top logprobs, every truncation): over flat logits most rows keep
// too many tokens to gather and draw over the row; over peaked ones top-k and top-p gather their
// candidates; halves put cuts inside groups of equal logits.
TEST(SamplingKernelTest, RowSplitSamplingMatchesCpu) {
  COHORT_SKIP_WITHOUT_GPU();
  constexpr Logits kKinds[] = {Logits::kNormal1, Logits::kNormal4, Logits::kHalves};
  CheckSampling(kRowSplitShapes, kKinds);
}

// Long histories under every penalty: thousands of penalised tokens a row (more than a block has
// threads; several in most 128-token draw chunks), the maximum among them in greedy rows, sampled
// over flat logits so that the draw over the whole row meets them, and through top-k's list.
TEST(SamplingKernelTest, RowSplitPenaltiesOverLongHistoriesMatchCpu) {
  COHORT_SKIP_WITHOUT_GPU();
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  std::mt19937_64 rng(seed);
  Tally tally;
  const int vocab = 102400;
  const int rows = 100;
  const std::vector<float> logits = RandomLogits(rows, vocab, vocab, Logits::kNormal1, rng);
  RowSet set(vocab);
  for (int r = 0; r < rows; ++r) {
    const std::span<const float> row(logits.data() + static_cast<size_t>(r) * vocab, vocab);
    SamplingConfig c;
    c.seed = rng();
    c.repetition_penalty = 1.3f;
    c.presence_penalty = 0.5f;
    c.frequency_penalty = 0.3f;
    c.top_logprobs = r % 2 == 0 ? 5 : 0;
    switch (r % 5) {
      case 0: c.temperature = 0.0f; break;  // the argmax of the penalised logits
      case 1: c.top_p = 0.95f; break;       // the draw over the row
      case 2: c.top_k = 50; break;          // the list
      case 3:
        c.temperature = 0.7f;
        c.min_p = 0.05f;
        break;
      default: c.temperature = 1.3f; break;  // every token kept
    }
    std::vector<int32_t> prompt(2000 + rng() % 4000);
    for (int32_t& t : prompt) t = static_cast<int32_t>(rng() % vocab);
    if (r % 5 == 0) prompt.push_back(static_cast<int32_t>(std::max_element(row.begin(), row.end()) - row.begin()));
    AddRow(set, c, prompt, /*warm_up_steps=*/1, rng);
  }
  LaunchAndCheck(set, logits, vocab, /*greedy_only=*/false, tally);
  ExpectNearTiesRare(tally);
}

TEST(SamplingKernelTest, RowSplitCutsInsideTieGroupsMatchCpu) {
  COHORT_SKIP_WITHOUT_GPU();
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  std::mt19937_64 rng(seed);
  Tally tally;
  for (const Shape shape : {Shape{102400, 100}, Shape{129280, 80}, Shape{262144, 40}}) {
    CheckCutsInsideTieGroups(shape, rng, tally);
  }
  ExpectNearTiesRare(tally);
}

TEST(SamplingKernelTest, RowSplitUniformExtremesPickTheFirstAndLastKeptTokens) {
  COHORT_SKIP_WITHOUT_GPU();
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  std::mt19937_64 rng(seed);
  for (const Shape shape : {Shape{102400, 100}, Shape{262144, 48}, Shape{1000, 300}, Shape{7, 400}}) {
    CheckUniformExtremes(shape.vocab, shape.rows, rng);
  }
}

// Rows of 102400 logits that take the row split (120 of them: on devices of fewer than 180 SMs),
// each built by fill(r, row, rng) from a row of N(0, 1) logits and sampled with the settings
// config(r, rng) returns (and a fresh seed), in one launch, against the CPU.
template <class Fill, class Config>
void CheckBuiltRowSplitRows(const Fill& fill, const Config& config) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  std::mt19937_64 rng(seed);
  Tally tally;
  const int vocab = 102400;
  const int rows = 120;
  std::vector<float> logits = RandomLogits(rows, vocab, vocab, Logits::kNormal1, rng);
  RowSet set(vocab);
  for (int r = 0; r < rows; ++r) {
    fill(r, std::span<float>(logits.data() + static_cast<size_t>(r) * vocab, vocab), rng);
    SamplingConfig c = config(r, rng);
    c.seed = rng();
    AddRow(set, c, {}, 0, rng);
  }
  LaunchAndCheck(set, logits, vocab, /*greedy_only=*/false, tally);
  ExpectNearTiesRare(tally);
}

// Top-p in the row split gathers the tokens that weigh at least 2^-10 of the best into shared memory
// while it histograms them, and sums the lighter ones apart (kernels/sampling.cu,
// TopPLevelGathering). Rows built for each way that ends, at temperature 1: a few hundred heavy
// tokens holding the cut (the select and the draw in the list); thousands (more than the list
// holds); and a few heavy tokens over a plateau of light ones that holds most of the weight, so
// that the cut lies among tokens the first pass left out of its histogram and the pass runs again.
TEST(SamplingKernelTest, RowSplitTopPCutsAmongHeavyAndLightTokensMatchCpu) {
  COHORT_SKIP_WITHOUT_GPU();
  std::normal_distribution<float> normal(0.0f, 1.0f);
  // Heavy tokens within 0.6 of the best (weights above 0.5), the plateau 8 to 14 below it (weights
  // under 2^-10 = e^-6.9); 102400 x e^-8 outweighs 20 heavy tokens.
  auto fill = [&](int r, std::span<float> row, std::mt19937_64& rng) {
    const int heavy = std::vector<int>{300, 5000, 20}[r % 3];
    const float plateau = r % 3 == 2 ? -8.0f : -14.0f;
    for (float& v : row) v = plateau + 0.2f * std::clamp(normal(rng), -2.5f, 2.5f);
    std::vector<int32_t> ids(row.size());
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), rng);
    for (int i = 0; i < heavy; ++i) row[ids[i]] = 0.1f * std::clamp(normal(rng), -3.0f, 3.0f);
  };
  CheckBuiltRowSplitRows(fill, [](int r, std::mt19937_64&) {
    SamplingConfig c;
    c.top_p = std::vector<float>{0.5f, 0.9f, 0.99f}[(r / 3) % 3];
    c.top_logprobs = r % 2 == 0 ? 3 : 0;
    return c;
  });
}

// Top-k and the top logprobs in the row split start from each thread's largest value in the first
// pass (kernels/sampling.cu, GatherAboveTops): the k-th largest of those bounds the cut from below.
// Here a row's largest values all lie among the tokens one thread reads (the first four of every
// 2048, as the row block's 512 threads stream a float4 each), so that the bound sits far below the
// cut and many more tokens than k lie above it; and half the rows repeat two values a hundred
// times each there, so that ties straddle the cut.
TEST(SamplingKernelTest, RowSplitTopKWhoseLargestValuesOneThreadReadsMatchesCpu) {
  COHORT_SKIP_WITHOUT_GPU();
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto fill = [&](int r, std::span<float> row, std::mt19937_64& rng) {
    for (size_t q = 0; q < row.size() / 4; q += 512) {  // the quads thread 0 reads
      for (size_t e = 0; e < 4; ++e) row[4 * q + e] = r % 2 == 0 ? 8.0f + normal(rng) : (q / 512 < 25 ? 9.0f : 8.0f);
    }
  };
  CheckBuiltRowSplitRows(fill, [](int r, std::mt19937_64& rng) {
    SamplingConfig c;
    c.top_k = std::vector<int32_t>{1, 20, 50, 256, 300}[r % 5];
    c.top_logprobs = static_cast<int32_t>(rng() % (kMaxTopLogprobs + 1));
    return c;
  });
}

// The same rows through both splits: all at once (the row split) and one at a time (a one-row
// launch takes the cluster split, 8 blocks a row). Only the order of double sums differs, so the
// tokens and top-logprob ids must be equal, and the logprobs close.
TEST(SamplingKernelTest, RowAndClusterSplitsPickTheSameTokens) {
  COHORT_SKIP_WITHOUT_GPU();
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  std::mt19937_64 rng(seed);
  const std::pair<Shape, Logits> batches[] = {{{102400, 100}, Logits::kNormal4}, {{262144, 40}, Logits::kBf16}};
  for (const auto& [shape, kind] : batches) {
    SCOPED_TRACE(absl::StrCat("vocab ", shape.vocab, ", ", shape.rows, " rows, ", Name(kind)));
    RowSet set(shape.vocab);
    for (int r = 0; r < shape.rows; ++r) {
      AddRow(set, RandomConfig(shape.vocab, /*greedy=*/false, rng), RandomPrompt(shape.vocab, rng), 1, rng);
    }
    DeviceVector<float> d_logits(RandomLogits(shape.rows, shape.vocab, shape.vocab, kind, rng));
    DeviceVector<SamplingRowParams> d_params(set.params);
    DeviceVector<SamplingPenaltyToken> d_penalty(set.penalty_tokens);
    DeviceVector<SamplingRowResult> together(shape.rows), alone(shape.rows);
    DeviceVector<SamplingTopLogprob> together_top(set.top_total), alone_top(set.top_total);
    SamplingArgs args;
    args.logits = d_logits.get();
    args.row_stride = shape.vocab;
    args.rows = shape.rows;
    args.vocab = shape.vocab;
    args.params = d_params.get();
    args.penalty_tokens = d_penalty.get();
    args.results = together.get();
    args.top = together_top.get();
    ASSERT_CUDA_OK(LaunchSampling(args, nullptr));
    for (int r = 0; r < shape.rows; ++r) {
      SamplingArgs one = args;
      one.logits += static_cast<int64_t>(r) * shape.vocab;
      one.rows = 1;
      one.params += r;
      one.results = alone.get() + r;
      one.top = alone_top.get();  // the rows' top_offset places them
      ASSERT_CUDA_OK(LaunchSampling(one, nullptr));
    }
    ASSERT_CUDA_OK(cudaDeviceSynchronize());
    const std::vector<SamplingRowResult> a = together.ToHost(), b = alone.ToHost();
    for (int r = 0; r < shape.rows; ++r) {
      EXPECT_EQ(a[r].token, b[r].token) << "row " << r;
      EXPECT_NEAR(a[r].logprob, b[r].logprob, kLogprobTolerance) << "row " << r;
    }
    const std::vector<SamplingTopLogprob> at = together_top.ToHost(), bt = alone_top.ToHost();
    for (int32_t i = 0; i < set.top_total; ++i) {
      EXPECT_EQ(at[i].token, bt[i].token) << "top slot " << i;
      EXPECT_NEAR(at[i].logprob, bt[i].logprob, kLogprobTolerance) << "top slot " << i;
    }
  }
}

TEST(SamplingKernelTest, RejectsSizesOutsideTheLimits) {
  COHORT_SKIP_WITHOUT_GPU();
  DeviceVector<float> logits(std::vector<float>(16, 0.0f));
  DeviceVector<SamplingRowParams> params(std::vector<SamplingRowParams>(1));
  DeviceVector<SamplingRowResult> results(1);
  SamplingArgs args;
  args.logits = logits.get();
  args.params = params.get();
  args.results = results.get();
  args.rows = 1;
  args.vocab = 16;
  args.row_stride = 15;
  EXPECT_EQ(LaunchSampling(args, nullptr), cudaErrorInvalidValue);
  args.row_stride = 16;
  args.rows = kSamplingMaxRows + 1;
  EXPECT_EQ(LaunchSampling(args, nullptr), cudaErrorInvalidValue);
  args.rows = 1;
  args.vocab = kSamplingMaxVocab + 1;
  args.row_stride = args.vocab;
  EXPECT_EQ(LaunchSampling(args, nullptr), cudaErrorInvalidValue);
  args.vocab = 16;
  args.row_stride = 16;
  args.rows = 0;
  EXPECT_EQ(LaunchSampling(args, nullptr), cudaSuccess);  // nothing to do
  args.rows = 1;
  ASSERT_CUDA_OK(LaunchSampling(args, nullptr));
  ASSERT_CUDA_OK(cudaDeviceSynchronize());
  EXPECT_EQ(results.ToHost()[0].token, 0);  // all logits equal, sampled at temperature 1 with uniform 0
}

// ---------------------------------------------------------------------------------------------
// DeviceSampler: Prepare / Launch / Finish over several steps, against CPU Samplers in lockstep.

// A sampling kernel captured in a CUDA graph as a decode graph holds it: over a fixed logits buffer
// of every row the sampler takes, greedy or general.
class SamplingGraph {
 public:
  SamplingGraph(const cuda::DeviceSampler& device, const float* logits, int64_t stride, int32_t rows, bool greedy,
                cudaStream_t stream) {
    EXPECT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), cudaSuccess);
    const absl::Status recorded = device.Record(logits, stride, rows, greedy, stream);
    cudaGraph_t graph = nullptr;
    EXPECT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
    EXPECT_TRUE(recorded.ok()) << recorded;
    EXPECT_EQ(cudaGraphInstantiate(&exec_, graph, 0), cudaSuccess);
    cudaGraphDestroy(graph);
  }
  ~SamplingGraph() {
    if (exec_ != nullptr) cudaGraphExecDestroy(exec_);
  }
  cudaError_t Launch(cudaStream_t stream) const { return cudaGraphLaunch(exec_, stream); }

 private:
  cudaGraphExec_t exec_ = nullptr;
};

// Each step samples a random subset of the requests in a random order. `in_graph`: every step
// through Upload of all max_rows rows (those past the step's are padding), a replay of the graph of
// its kind (greedy_only or not) and Download, instead of Launch; half the steps then take greedy
// rows without top logprobs only, so both graphs run.
void ExpectStepsMatchCpuSamplers(bool in_graph) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  std::mt19937_64 rng(seed);
  cudaStream_t stream = nullptr;
  ASSERT_CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  for (const Shape shape : {Shape{129280, 96}, Shape{1000, 300}, Shape{5, 7}}) {
    SCOPED_TRACE(absl::StrCat("vocab ", shape.vocab));
    auto created = cuda::DeviceSampler::Create({.vocab = shape.vocab, .max_rows = shape.rows, .max_penalty_tokens = 100000});
    ASSERT_TRUE(created.ok()) << created.status();
    cuda::DeviceSampler& device = **created;
    const int64_t stride = shape.vocab + 3;
    // The requests: general ones, and (in a graph) as many greedy ones without top logprobs.
    std::vector<std::unique_ptr<Sampler>> cpu, gpu;
    for (int r = 0; r < (in_graph ? 2 : 1) * shape.rows; ++r) {
      SamplingConfig c = RandomConfig(shape.vocab, /*greedy=*/r >= shape.rows, rng);
      if (r >= shape.rows) c.top_logprobs = 0;
      const std::vector<int32_t> prompt = RandomPrompt(shape.vocab, rng);
      cpu.push_back(std::make_unique<Sampler>(c, r, prompt));
      gpu.push_back(std::make_unique<Sampler>(c, r, prompt));
    }
    std::unique_ptr<DeviceVector<float>> graph_logits;
    std::unique_ptr<SamplingGraph> greedy_graph, general_graph;
    if (in_graph) {
      graph_logits = std::make_unique<DeviceVector<float>>(std::vector<float>(shape.rows * stride, 0.0f));
      // One eager launch first sets the kernels' attributes outside a capture, as the engine's warm-up does.
      ASSERT_TRUE(device.Prepare({}).ok());
      ASSERT_TRUE(device.Upload(shape.rows, stream).ok());
      ASSERT_TRUE(device.Record(graph_logits->get(), stride, shape.rows, false, stream).ok());
      ASSERT_CUDA_OK(cudaStreamSynchronize(stream));
      greedy_graph = std::make_unique<SamplingGraph>(device, graph_logits->get(), stride, shape.rows, true, stream);
      general_graph = std::make_unique<SamplingGraph>(device, graph_logits->get(), stride, shape.rows, false, stream);
    }
    std::vector<bool> diverged(cpu.size(), false);  // after a near-tie mismatch the histories differ
    Tally tally;
    for (int step = 0; step < (in_graph ? 6 : 4); ++step) {
      SCOPED_TRACE(absl::StrCat("step ", step));
      // A different subset of the requests, in a different order, each step.
      const bool greedy_step = in_graph && step % 2 == 1;
      std::vector<int> order(shape.rows);
      std::iota(order.begin(), order.end(), greedy_step ? shape.rows : 0);
      std::shuffle(order.begin(), order.end(), rng);
      order.resize(1 + rng() % shape.rows);
      std::vector<Sampler*> samplers;
      for (int r : order) samplers.push_back(gpu[r].get());
      const std::vector<float> logits =
          RandomLogits(static_cast<int>(order.size()), stride, shape.vocab, kAllLogits[step % 6], rng);
      DeviceVector<float> d_logits(logits);
      ASSERT_TRUE(device.Prepare(samplers).ok());
      if (in_graph) {
        if (greedy_step) {
          EXPECT_TRUE(device.greedy_only());  // a general step's subset may be greedy too
        }
        ASSERT_CUDA_OK(cudaMemcpyAsync(graph_logits->get(), logits.data(), logits.size() * sizeof(float),
                                       cudaMemcpyHostToDevice, stream));
        ASSERT_TRUE(device.Upload(shape.rows, stream).ok());
        ASSERT_CUDA_OK((device.greedy_only() ? greedy_graph : general_graph)->Launch(stream));
        ASSERT_TRUE(device.Download(stream).ok());
      } else {
        ASSERT_TRUE(device.Launch(d_logits.get(), stride, stream).ok());
      }
      ASSERT_CUDA_OK(cudaStreamSynchronize(stream));
      std::vector<SampledToken> out(order.size());
      ASSERT_TRUE(device.Finish(samplers, out).ok());
      for (size_t i = 0; i < order.size(); ++i) {
        const int r = order[i];
        const std::span<const float> row(logits.data() + i * stride, shape.vocab);
        if (diverged[r]) {
          cpu[r]->Sample(row);
          continue;
        }
        std::vector<SamplingTopLogprob> top;
        for (const auto& [t, lp] : out[i].top) top.push_back({t, lp});
        const CpuRow cpu_row = WorkOutCpuRow(*cpu[r], row, out[i].token);
        if (!ExpectSameAsCpu(cpu_row, shape.vocab, out[i].token, out[i].logprob, top, tally,
                             absl::StrCat("request ", r))) {
          diverged[r] = true;
        }
      }
    }
    ExpectNearTiesRare(tally);
  }
  ASSERT_CUDA_OK(cudaStreamDestroy(stream));
}

TEST(DeviceSamplerTest, StepsMatchCpuSamplersWithMixedConfigs) {
  COHORT_SKIP_WITHOUT_GPU();
  ExpectStepsMatchCpuSamplers(/*in_graph=*/false);
}

// The decode graphs' form: a step of fewer rows than the graph's kernel takes, greedy or general.
TEST(DeviceSamplerTest, GraphStepsWithPaddingRowsMatchCpuSamplers) {
  COHORT_SKIP_WITHOUT_GPU();
  ExpectStepsMatchCpuSamplers(/*in_graph=*/true);
}

TEST(DeviceSamplerTest, RejectsBadSizesAndOutOfOrderCalls) {
  COHORT_SKIP_WITHOUT_GPU();
  EXPECT_EQ(cuda::DeviceSampler::Create(0, 4).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cuda::DeviceSampler::Create(kSamplingMaxVocab + 1, 4).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cuda::DeviceSampler::Create(100, kSamplingMaxRows + 1).status().code(), absl::StatusCode::kInvalidArgument);

  auto created = cuda::DeviceSampler::Create({.vocab = 100, .max_rows = 2, .max_penalty_tokens = 10});
  ASSERT_TRUE(created.ok()) << created.status();
  cuda::DeviceSampler& device = **created;
  SamplingConfig plain;
  plain.seed = 7;
  Sampler a(plain, 0, {}), b(plain, 0, {}), c(plain, 0, {});
  std::vector<Sampler*> three = {&a, &b, &c};
  EXPECT_EQ(device.Prepare(three).code(), absl::StatusCode::kInvalidArgument);

  DeviceVector<float> logits(std::vector<float>(200, 0.5f));
  EXPECT_EQ(device.Launch(logits.get(), 100, nullptr).code(), absl::StatusCode::kFailedPrecondition);
  std::vector<SampledToken> out(2);
  std::vector<Sampler*> two = {&a, &b};
  EXPECT_EQ(device.Finish(two, out).code(), absl::StatusCode::kFailedPrecondition);

  // Too much penalty history: refused before any sampler draws its number.
  SamplingConfig penalised = plain;
  penalised.repetition_penalty = 1.2f;
  std::vector<int32_t> prompt(20);
  std::iota(prompt.begin(), prompt.end(), 0);
  Sampler long_history(penalised, 0, prompt), fresh_twin(penalised, 0, prompt);
  std::vector<Sampler*> one = {&long_history};
  EXPECT_EQ(device.Prepare(one).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(long_history.BeginDeviceSample(100), fresh_twin.BeginDeviceSample(100));

  // The graph form's calls out of order or out of range.
  EXPECT_EQ(device.Download(nullptr).code(), absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE(device.Prepare(two).ok());
  EXPECT_EQ(device.Upload(1, nullptr).code(), absl::StatusCode::kInvalidArgument);  // fewer than prepared
  EXPECT_EQ(device.Upload(3, nullptr).code(), absl::StatusCode::kInvalidArgument);  // past max_rows
  EXPECT_EQ(device.Record(logits.get(), 100, 3, false, nullptr).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(device.Record(logits.get(), 99, 2, false, nullptr).code(), absl::StatusCode::kInvalidArgument);

  ASSERT_TRUE(device.Prepare(two).ok());
  EXPECT_EQ(device.Launch(logits.get(), 99, nullptr).code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(device.Prepare(two).ok());
  ASSERT_TRUE(device.Launch(logits.get(), 100, nullptr).ok());
  ASSERT_CUDA_OK(cudaStreamSynchronize(nullptr));
  std::vector<Sampler*> swapped = {&b, &a};
  EXPECT_EQ(device.Finish(swapped, out).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(device.Finish(two, out).ok());
}

}  // namespace
}  // namespace cohort
