// The CUDA engine against the references: transformers' logits for every fixture checkpoint
// (bf16 weights and activations here, so within bf16 tolerance rather than the CPU's 1e-3), the
// CPU engine's greedy tokens where the reference's choice is clear, batches and chunks against
// single runs, both prefill attention forms, sampling on the device, start-up errors, and the
// engine spread over two GPUs (expert parallelism) against the one-GPU engine.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <span>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tests/testing/engine_driver.h"
#include "tests/testing/fixtures.h"
#include "tests/testing/gpu.h"
#include "tests/testing/paths.h"
#include "tests/testing/safetensors_writer.h"
#include "worker/model/checkpoint.h"
#include "worker/model/engine.h"

namespace cohort {
namespace {

using testing::Fixture;
using testing::Generate;
using testing::Sequence;
using testing::SequencesFor;

// ||gpu - ref|| / ||ref|| per logits row: bf16 operands land between 1e-3 and 1e-2.
constexpr double kRelativeTolerance = 2e-2;
// Rows allowed past kRelativeTolerance, and how far. With bf16 activations a token whose router
// scores nearly tie in float32 can pick a different expert than transformers did: that row's
// logits then differ by more than rounding (0.07 to 0.27 seen on the H200 for a few of the
// fixtures' rows), while every row of a correct engine stays far from unrelated logits (~1.4).
constexpr double kOutlierShare = 0.1;
constexpr double kOutlierTolerance = 0.5;
// A reference argmax counts as clear when it leads the runner-up by this fraction of the row's scale.
constexpr double kClearMargin = 0.05;

std::unique_ptr<Engine> MakeEngine(const std::string& model, int64_t block_size, int64_t expanded_max = 0,
                                   int num_gpus = 1) {
  EngineOptions options;
  options.num_gpus = num_gpus;
  options.model_dir = model;
  options.device = "cuda";
  options.kv_block_size = block_size;
  options.num_kv_blocks = 64;
  options.max_batch_tokens = 256;
  options.max_sequences = 8;
  options.expanded_prefill_max_context = expanded_max;
  auto engine = CreateEngine(options);
  EXPECT_TRUE(engine.ok()) << engine.status();
  return engine.ok() ? std::move(engine).value() : nullptr;
}

// Per-row relative errors, judged together: most rows within bf16 tolerance, none wild.
class ErrorTally {
 public:
  void Add(double error, const std::string& where) {
    ++rows_;
    if (error <= kRelativeTolerance) return;
    ++outliers_;
    EXPECT_LE(error, kOutlierTolerance) << where;
  }
  ~ErrorTally() {
    EXPECT_LE(outliers_, kOutlierShare * rows_) << outliers_ << " of " << rows_ << " logits rows past "
                                                << kRelativeTolerance << " relative error";
  }

 private:
  int rows_ = 0, outliers_ = 0;
};

double RelativeError(const float* got, const float* ref, int64_t n) {
  double diff = 0, norm = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(got[i])) return INFINITY;
    diff += (static_cast<double>(got[i]) - ref[i]) * (static_cast<double>(got[i]) - ref[i]);
    norm += static_cast<double>(ref[i]) * ref[i];
  }
  return std::sqrt(diff / norm);
}

// Whether the reference row's best token leads the second by a clear margin.
bool ClearArgmax(const float* ref, int64_t n) {
  float best = -INFINITY, second = -INFINITY, scale = 0;
  for (int64_t i = 0; i < n; ++i) {
    scale = std::max(scale, std::abs(ref[i]));
    if (ref[i] > best) {
      second = best;
      best = ref[i];
    } else if (ref[i] > second) {
      second = ref[i];
    }
  }
  return best - second > kClearMargin * scale;
}

class CudaEngineFixtureTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    COHORT_SKIP_WITHOUT_GPU();
    fixture_ = testing::LoadFixture(GetParam());
  }
  // Teacher-forced runs of every case compared with transformers' logits row by row; with `copies`,
  // each case runs that many times in the batch (sequence i is case i % cases, joining at join[i]).
  void ExpectMatchesTransformers(Engine& engine, int64_t chunk, const std::vector<int>& join, int copies = 1) {
    std::vector<Sequence> seqs;
    for (int copy = 0; copy < copies; ++copy) {
      for (Sequence& s : SequencesFor(fixture_, /*teacher_forced=*/true)) seqs.push_back(std::move(s));
    }
    Generate(engine, seqs, chunk, join);
    int clear = 0;
    ErrorTally errors;
    for (size_t i = 0; i < seqs.size(); ++i) {
      const size_t c = i % fixture_.cases.size();
      for (size_t step = 0; step < seqs[i].run.logits.size(); ++step) {
        const float* ref = fixture_.LogitsRow(c, step);
        errors.Add(RelativeError(seqs[i].run.logits[step].data(), ref, fixture_.vocab_size),
                   absl::StrCat("sequence ", i, " (case ", c, ") step ", step));
        if (ClearArgmax(ref, fixture_.vocab_size)) {
          ++clear;
          EXPECT_EQ(seqs[i].run.generated[step], fixture_.cases[c].generated[step])
              << "sequence " << i << " (case " << c << ") step " << step;
        }
      }
    }
    EXPECT_GT(clear, 0) << "no step had a clear argmax: the token check tested nothing";
  }
  Fixture fixture_;
};

TEST_P(CudaEngineFixtureTest, SingleSequencesMatchTransformers) {
  auto engine = MakeEngine(fixture_.model_dir, 16);
  ASSERT_NE(engine, nullptr);
  ErrorTally errors;
  for (size_t c = 0; c < fixture_.cases.size(); ++c) {
    std::vector<Sequence> all = SequencesFor(fixture_, true);
    std::vector<Sequence> one = {all[c]};
    Generate(*engine, one, 1 << 20, {0});
    for (size_t step = 0; step < one[0].run.logits.size(); ++step) {
      errors.Add(RelativeError(one[0].run.logits[step].data(), fixture_.LogitsRow(c, step), fixture_.vocab_size),
                 absl::StrCat("case ", c, " step ", step));
    }
  }
}

// Staggered joins and 4-token prefill chunks mix prefill and decode in one step; decode-only steps
// of 3 sequences replay the 4-row graph with a padding row; block size 3 interleaves blocks.
TEST_P(CudaEngineFixtureTest, BatchedAndChunkedMatchTransformers) {
  auto engine = MakeEngine(fixture_.model_dir, 3);
  ASSERT_NE(engine, nullptr);
  ExpectMatchesTransformers(*engine, /*chunk=*/4, /*join=*/{0, 2, 3});
}

// Batches past the skinny GEMM's rows: eight copies of each case join three at a time, so steps mix
// prefills with 3-21 decodes, then decode-only steps of 24 and fewer rows replay graphs. Up to
// kRouterFoldMaxTokens rows (cuda_engine.cc) the router's logits come from the input projection and
// a product beside o_proj on the second stream, past it from the router product.
TEST_P(CudaEngineFixtureTest, ManySequencesMatchTransformers) {
  EngineOptions options;
  options.model_dir = fixture_.model_dir;
  options.device = "cuda";
  options.kv_block_size = 16;
  options.num_kv_blocks = 256;
  options.max_batch_tokens = 256;
  options.max_sequences = 24;
  auto engine = CreateEngine(options);
  ASSERT_TRUE(engine.ok()) << engine.status();
  const int copies = 8;
  std::vector<int> join;
  for (int i = 0; i < copies * static_cast<int>(fixture_.cases.size()); ++i) join.push_back(i / 3);
  ExpectMatchesTransformers(**engine, /*chunk=*/1 << 20, join, copies);
}

// Prefill chunks over the absorbed form (every context "too long" to expand) give the same logits.
TEST_P(CudaEngineFixtureTest, AbsorbedPrefillMatchesTransformers) {
  auto engine = MakeEngine(fixture_.model_dir, 16, /*expanded_max=*/1);
  ASSERT_NE(engine, nullptr);
  ExpectMatchesTransformers(*engine, /*chunk=*/5, /*join=*/{0, 1, 1});
}

