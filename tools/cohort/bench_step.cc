// `cohort bench step`: the engine alone, one step at a time, against the memory roofline.
//
// For each context length and batch size: a decode step of `batch` sequences, each attending over
// `context` cached tokens (their own blocks; a synthetic model starts with a random-filled cache, so
// no prefill is needed), timed end to end through ForwardAndSample (inputs up, forward, sampling,
// token ids down). The bytes the step must read (weights of the layers, the distinct experts the
// batch routed to, the KV cache) over the step time is the achieved bandwidth, reported as a
// fraction of the device's measured copy bandwidth; model FLOPs over time is the FLOP utilisation.
// Then prefill throughput for the --prefill shapes. With --baseline, another implementation's
// decode step times at the same shapes (scripts/bench_transformers_baseline.py writes them) and
// this run's speed-up over each.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/flags.h"
#include "common/program.h"
#include "common/status.h"
#include "nlohmann/json.hpp"
#include "spdlog/spdlog.h"
#include "tools/cohort/commands.h"
#include "worker/model/engine.h"
#include "worker/model/step_cost.h"
#ifdef COHORT_HAVE_CUDA
#include "worker/model/cuda/device_peaks.h"
#endif

namespace cohort::tools {
namespace {

struct BenchStepFlags {
  std::string model = "synthetic:deepseek-v2-lite";
  std::string device = "cuda";
  int gpus = 1;
  int64_t num_layers = 0;
  std::string batch_sizes = "1,2,4,8,16,32,64,128,256,512";
  std::string contexts = "1024,4096";
  int64_t long_context = 0;  // > 0: each decode shape again with one sequence this long
  bool spread_contexts = false;  // each decode shape again with its contexts spread (DecodeMix)
  std::string prefill = "1x4096,16x1024";
  int iterations = 20;
  int warmup = 3;
  int kv_block_size = 64;
  double gpu_memory_fraction = 0.92;
  double peak_tflops = 989;
  double copy_bandwidth_gbs = 0;  // 0: measure
  int threads = 0;
  std::string baseline;
  std::string output;
  std::string log_level = "warn";
};

// --baseline: decode step times of another implementation, as scripts/bench_transformers_baseline.py
// writes them: {"transformers": "5.17.0", "layers": 27, "decode": [{"batch": 1, "context": 1024,
// "step_ms": 67.0}, ...]} ("layers" optional; any other keys are ignored).
struct Baseline {
  struct Step {
    int64_t batch = 0;
    int64_t context = 0;
    double step_ms = 0;
  };
  std::string name;    // "transformers 5.17.0", or "baseline"
  int64_t layers = 0;  // 0: not stated
  std::vector<Step> decode;
};

absl::StatusOr<Baseline> LoadBaseline(const std::string& path) {
  auto bad = [&](const std::string& why) {
    return absl::InvalidArgumentError(absl::StrCat("--baseline ", path, ": ", why));
  };
  std::ifstream in(path);
  if (!in) return bad("cannot be read");
  const nlohmann::json j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return bad("is not a JSON object");
  Baseline b;
  b.name = j.contains("transformers") && j["transformers"].is_string()
               ? absl::StrCat("transformers ", j["transformers"].get<std::string>())
               : "baseline";
  if (j.contains("layers")) {
    if (!j["layers"].is_number_integer() || j["layers"].get<int64_t>() <= 0) {
      return bad("\"layers\" is not a positive integer");
    }
    b.layers = j["layers"].get<int64_t>();
  }
  if (!j.contains("decode") || !j["decode"].is_array() || j["decode"].empty()) return bad("has no \"decode\" list");
  for (size_t i = 0; i < j["decode"].size(); ++i) {
    const nlohmann::json& row = j["decode"][i];
    auto positive = [&](const char* key, bool integer) {
      if (!row.is_object() || !row.contains(key)) return false;
      const nlohmann::json& v = row[key];
      return integer ? v.is_number_integer() && v.get<int64_t>() > 0 : v.is_number() && v.get<double>() > 0;
    };
    if (!positive("batch", true) || !positive("context", true) || !positive("step_ms", false)) {
      return bad(absl::StrCat("decode[", i, "] needs a positive integer batch and context and a positive step_ms"));
    }
    b.decode.push_back({row["batch"].get<int64_t>(), row["context"].get<int64_t>(), row["step_ms"].get<double>()});
  }
  return b;
}

// Prints and returns the speed-up of this run's decode steps over the baseline's at the same
// (context, batch); a baseline step this run did not time is listed without one.
nlohmann::json CompareWithBaseline(const Baseline& baseline, const std::string& path, const nlohmann::json& decode) {
  std::printf("\n%s (%s), the same decode steps:\n", baseline.name.c_str(), path.c_str());
  std::printf("%8s %6s %12s %9s %9s\n", "context", "batch", "baseline ms", "step ms", "speed-up");
  nlohmann::json rows = nlohmann::json::array();
  for (const Baseline::Step& step : baseline.decode) {
    nlohmann::json row = {{"context", step.context}, {"batch", step.batch}, {"baseline_step_ms", step.step_ms}};
    const auto ours = std::find_if(decode.begin(), decode.end(), [&](const nlohmann::json& r) {
      return r["context"].get<int64_t>() == step.context && r["batch"].get<int64_t>() == step.batch;
    });
    if (ours == decode.end()) {
      std::printf("%8ld %6ld %12.3f  not timed here (--contexts / --batch-sizes)\n", static_cast<long>(step.context),
                  static_cast<long>(step.batch), step.step_ms);
    } else {
      const double step_ms = (*ours)["step_ms"].get<double>();
      row["step_ms"] = step_ms;
      row["speedup"] = step.step_ms / step_ms;
      std::printf("%8ld %6ld %12.3f %9.3f %8.1fx\n", static_cast<long>(step.context), static_cast<long>(step.batch),
                  step.step_ms, step_ms, step.step_ms / step_ms);
    }
    rows.push_back(std::move(row));
  }
  return {{"name", baseline.name}, {"path", path}, {"layers", baseline.layers}, {"decode", std::move(rows)}};
}

absl::StatusOr<std::vector<int64_t>> ParseList(const std::string& flag, const std::string& text) {
  std::vector<int64_t> values;
  for (absl::string_view part : absl::StrSplit(text, ',', absl::SkipWhitespace())) {
    int64_t v;
    if (!absl::SimpleAtoi(part, &v) || v <= 0) {
      return absl::InvalidArgumentError(absl::StrCat("--", flag, ": '", part, "' is not a positive integer"));
    }
    values.push_back(v);
  }
  return values;
}

// "16x1024" -> {16, 1024}.
absl::StatusOr<std::vector<std::pair<int64_t, int64_t>>> ParseShapes(const std::string& text) {
  std::vector<std::pair<int64_t, int64_t>> shapes;
  for (absl::string_view part : absl::StrSplit(text, ',', absl::SkipWhitespace())) {
    std::vector<absl::string_view> xs = absl::StrSplit(part, 'x');
    int64_t n, len;
    if (xs.size() != 2 || !absl::SimpleAtoi(xs[0], &n) || !absl::SimpleAtoi(xs[1], &len) || n <= 0 || len <= 0) {
      return absl::InvalidArgumentError(absl::StrCat("--prefill: '", part, "' is not SEQUENCESxTOKENS, e.g. 16x1024"));
    }
    shapes.emplace_back(n, len);
  }
  return shapes;
}

double Median(std::vector<double> v) {
  std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
  return v[v.size() / 2];
}

// The contexts of a decode batch: all equal (the table), one long request among short ones
// (--long-context), or spread evenly from almost none to twice the context, the same tokens in all
// (--spread-contexts: a server's batch mixes new and old requests).
struct DecodeMix {
  int64_t long_context = 0;  // > 0: the first sequence's context instead
  bool spread = false;

