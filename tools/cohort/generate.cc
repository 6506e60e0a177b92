// `cohort generate`: loads a checkpoint, prefills a prompt and decodes, printing the token ids as
// one JSON line. With --logits-out it also writes the logits that chose each token.
#include <cstdio>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/flags.h"
#include "common/logging.h"
#include "common/program.h"
#include "common/status.h"
#include "nlohmann/json.hpp"
#include "tools/cohort/commands.h"
#include "worker/kv/block_manager.h"
#include "worker/model/engine.h"

namespace cohort::tools {
namespace {

struct GenerateFlags {
  std::string model;
  std::string prompt_ids;
  std::string prompt;
  int max_tokens = 16;
  double temperature = 0.0;
  int64_t seed = 0;
  bool ignore_eos = false;
  std::string logits_out;
  std::string device = "cpu";
  int prefill_chunk = 512;
  int threads = 0;
  std::string log_level = "warn";
};

absl::StatusOr<std::vector<int32_t>> ParsePromptIds(const std::string& text) {
  std::vector<int32_t> ids;
  for (absl::string_view part : absl::StrSplit(text, ',', absl::SkipWhitespace())) {
    int32_t id;
    if (!absl::SimpleAtoi(part, &id)) {
      return absl::InvalidArgumentError(absl::StrCat("--prompt-ids: '", part, "' is not a token id"));
    }
    ids.push_back(id);
  }
  if (ids.empty()) return absl::InvalidArgumentError("--prompt-ids: no token ids given");
  return ids;
}

int32_t Sample(std::span<const float> logits, double temperature, std::mt19937_64& rng) {
  int32_t best = 0;
  for (size_t i = 1; i < logits.size(); ++i) {
    if (logits[i] > logits[best]) best = static_cast<int32_t>(i);
  }
  if (temperature <= 0.0) return best;
  std::vector<double> weights(logits.size());
  for (size_t i = 0; i < logits.size(); ++i) weights[i] = std::exp((logits[i] - logits[best]) / temperature);
  std::discrete_distribution<int32_t> pick(weights.begin(), weights.end());
  return pick(rng);
}

absl::Status Generate(const GenerateFlags& f) {
  if (!f.prompt.empty()) {
    return absl::UnimplementedError(
        "--prompt needs the model's tokenizer, which this build cannot load yet; pass --prompt-ids");
  }
  if (f.prompt_ids.empty()) return absl::InvalidArgumentError("--prompt-ids is required (see --help)");
  if (f.max_tokens < 0) return absl::InvalidArgumentError("--max-tokens must not be negative");
  if (f.temperature < 0.0) return absl::InvalidArgumentError("--temperature must not be negative");
  if (f.prefill_chunk <= 0) return absl::InvalidArgumentError("--prefill-chunk must be positive");
  COHORT_ASSIGN_OR_RETURN(std::vector<int32_t> tokens, ParsePromptIds(f.prompt_ids));

  // The context check comes before the engine sizes its cache from the request.
  COHORT_ASSIGN_OR_RETURN(const ModelConfig model_config, LoadModelConfig(f.model));
  const int64_t total = static_cast<int64_t>(tokens.size()) + f.max_tokens;
  if (total > model_config.max_position_embeddings) {
    return absl::InvalidArgumentError(absl::StrCat("prompt (", tokens.size(), ") plus --max-tokens (", f.max_tokens,
                                                   ") exceeds the model's context of ",
                                                   model_config.max_position_embeddings, " tokens"));
  }
  EngineOptions options;
  options.model_dir = f.model;
  options.device = f.device;
  options.num_threads = f.threads;
  options.num_kv_blocks = BlocksForTokens(total, options.kv_block_size);  // one request: exactly its blocks
  COHORT_ASSIGN_OR_RETURN(auto engine, CreateEngine(options));
  const ModelConfig& config = engine->config();
  spdlog::info("loaded {} ({} layers, vocab {}) from {}", config.architecture_name, config.num_layers,
               config.vocab_size, f.model);

  const KvCacheGeometry& kv = engine->kv_geometry();
  BlockManager blocks({.num_blocks = kv.num_blocks, .block_size = kv.block_size_tokens, .prefix_caching = false});
  std::vector<int32_t> block_table;
  if (!blocks.Grow(block_table, BlocksForTokens(total, kv.block_size_tokens))) {
    return absl::ResourceExhaustedError(absl::StrCat("the KV cache holds ", kv.num_blocks * kv.block_size_tokens,
                                                     " tokens; this request needs ", total));
  }

  std::ofstream logits_file;
  if (!f.logits_out.empty()) {
    logits_file.open(f.logits_out, std::ios::binary | std::ios::trunc);
    if (!logits_file) return absl::PermissionDeniedError(absl::StrCat("--logits-out: cannot write ", f.logits_out));
  }

  std::mt19937_64 rng(static_cast<uint64_t>(f.seed));
  std::vector<float> logits(config.vocab_size);
  std::vector<int32_t> generated;
  int64_t computed = 0;  // tokens whose KV entries are in the cache
  while (static_cast<int64_t>(generated.size()) < f.max_tokens) {
    // Chunked prefill, then one token per step: compute what is known but not yet cached.
    const int64_t known = static_cast<int64_t>(tokens.size());
    const int64_t n = std::min<int64_t>(known - computed, f.prefill_chunk);
    SequenceStep step{{tokens.data() + computed, static_cast<size_t>(n)}, computed, block_table,
                      computed + n == known};
    COHORT_RETURN_IF_ERROR(engine->Forward({&step, 1}, logits));
    computed += n;
    if (computed < known) continue;
    const int32_t next = Sample(logits, f.temperature, rng);
    if (logits_file) logits_file.write(reinterpret_cast<const char*>(logits.data()), logits.size() * sizeof(float));
    generated.push_back(next);
    tokens.push_back(next);
    if (!f.ignore_eos && config.eos_token_id && next == *config.eos_token_id) break;
  }
  blocks.Release(block_table);
  if (logits_file && !logits_file.flush()) {
    return absl::DataLossError(absl::StrCat("--logits-out: writing ", f.logits_out, " failed"));
  }
  std::printf("%s\n", nlohmann::json{{"token_ids", generated}}.dump().c_str());
  return absl::OkStatus();
}

}  // namespace

int RunGenerate(int argc, char** argv) {
  GenerateFlags f;
  FlagSet flags("cohort generate",
                "Generates tokens from a DeepSeek-V2/V3 checkpoint folder and prints them as one JSON line:\n"
                "{\"token_ids\":[...]}. Stops after --max-tokens or at the model's end-of-sequence token.");
  flags.Add("model", &f.model, "checkpoint folder: config.json and model*.safetensors", /*required=*/true);
  flags.Add("prompt-ids", &f.prompt_ids, "prompt as comma-separated token ids, e.g. 1,2,3");
  flags.Add("prompt", &f.prompt, "prompt text (needs a tokenizer: not in this build yet)");
  flags.Add("max-tokens", &f.max_tokens, "tokens to generate");
  flags.Add("temperature", &f.temperature, "0 picks the most likely token; above 0 samples");
  flags.Add("seed", &f.seed, "random seed for sampling");
  flags.Add("ignore-eos", &f.ignore_eos, "keep generating past the end-of-sequence token");
  flags.Add("logits-out", &f.logits_out, "write the logits that chose each token: float32 LE, [generated, vocab]");
  flags.Add("device", &f.device, "backend: cpu, or null (no compute: for overhead benchmarks)");
  flags.Add("prefill-chunk", &f.prefill_chunk, "most prompt tokens computed in one step");
  flags.Add("threads", &f.threads, "CPU threads (0: one per core)");
  flags.Add("log-level", &f.log_level, "trace, debug, info, warn, error or off (logs go to stderr)");
  return RunProgram(flags, argc, argv, f.log_level, [&] { return Generate(f); });
}

}  // namespace cohort::tools