// A workspace that holds the contexts of only a few chunks at a time: the expanded chunks of a step
// split into several groups, each gathered, expanded and attended on its own (three 4-token chunks
// share one group, then 8-token contexts take one each, then contexts past 12 go absorbed).
TEST_P(CudaEngineFixtureTest, ExpandedChunksInSeveralGroupsMatchTransformers) {
  auto engine = MakeEngine(fixture_.model_dir, 3, /*expanded_max=*/12);
  ASSERT_NE(engine, nullptr);
  ExpectMatchesTransformers(*engine, /*chunk=*/4, /*join=*/{0, 0, 0});
}

// Greedy sampling on the device picks each row's argmax, as Forward's host logits show it.
void ExpectDeviceSamplingFollowsLogits(Engine* engine, const Fixture& f) {
  ASSERT_NE(engine, nullptr);
  std::vector<int32_t> tables[3];
  std::vector<SequenceStep> batch;
  std::vector<std::unique_ptr<Sampler>> owned;
  std::vector<Sampler*> samplers;
  for (size_t c = 0; c < f.cases.size(); ++c) {
    const int64_t blocks = (f.cases[c].prompt.size() + 15) / 16;
    for (int64_t b = 0; b < blocks; ++b) tables[c].push_back(static_cast<int32_t>(c * 8 + b));
    batch.push_back({f.cases[c].prompt, 0, tables[c], true});
    SamplingConfig greedy;
    greedy.temperature = 0.0f;
    greedy.top_logprobs = 3;
    owned.push_back(std::make_unique<Sampler>(greedy, c, f.cases[c].prompt));
    samplers.push_back(owned.back().get());
  }
  std::vector<float> logits(batch.size() * f.vocab_size);
  ASSERT_TRUE(engine->Forward(batch, logits).ok());
  std::vector<SampledToken> tokens(batch.size());
  const absl::Status sampled = engine->ForwardAndSample(batch, samplers, tokens);
  ASSERT_TRUE(sampled.ok()) << sampled;
  for (size_t c = 0; c < batch.size(); ++c) {
    std::vector<float> row(logits.begin() + c * f.vocab_size, logits.begin() + (c + 1) * f.vocab_size);
    EXPECT_EQ(tokens[c].token, testing::Argmax(row)) << "case " << c;
    ASSERT_EQ(tokens[c].top.size(), 3u);
    EXPECT_EQ(tokens[c].top[0].first, tokens[c].token);
    EXPECT_LE(tokens[c].logprob, 0.0f);
  }
}

TEST_P(CudaEngineFixtureTest, DeviceSamplingFollowsLogits) {
  ExpectDeviceSamplingFollowsLogits(MakeEngine(fixture_.model_dir, 16).get(), fixture_);
}