  std::vector<int64_t> Contexts(int64_t context, int64_t batch) const {
    std::vector<int64_t> tokens(batch, context);
    if (spread) {
      for (int64_t b = 0; b < batch; ++b) tokens[b] = std::max<int64_t>(1, context * (2 * b + 1) / batch);
    }
    if (long_context > 0 && batch > 0) tokens[0] = long_context;
    return tokens;
  }
  // "1024", "1024+32768" with one long sequence, "~1024" spread around it.
  std::string Label(int64_t context) const {
    if (long_context > 0) return absl::StrCat(context, "+", long_context);
    return spread ? absl::StrCat("~", context) : absl::StrCat(context);
  }
  // A row's keys for the mix: none for equal contexts.
  void Mark(nlohmann::json& row) const {
    if (long_context > 0) row["long_context"] = long_context;
    if (spread) row["spread"] = true;
  }
};

class StepBench {
 public:
  // copy_bandwidth and f.peak_tflops are one GPU's; the engine steps on f.gpus of them.
  StepBench(const BenchStepFlags& f, Engine& engine, double copy_bandwidth)
      : f_(f), engine_(engine), copy_bandwidth_(copy_bandwidth * f.gpus) {}

  // Times `batch` (one sampler per sequence with compute_logits); the median step seconds, and the
  // experts the last step read.
  absl::StatusOr<std::pair<double, int64_t>> Time(const std::vector<SequenceStep>& batch) {
    std::vector<std::unique_ptr<Sampler>> owned;
    std::vector<Sampler*> samplers;
    for (const SequenceStep& s : batch) {
      if (!s.compute_logits) continue;
      SamplingConfig greedy;
      greedy.temperature = 0.0f;
      owned.push_back(std::make_unique<Sampler>(greedy, owned.size(), std::span<const int32_t>()));
      samplers.push_back(owned.back().get());
    }
    std::vector<SampledToken> tokens(samplers.size());
    std::vector<double> seconds;
    for (int i = 0; i < f_.warmup + f_.iterations; ++i) {
      const auto start = std::chrono::steady_clock::now();
      COHORT_RETURN_IF_ERROR(engine_.ForwardAndSample(batch, samplers, tokens));
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      if (i >= f_.warmup) seconds.push_back(s);
    }
    return std::make_pair(Median(seconds), engine_.last_step_stats().routed_expert_reads);
  }

  nlohmann::json Row(const std::vector<SequenceStep>& batch, double seconds, int64_t experts, int64_t tokens) {
    const ModelConfig& c = engine_.config();
    const int64_t kv_value_bytes = engine_.kv_geometry().bytes_per_token / (c.num_layers * c.kv_cache_width());
    const StepCost cost = EstimateStepCost(c, batch, experts, engine_.weight_value_bytes(), kv_value_bytes);
    const double bytes = static_cast<double>(cost.memory_bytes());
    return {{"step_ms", seconds * 1e3},
            {"tokens_per_s", tokens / seconds},
            {"routed_expert_reads", experts},
            {"weight_bytes", cost.weight_bytes},
            {"kv_bytes", cost.kv_read_bytes + cost.kv_write_bytes},
            {"achieved_gb_per_s", bytes / seconds / 1e9},
            {"roofline_fraction", bytes / seconds / copy_bandwidth_},
            {"roofline_ms", bytes / copy_bandwidth_ * 1e3},
            {"tflops", cost.flops / seconds / 1e12},
            {"mfu", cost.flops / seconds / (f_.peak_tflops * 1e12 * f_.gpus)}};
  }

  // Block tables for sequences of tokens[b] tokens of context: sequence b's blocks consecutive in
  // pool b % num_pools (one pool per GPU, so the sequences spread over the GPUs as the worker's block
  // manager spreads them) after those of the pool's sequences before it, so that no block is read
  // twice in a step; nullopt where they do not fit.
  std::optional<std::vector<std::vector<int32_t>>> Tables(const std::vector<int64_t>& tokens) const {
    const KvCacheGeometry& kv = engine_.kv_geometry();
    const int64_t pool_blocks = kv.num_blocks / kv.num_pools;
    std::vector<int64_t> used(kv.num_pools, 0);
    std::vector<std::vector<int32_t>> tables(tokens.size());
    for (size_t b = 0; b < tokens.size(); ++b) {
      const int64_t pool = static_cast<int64_t>(b) % kv.num_pools;
      const int64_t blocks = (tokens[b] + kv.block_size_tokens - 1) / kv.block_size_tokens;
      if (used[pool] + blocks > pool_blocks) return std::nullopt;
      for (int64_t i = 0; i < blocks; ++i) {
        tables[b].push_back(static_cast<int32_t>(pool * pool_blocks + used[pool] + i));
      }
      used[pool] += blocks;
    }
    return tables;
  }