// Decode steps replay graphs that end with the sampling kernel (one GPU): the greedy kernel's graph
// for greedy rows without top logprobs, the general one's otherwise, with a padding row (three
// sequences in the graph of four). Each token is what a CPU Sampler with the same settings and seed
// makes of Forward's logits of the same step.
TEST_P(CudaEngineFixtureTest, DecodeGraphsSampleAsTheHostDoes) {
  auto engine = MakeEngine(fixture_.model_dir, 16);
  ASSERT_NE(engine, nullptr);
  const Fixture& f = fixture_;
  const size_t n = f.cases.size();
  const int64_t vocab = f.vocab_size;
  ASSERT_EQ(n, 3u) << "three sequences replay the graph of four, with a padding row";
  std::vector<std::vector<int32_t>> tables(n), history(n);
  std::vector<SequenceStep> batch;
  for (size_t c = 0; c < n; ++c) {
    for (int32_t b = 0; b < 8; ++b) tables[c].push_back(static_cast<int32_t>(c * 8 + b));
    history[c] = f.cases[c].prompt;
    batch.push_back({history[c], 0, tables[c], true});
  }
  std::vector<float> logits(n * vocab);
  ASSERT_TRUE(engine->Forward(batch, logits).ok());  // the prompts, eagerly
  std::vector<int32_t> next(n);
  for (size_t c = 0; c < n; ++c) {
    next[c] = testing::Argmax(std::vector<float>(logits.begin() + c * vocab, logits.begin() + (c + 1) * vocab));
  }
  // Greedy rows alone, then greedy with top logprobs, with a temperature and top-p, and mixed.
  auto settings = [](int step, size_t c) {
    SamplingConfig s;
    s.seed = 1000 * step + c + 1;
    s.temperature = step == 2 ? 0.8f : (step == 3 && c > 0 ? 1.0f : 0.0f);
    s.top_logprobs = step == 1 || (step == 3 && c == 1) ? 3 : 0;
    s.top_p = step == 2 ? 0.9f : 1.0f;
    s.top_k = step == 3 && c == 2 ? 5 : 0;
    return s;
  };
  for (int step = 0; step < 4; ++step) {
    SCOPED_TRACE(absl::StrCat("decode step ", step));
    batch.clear();
    for (size_t c = 0; c < n; ++c) {
      batch.push_back({std::span<const int32_t>(&next[c], 1), static_cast<int64_t>(history[c].size()), tables[c], true});
    }
    ASSERT_TRUE(engine->Forward(batch, logits).ok());
    std::vector<std::unique_ptr<Sampler>> on_device, on_host;
    std::vector<Sampler*> samplers;
    for (size_t c = 0; c < n; ++c) {
      on_device.push_back(std::make_unique<Sampler>(settings(step, c), c, history[c]));
      on_host.push_back(std::make_unique<Sampler>(settings(step, c), c, history[c]));
      samplers.push_back(on_device.back().get());
    }
    std::vector<SampledToken> tokens(n);
    const absl::Status sampled = engine->ForwardAndSample(batch, samplers, tokens);
    ASSERT_TRUE(sampled.ok()) << sampled;
    for (size_t c = 0; c < n; ++c) {
      const SampledToken want = on_host[c]->Sample(std::span<const float>(logits.data() + c * vocab, vocab));
      EXPECT_EQ(tokens[c].token, want.token) << "case " << c;
      EXPECT_NEAR(tokens[c].logprob, want.logprob, 1e-3) << "case " << c;
      ASSERT_EQ(tokens[c].top.size(), want.top.size()) << "case " << c;
      if (!want.top.empty()) {
        EXPECT_EQ(tokens[c].top[0].first, want.top[0].first) << "case " << c;
      }
      history[c].push_back(next[c]);
      next[c] = tokens[c].token;
    }
  }
}

// Two GPUs, each with half of the routed experts and some of the shared ones, give the one-GPU
// engine's logits: the same kernels on the same inputs, the GPUs' MoE outputs summed in fp32 and
// rounded to bf16 once as one GPU rounds its combine. Only the order of that fp32 sum differs, so
// rows agree far inside the bf16 tolerance, except where a token's router scores nearly tie and a
// last-bit difference picks another expert (kOutlierTolerance). Mixed prefill and decode steps,
// graph replays with a padding row, and greedy tokens equal wherever the one-GPU argmax is clear.
TEST_P(CudaEngineFixtureTest, TwoGpusMatchOneGpu) {
  COHORT_SKIP_WITHOUT_GPUS(2);
  auto one = MakeEngine(fixture_.model_dir, 3);
  auto two = MakeEngine(fixture_.model_dir, 3, 0, /*num_gpus=*/2);
  ASSERT_NE(one, nullptr);
  ASSERT_NE(two, nullptr);
  // Teacher-forced, so both engines see the same tokens at every step.
  std::vector<Sequence> want = SequencesFor(fixture_, /*teacher_forced=*/true);
  std::vector<Sequence> got = want;
  Generate(*one, want, /*chunk=*/4, /*join=*/{0, 2, 3});
  Generate(*two, got, /*chunk=*/4, /*join=*/{0, 2, 3});
  ErrorTally errors;
  int rows = 0, exact = 0, clear = 0;
  for (size_t c = 0; c < want.size(); ++c) {
    ASSERT_EQ(got[c].run.logits.size(), want[c].run.logits.size()) << "case " << c;
    for (size_t step = 0; step < want[c].run.logits.size(); ++step) {
      const std::vector<float>& ref = want[c].run.logits[step];
      const double error = RelativeError(got[c].run.logits[step].data(), ref.data(), fixture_.vocab_size);
      errors.Add(error, absl::StrCat("case ", c, " step ", step));
      ++rows;
      exact += error == 0.0;
      if (!ClearArgmax(ref.data(), fixture_.vocab_size)) continue;
      ++clear;
      EXPECT_EQ(got[c].run.generated[step], want[c].run.generated[step]) << "case " << c << " step " << step;
    }
  }
  EXPECT_GT(clear, 0) << "no step had a clear argmax: the token check tested nothing";
  std::printf("two GPUs vs one: %d of %d logits rows bit-equal, %d greedy tokens compared\n", exact, rows, clear);
}