  // Times a decode step for each context and batch size that the KV cache holds; prints a line
  // for each when `print`. The rows carry context and batch, and the mix of contexts when it is
  // not equal (DecodeMix's keys).
  absl::StatusOr<nlohmann::json> Decode(const std::vector<int64_t>& contexts, const std::vector<int64_t>& batch_sizes,
                                        const DecodeMix& mix, bool print) {
    const ModelConfig& c = engine_.config();
    const KvCacheGeometry& kv = engine_.kv_geometry();
    nlohmann::json rows = nlohmann::json::array();
    if (batch_sizes.empty()) return rows;
    const int64_t max_batch = *std::max_element(batch_sizes.begin(), batch_sizes.end());
    std::vector<int32_t> token_ids(max_batch);
    for (int64_t b = 0; b < max_batch; ++b) token_ids[b] = static_cast<int32_t>((b * 7919 + 13) % c.vocab_size);
    for (int64_t context : contexts) {
      for (int64_t batch_size : batch_sizes) {
        const std::vector<int64_t> tokens = mix.Contexts(context, batch_size);
        const std::optional<std::vector<std::vector<int32_t>>> tables = Tables(tokens);
        if (!tables.has_value()) {
          if (print) {
            int64_t blocks = 0;
            for (const int64_t t : tokens) blocks += (t + kv.block_size_tokens - 1) / kv.block_size_tokens;
            std::printf("%8s %6ld  skipped: needs %ld KV blocks, the cache holds %ld\n", mix.Label(context).c_str(),
                        static_cast<long>(batch_size), static_cast<long>(blocks), static_cast<long>(kv.num_blocks));
          }
          continue;
        }
        std::vector<SequenceStep> batch;
        for (int64_t b = 0; b < batch_size; ++b) {
          batch.push_back({{&token_ids[b], 1}, tokens[b] - 1, (*tables)[b], true});
        }
        COHORT_ASSIGN_OR_RETURN(auto timed, Time(batch));
        nlohmann::json row = Row(batch, timed.first, timed.second, batch_size);
        row["context"] = context;
        row["batch"] = batch_size;
        mix.Mark(row);
        if (print) {
          std::printf("%8s %6ld %9.3f %11.0f %8ld %9.3f %9.3f %9.3f %9.0f %6.1f%% %7.2f%%\n",
                      mix.Label(context).c_str(), static_cast<long>(batch_size), row["step_ms"].get<double>(),
                      row["tokens_per_s"].get<double>(), static_cast<long>(timed.second),
                      row["weight_bytes"].get<double>() / 1e9,
                      row["kv_bytes"].get<double>() / 1e9, row["roofline_ms"].get<double>(),
                      row["achieved_gb_per_s"].get<double>(), 100 * row["roofline_fraction"].get<double>(),
                      100 * row["mfu"].get<double>());
          std::fflush(stdout);
        }
        rows.push_back(std::move(row));
      }
    }
    return rows;
  }

 private:
  const BenchStepFlags& f_;
  Engine& engine_;
  double copy_bandwidth_;
};

absl::Status BenchStep(const BenchStepFlags& f) {
  COHORT_ASSIGN_OR_RETURN(std::vector<int64_t> batch_sizes, ParseList("batch-sizes", f.batch_sizes));
  COHORT_ASSIGN_OR_RETURN(std::vector<int64_t> contexts, ParseList("contexts", f.contexts));
  COHORT_ASSIGN_OR_RETURN(auto prefill, ParseShapes(f.prefill));
  if (f.iterations <= 0 || f.warmup < 0) return absl::InvalidArgumentError("--iterations must be > 0, --warmup >= 0");
  if (f.long_context < 0) {
    return absl::InvalidArgumentError(absl::StrCat("--long-context must be 0 or positive, got ", f.long_context));
  }
  std::optional<Baseline> baseline;
  if (!f.baseline.empty()) {
    COHORT_ASSIGN_OR_RETURN(baseline, LoadBaseline(f.baseline));
  }
  if (f.gpus < 1) return absl::InvalidArgumentError(absl::StrCat("--gpus must be at least 1, got ", f.gpus));
  const int64_t max_batch = batch_sizes.empty() ? 1 : *std::max_element(batch_sizes.begin(), batch_sizes.end());
  int64_t max_tokens = max_batch, max_sequences = max_batch;
  for (const auto& [n, len] : prefill) {
    max_tokens = std::max(max_tokens, n * len);
    max_sequences = std::max(max_sequences, n);  // a prefill step samples a token for each sequence
  }

  double copy_bandwidth = f.copy_bandwidth_gbs * 1e9;
  if (copy_bandwidth <= 0) {
#ifdef COHORT_HAVE_CUDA
    if (f.device != "cuda") return absl::InvalidArgumentError("--copy-bandwidth-gbs is required off the GPU");
    COHORT_ASSIGN_OR_RETURN(copy_bandwidth, cuda::MeasureCopyBandwidth(0));
#else
    return absl::InvalidArgumentError("--copy-bandwidth-gbs is required in a build without CUDA");
#endif
  }

  EngineOptions options;
  options.model_dir = f.model;
  options.device = f.device;
  options.num_layers = f.num_layers;
  options.kv_block_size = f.kv_block_size;
  options.kv_cache_bytes = f.device == "cuda" ? 0 : options.kv_cache_bytes;
  options.gpu_memory_fraction = f.gpu_memory_fraction;
  options.max_batch_tokens = max_tokens;
  options.max_sequences = max_sequences;
  options.num_threads = f.threads;
  options.num_gpus = f.gpus;
  COHORT_ASSIGN_OR_RETURN(std::unique_ptr<Engine> engine, CreateEngine(options));
  const ModelConfig& c = engine->config();
  const KvCacheGeometry& kv = engine->kv_geometry();
  if (baseline.has_value() && baseline->layers > 0 && baseline->layers != c.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("--baseline ", f.baseline, ": timed ", baseline->layers,
                                                   " layers, this model runs ", c.num_layers, " (--num-layers)"));
  }
  const ParameterCounts params = CountParameters(c);
  std::printf("model %s: %ld layers, %.2f B parameters (%.2f B active per token); KV cache %ld blocks of %ld tokens\n",
              f.model.c_str(), static_cast<long>(c.num_layers), params.total / 1e9, params.active_per_token / 1e9,
              static_cast<long>(kv.num_blocks), static_cast<long>(kv.block_size_tokens));
  std::printf("measured copy bandwidth %.0f GB/s (read + write); peak %.0f TFLOP/s\n", copy_bandwidth / 1e9,
              f.peak_tflops);
  if (f.gpus > 1) {
    std::printf("%d GPUs, experts split between them, sequences too: the roofline and MFU are of all %d together,\n"
                "and the weights every GPU reads (attention, dense layers) are counted once\n",
                f.gpus, f.gpus);
  }
  std::printf("\n");