TEST_P(CudaEngineFixtureTest, TwoGpusMatchTransformers) {
  COHORT_SKIP_WITHOUT_GPUS(2);
  auto engine = MakeEngine(fixture_.model_dir, 16, 0, /*num_gpus=*/2);
  ASSERT_NE(engine, nullptr);
  ExpectMatchesTransformers(*engine, /*chunk=*/5, /*join=*/{0, 1, 1});
}

TEST_P(CudaEngineFixtureTest, TwoGpusSampleOnTheFirst) {
  COHORT_SKIP_WITHOUT_GPUS(2);
  ExpectDeviceSamplingFollowsLogits(MakeEngine(fixture_.model_dir, 16, 0, /*num_gpus=*/2).get(), fixture_);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, CudaEngineFixtureTest, ::testing::ValuesIn(testing::FixtureNames()),
                         [](const auto& info) { return info.param; });

// The options of a CPU or CUDA engine for comparing the two on a checkpoint: blocks of 16 tokens.
EngineOptions CpuOrCudaOptions(const std::string& model, const std::string& device, int64_t kv_blocks,
                               int64_t tokens, int64_t sequences) {
  EngineOptions options;
  options.model_dir = model;
  options.device = device;
  options.kv_block_size = 16;
  options.num_kv_blocks = kv_blocks;
  options.max_batch_tokens = tokens;
  options.max_sequences = sequences;
  return options;
}

// A step of more than 512 tokens runs the shared experts as dense cuBLAS products instead of inside
// the grouped MoE products (cuda_engine.cc, kFoldSharedMaxTokens): its logits match the CPU
// reference like the folded path's do. One shared expert in one 600-token chunk; two shared experts
// (their down products summed) in a step of three 200-token chunks.
TEST(CudaEngineTest, LongPrefillStepMatchesTheCpuEngine) {
  COHORT_SKIP_WITHOUT_GPU();
  struct Case {
    std::string fixture;
    int sequences;
    int tokens;
  };
  for (const Case& c : {Case{"v2_group_limited", 1, 600}, Case{"v2_lite_like", 3, 200}}) {
    const Fixture fixture = testing::LoadFixture(c.fixture);
    const int64_t blocks_per_sequence = (c.tokens + 15) / 16;
    std::vector<std::vector<int32_t>> prompts(c.sequences), tables(c.sequences);
    for (int q = 0; q < c.sequences; ++q) {
      for (int i = 0; i < c.tokens; ++i) {
        prompts[q].push_back(static_cast<int32_t>((i * 7919 + 13 * q + 5) % fixture.vocab_size));
      }
      for (int64_t b = 0; b < blocks_per_sequence; ++b) tables[q].push_back(static_cast<int32_t>(q * blocks_per_sequence + b));
    }
    std::vector<SequenceStep> step;
    for (int q = 0; q < c.sequences; ++q) step.push_back({prompts[q], 0, tables[q], true});
    std::vector<float> reference, logits;
    for (const std::string device : {"cpu", "cuda"}) {
      auto engine = CreateEngine(CpuOrCudaOptions(fixture.model_dir, device, /*kv_blocks=*/64, /*tokens=*/640,
                                                  /*sequences=*/4));
      ASSERT_TRUE(engine.ok()) << engine.status();
      std::vector<float>& out = device == "cpu" ? reference : logits;
      out.resize(c.sequences * fixture.vocab_size);
      ASSERT_TRUE((*engine)->Forward(step, out).ok()) << c.fixture << " on " << device;
    }
    for (int q = 0; q < c.sequences; ++q) {
      const float* ref = reference.data() + q * fixture.vocab_size;
      const float* got = logits.data() + q * fixture.vocab_size;
      EXPECT_LE(RelativeError(got, ref, fixture.vocab_size), kRelativeTolerance) << c.fixture << " sequence " << q;
    }
  }
}

// Steps of a few rows take the router's logits from the attention's projections, which divide by
// the input norm's weights (DeviceLayer::router_folded): a checkpoint with a zero among them keeps
// the router product in that layer and still decodes as the CPU engine does. The fixture v2_lite_like
// copied with one input-norm weight of every layer set to zero; a prompt of 7 tokens, then 4 steps
// of one token, each step's logits against the CPU engine's.
TEST(CudaEngineTest, ZeroInputNormWeightDecodesAsTheCpuEngine) {
  COHORT_SKIP_WITHOUT_GPU();
  const Fixture fixture = testing::LoadFixture("v2_lite_like");
  testing::TempDir dir;
  {
    auto checkpoint = Checkpoint::Open(fixture.model_dir);
    ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
    std::vector<testing::TestTensor> tensors;
    int zeroed = 0;
    for (const auto& [name, view] : (*checkpoint)->tensors()) {
      testing::TestTensor t{name, view->dtype, view->shape, {}, {}};
      t.raw.resize(view->data.size());
      std::memcpy(t.raw.data(), view->data.data(), view->data.size());
      if (name.ends_with(".input_layernorm.weight")) {
        const size_t width = view->data.size() / static_cast<size_t>(view->num_elements());
        std::memset(t.raw.data() + 3 * width, 0, width);  // the weight of dimension 3
        ++zeroed;
      }
      tensors.push_back(std::move(t));
    }
    ASSERT_GT(zeroed, 1);
    testing::WriteFile(dir.Join("model.safetensors"), testing::SafetensorsBytes(tensors));
    testing::WriteFile(dir.Join("config.json"), testing::ReadFile(fixture.model_dir + "/config.json"));
  }
  std::vector<int32_t> tokens = {5, 17, 2, 99, 41, 3, 250}, table = {0, 1};
  std::vector<std::unique_ptr<Engine>> engines;
  for (const std::string device : {"cpu", "cuda"}) {
    auto engine = CreateEngine(CpuOrCudaOptions(dir.path(), device, /*kv_blocks=*/8, /*tokens=*/64, /*sequences=*/2));
    ASSERT_TRUE(engine.ok()) << engine.status();
    engines.push_back(std::move(engine).value());
  }
  const int64_t vocab = fixture.vocab_size;
  std::vector<float> reference(vocab), logits(vocab);
  int64_t position = 0;
  for (int step = 0; step < 5; ++step) {
    const std::span<const int32_t> input =
        step == 0 ? std::span<const int32_t>(tokens) : std::span<const int32_t>(&tokens.back(), 1);
    const SequenceStep s{input, position, table, true};
    ASSERT_TRUE(engines[0]->Forward({&s, 1}, reference).ok());
    ASSERT_TRUE(engines[1]->Forward({&s, 1}, logits).ok());
    EXPECT_LE(RelativeError(logits.data(), reference.data(), vocab), kRelativeTolerance) << "step " << step;
    position += static_cast<int64_t>(input.size());
    tokens.push_back(testing::Argmax(reference));
  }
}

// A synthetic V2-Lite of `layers` layers (the first dense) on `gpus` GPUs: 1 GiB of KV cache, steps
// of up to 512 tokens and 16 sequences.
EngineOptions SyntheticV2Lite(int gpus, int64_t layers) {
  EngineOptions options;
  options.model_dir = "synthetic:deepseek-v2-lite";
  options.device = "cuda";
  options.num_gpus = gpus;
  options.num_layers = layers;
  options.kv_cache_bytes = int64_t{1} << 30;
  options.max_batch_tokens = 512;
  options.max_sequences = 16;
  return options;
}