  StepBench bench(f, *engine, copy_bandwidth);
  nlohmann::json results = {{"model", f.model},
                            {"num_layers", c.num_layers},
                            {"gpus", f.gpus},
                            {"copy_bandwidth_gb_per_s", copy_bandwidth / 1e9},
                            {"peak_tflops", f.peak_tflops},
                            {"decode", nlohmann::json::array()},
                            {"prefill", nlohmann::json::array()}};
  std::printf("%8s %6s %9s %11s %8s %9s %9s %9s %9s %7s %8s\n", "context", "batch", "step ms", "tokens/s", "experts",
              "weight GB", "KV GB", "roof ms", "GB/s", "% roof", "MFU %");
  COHORT_ASSIGN_OR_RETURN(results["decode"], bench.Decode(contexts, batch_sizes, DecodeMix{}, /*print=*/true));
  if (f.long_context > 0) {
    std::printf("\nthe first sequence of each batch at %ld tokens of context (one long request among short ones):\n",
                static_cast<long>(f.long_context));
    COHORT_ASSIGN_OR_RETURN(const nlohmann::json rows,
                            bench.Decode(contexts, batch_sizes, DecodeMix{.long_context = f.long_context}, true));
    for (const nlohmann::json& row : rows) results["decode"].push_back(row);
  }
  if (f.spread_contexts) {
    std::printf("\neach batch's contexts spread evenly from almost none to twice the context, the same tokens in "
                "all (a server's batch):\n");
    COHORT_ASSIGN_OR_RETURN(const nlohmann::json rows,
                            bench.Decode(contexts, batch_sizes, DecodeMix{.spread = true}, true));
    for (const nlohmann::json& row : rows) results["decode"].push_back(row);
  }
  if (baseline.has_value()) results["baseline"] = CompareWithBaseline(*baseline, f.baseline, results["decode"]);

  if (!prefill.empty()) std::printf("\n%10s %10s %11s %9s\n", "prefill", "step ms", "tokens/s", "MFU %");
  for (const auto& [n, len] : prefill) {
    const std::optional<std::vector<std::vector<int32_t>>> tables = bench.Tables(std::vector<int64_t>(n, len));
    if (!tables.has_value()) {
      std::printf("%4ldx%-5ld  skipped: the KV cache is too small\n", static_cast<long>(n), static_cast<long>(len));
      continue;
    }
    std::vector<std::vector<int32_t>> prompts(n);
    std::vector<SequenceStep> batch;
    for (int64_t s = 0; s < n; ++s) {
      for (int64_t i = 0; i < len; ++i) prompts[s].push_back(static_cast<int32_t>((s * 104729 + i * 7919) % c.vocab_size));
      batch.push_back({prompts[s], 0, (*tables)[s], true});
    }
    COHORT_ASSIGN_OR_RETURN(auto timed, bench.Time(batch));
    nlohmann::json row = bench.Row(batch, timed.first, timed.second, n * len);
    row["sequences"] = n;
    row["tokens_per_sequence"] = len;
    std::printf("%4ldx%-5ld %10.2f %11.0f %8.1f%%\n", static_cast<long>(n), static_cast<long>(len),
                row["step_ms"].get<double>(), row["tokens_per_s"].get<double>(), 100 * row["mfu"].get<double>());
    results["prefill"].push_back(std::move(row));
  }
  if (f.gpus > 1) {
    // The same decode steps on an engine whose GPUs skip the collectives: compute alone.
    engine.reset();
    options.skip_collectives = true;
    COHORT_ASSIGN_OR_RETURN(engine, CreateEngine(options));
    StepBench alone(f, *engine, copy_bandwidth);
    COHORT_ASSIGN_OR_RETURN(const nlohmann::json compute,
                            alone.Decode(contexts, batch_sizes, DecodeMix{}, /*print=*/false));
    std::printf("\nthe same decode steps without collectives (each GPU's rows stand in for every GPU's: wrong\n"
                "logits, compute alone; the experts column says whether the same experts were read):\n");
    std::printf("%8s %6s %9s %11s %9s %7s %8s %8s\n", "context", "batch", "step ms", "compute ms", "comm ms", "comm %",
                "experts", "alone");
    for (nlohmann::json& row : results["decode"]) {
      if (row.contains("long_context") || row.contains("spread")) continue;  // timed with equal contexts only
      const auto same = std::find_if(compute.begin(), compute.end(), [&](const nlohmann::json& r) {
        return r["context"] == row["context"] && r["batch"] == row["batch"];
      });
      if (same == compute.end()) continue;
      const double step_ms = row["step_ms"].get<double>(), compute_ms = (*same)["step_ms"].get<double>();
      row["compute_ms"] = compute_ms;
      row["communication_ms"] = step_ms - compute_ms;
      std::printf("%8ld %6ld %9.3f %11.3f %9.3f %6.1f%% %8ld %8ld\n", static_cast<long>(row["context"].get<int64_t>()),
                  static_cast<long>(row["batch"].get<int64_t>()), step_ms, compute_ms, step_ms - compute_ms,
                  100 * (step_ms - compute_ms) / step_ms, static_cast<long>(row["routed_expert_reads"].get<int64_t>()),
                  static_cast<long>((*same)["routed_expert_reads"].get<int64_t>()));
    }
  }
  if (!f.output.empty()) {
    std::ofstream out(f.output);
    out << results.dump(2) << "\n";
    if (!out) return absl::InternalError(absl::StrCat("could not write ", f.output));
  }
  return absl::OkStatus();
}

}  // namespace