// A synthetic V2-Lite prefills 300 tokens and decodes one, with finite logits. One decode token
// reads six experts in each MoE layer; with several GPUs each counts its own experts' reads and the
// engine reports their sum.
void ExpectSyntheticPrefillAndDecode(int gpus, int64_t layers) {
  auto engine = CreateEngine(SyntheticV2Lite(gpus, layers));
  ASSERT_TRUE(engine.ok()) << engine.status();
  const int64_t vocab = (*engine)->config().vocab_size;
  EXPECT_EQ(vocab, 102400);
  std::vector<int32_t> prompt(300), table;
  for (size_t i = 0; i < prompt.size(); ++i) prompt[i] = static_cast<int32_t>((i * 7919) % vocab);
  for (int32_t b = 0; b < 20; ++b) table.push_back(b);
  std::vector<float> logits(vocab);
  SequenceStep prefill{prompt, 0, table, true};
  ASSERT_TRUE((*engine)->Forward({&prefill, 1}, logits).ok());
  for (float v : logits) ASSERT_TRUE(std::isfinite(v));
  const int64_t moe_layers = layers - 1;
  EXPECT_GT((*engine)->last_step_stats().routed_expert_reads, 6 * moe_layers)
      << "300 tokens route to more than 6 experts a layer";
  const int32_t next = testing::Argmax(logits);
  SequenceStep decode{{&next, 1}, 300, table, true};
  ASSERT_TRUE((*engine)->Forward({&decode, 1}, logits).ok());
  for (float v : logits) ASSERT_TRUE(std::isfinite(v));
  EXPECT_EQ((*engine)->last_step_stats().routed_expert_reads, 6 * moe_layers) << "top-6 in each MoE layer";
}

TEST(CudaEngineTest, SyntheticModelRunsPrefillAndDecode) {
  COHORT_SKIP_WITHOUT_GPU();
  ExpectSyntheticPrefillAndDecode(/*gpus=*/1, /*layers=*/2);
}

// Prompts of a synthetic V2-Lite (DeepSeek's heads: the producer-warp flash kernel) prefilled
// together, their chunks attended in one launch, each get the logits they get alone.
TEST(CudaEngineTest, SyntheticPrefillOfSeveralSequencesMatchesEachAlone) {
  COHORT_SKIP_WITHOUT_GPU();
  EngineOptions options = SyntheticV2Lite(/*gpus=*/1, /*layers=*/2);
  options.kv_block_size = 64;
  auto engine = CreateEngine(options);
  ASSERT_TRUE(engine.ok()) << engine.status();
  const int64_t vocab = (*engine)->config().vocab_size;
  const int lengths[] = {300, 130, 77};
  std::vector<std::vector<int32_t>> prompts, tables;
  std::vector<SequenceStep> together;
  for (int q = 0; q < 3; ++q) {
    prompts.emplace_back(lengths[q]);
    for (int i = 0; i < lengths[q]; ++i) prompts[q][i] = static_cast<int32_t>((i * 7919 + 31 * q) % vocab);
    tables.emplace_back();
    for (int32_t b = 0; b < 5; ++b) tables[q].push_back(q * 5 + b);  // 64-token blocks
  }
  for (int q = 0; q < 3; ++q) together.push_back({prompts[q], 0, tables[q], true});
  std::vector<float> batched(3 * vocab), alone(vocab);
  ASSERT_TRUE((*engine)->Forward(together, batched).ok());
  for (int q = 0; q < 3; ++q) {
    ASSERT_TRUE((*engine)->Forward({&together[q], 1}, alone).ok());
    EXPECT_LE(RelativeError(batched.data() + q * vocab, alone.data(), vocab), kRelativeTolerance) << "sequence " << q;
  }
}

// Decode steps of unequal contexts give each sequence the logits it gets alone (a one-row graph, the
// context in 64 even items): 200 sequences, one of them 20000 tokens long (a 256-row graph: one
// attention item a query by default, so the plan cuts the long context unevenly,
// kernels::MlaDecodePlanner), and 256 sequences spread from 10 to 6000 tokens in no order (the plan
// cuts the longer half).
TEST(CudaEngineTest, UnevenContextsDecodeAsAlone) {
  COHORT_SKIP_WITHOUT_GPU();
  EngineOptions options = SyntheticV2Lite(/*gpus=*/1, /*layers=*/2);
  options.kv_block_size = 64;
  options.kv_cache_bytes = int64_t{4} << 30;  // 29 K blocks: the spread batch takes 12 K
  options.max_sequences = 256;
  auto engine = CreateEngine(options);
  ASSERT_TRUE(engine.ok()) << engine.status();
  const int64_t vocab = (*engine)->config().vocab_size;
  auto expect_as_alone = [&](const std::vector<int64_t>& positions, std::initializer_list<int> checked) {
    const int sequences = static_cast<int>(positions.size());
    std::vector<int32_t> tokens(sequences);
    std::vector<std::vector<int32_t>> tables(sequences);
    std::vector<SequenceStep> step;
    int32_t next_block = 0;
    for (int q = 0; q < sequences; ++q) {
      tokens[q] = static_cast<int32_t>((q * 7919 + 3) % vocab);
      for (int64_t b = 0; b <= positions[q] / 64; ++b) tables[q].push_back(next_block++);
      step.push_back({{&tokens[q], 1}, positions[q], tables[q], true});  // the cache holds random rows before it
    }
    std::vector<float> batched(sequences * vocab), alone(vocab);
    const absl::Status status = (*engine)->Forward(step, batched);
    ASSERT_TRUE(status.ok()) << status;
    for (const int q : checked) {
      const absl::Status alone_status = (*engine)->Forward({&step[q], 1}, alone);
      ASSERT_TRUE(alone_status.ok()) << alone_status;
      EXPECT_LE(RelativeError(batched.data() + q * vocab, alone.data(), vocab), kRelativeTolerance)
          << sequences << " sequences, sequence " << q << " at " << positions[q];
    }
  };
  std::vector<int64_t> one_long(200);
  for (int q = 0; q < 200; ++q) one_long[q] = q == 0 ? 20000 : 50 + q * 7 % 900;
  expect_as_alone(one_long, {0, 1, 99, 199});
  std::vector<int64_t> spread(256);
  for (int q = 0; q < 256; ++q) spread[q] = 10 + (q * 97 % 256) * 5990 / 255;
  expect_as_alone(spread, {0, 1, 100, 255});
}

TEST(CudaEngineTest, TwoGpusCountTheExpertsBothRead) {
  COHORT_SKIP_WITHOUT_GPUS(2);
  ExpectSyntheticPrefillAndDecode(/*gpus=*/2, /*layers=*/3);
}

// Asked for more GPUs than the model has routed experts, or than the machine has, the engine says
// so at start-up. The first check needs no GPU.
TEST(CudaEngineTest, MoreGpusThanExpertsAreRefused) {
  const Fixture fixture = testing::LoadFixture("v3_plain");  // 8 routed experts
  EngineOptions options;
  options.model_dir = fixture.model_dir;
  options.device = "cuda";
  options.num_gpus = 9;
  auto engine = CreateEngine(options);
  ASSERT_FALSE(engine.ok());
  EXPECT_EQ(engine.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(engine.status().message().find("this model has 8: use at most 8 GPUs"), std::string::npos)
      << engine.status();
}

TEST(CudaEngineTest, MoreGpusThanTheMachineHasAreRefused) {
  COHORT_SKIP_WITHOUT_GPU();
  int devices = 0;
  ASSERT_EQ(cudaGetDeviceCount(&devices), cudaSuccess);
  EngineOptions options;
  options.model_dir = testing::LoadFixture("v2_lite_like").model_dir;  // 16 routed experts
  options.device = "cuda";
  options.num_gpus = devices + 1;
  auto engine = CreateEngine(options);
  ASSERT_FALSE(engine.ok());
  EXPECT_EQ(engine.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(engine.status().message().find(absl::StrCat("this machine has ", devices)), std::string::npos)
      << engine.status();
}

TEST(CudaEngineTest, OutOfMemoryIsOneClearError) {
  COHORT_SKIP_WITHOUT_GPU();
  EngineOptions options;
  options.model_dir = "synthetic:deepseek-v3";  // 61 layers: about 1.3 TB of bf16 weights
  options.device = "cuda";
  auto engine = CreateEngine(options);
  ASSERT_FALSE(engine.ok());
  EXPECT_EQ(engine.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(engine.status().message().find("out of GPU memory: weights"), std::string::npos) << engine.status();
}

TEST(CudaEngineTest, UnknownSyntheticPresetIsRefused) {
  EngineOptions options;
  options.model_dir = "synthetic:llama";
  options.device = "cuda";
  auto engine = CreateEngine(options);
  ASSERT_FALSE(engine.ok());
  EXPECT_NE(engine.status().message().find("synthetic:deepseek-v2-lite"), std::string::npos) << engine.status();
}

}  // namespace
}  // namespace cohort