int RunBenchStep(int argc, char** argv) {
  BenchStepFlags f;
  FlagSet flags("cohort bench step",
                "Times single engine steps: decode at each --contexts x --batch-sizes, then prefill at --prefill,\n"
                "and reports the bytes each step must read against the device's measured copy bandwidth.");
  flags.Add("model", &f.model, "checkpoint folder, or synthetic:deepseek-v2-lite / synthetic:deepseek-v3");
  flags.Add("device", &f.device, "backend: cuda, or cpu (then --copy-bandwidth-gbs is required)");
  flags.Add("gpus", &f.gpus,
            "cuda: GPUs to spread the model over (expert parallelism); above 1 the decode steps are timed again "
            "without the all-reduces, to split each step into compute and communication");
  flags.Add("num-layers", &f.num_layers, "synthetic models: layers to build (0: the preset's)");
  flags.Add("batch-sizes", &f.batch_sizes, "decode batch sizes, comma-separated");
  flags.Add("contexts", &f.contexts, "cached tokens each decoding sequence attends to, comma-separated");
  flags.Add("long-context", &f.long_context,
            "tokens of context: time each decode shape again with its first sequence this long, one long "
            "request among short ones (0: not)");
  flags.Add("spread-contexts", &f.spread_contexts,
            "time each decode shape again with its contexts spread evenly from almost none to twice the "
            "context (the same tokens in all), as a server's batch mixes new and old requests");
  flags.Add("prefill", &f.prefill, "prefill shapes SEQUENCESxTOKENS, comma-separated (empty: none)");
  flags.Add("iterations", &f.iterations, "timed steps per point (the median is reported)");
  flags.Add("warmup", &f.warmup, "untimed steps before each point");
  flags.Add("kv-block-size", &f.kv_block_size, "tokens per KV-cache block");
  flags.Add("gpu-memory-fraction", &f.gpu_memory_fraction, "of the GPU's memory for weights, workspaces and KV cache");
  flags.Add("peak-tflops", &f.peak_tflops, "peak dense bf16 TFLOP/s for the FLOP utilisation (H200: 989)");
  flags.Add("copy-bandwidth-gbs", &f.copy_bandwidth_gbs, "memory bandwidth to compare with (0: measure on the GPU)");
  flags.Add("threads", &f.threads, "CPU backend threads (0: one per core)");
  flags.Add("baseline", &f.baseline,
            "JSON of another implementation's decode step times at the same shapes, as written by "
            "scripts/bench_transformers_baseline.py: prints this run's speed-up over each");
  flags.Add("output", &f.output, "write every number as JSON here");
  flags.Add("log-level", &f.log_level, "trace, debug, info, warn, error or off");
  return RunProgram(flags, argc, argv, f.log_level, [&] { return BenchStep(f); });
}

}  // namespace cohort::tools
