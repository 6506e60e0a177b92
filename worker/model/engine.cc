#include "worker/model/engine.h"

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "worker/model/checkpoint.h"
#include "worker/model/cpu/cpu_engine.h"
#include "worker/model/null_engine.h"
#include "worker/model/synthetic.h"
#ifdef COHORT_HAVE_CUDA
#include "worker/model/cuda/cuda_engine.h"
#endif

namespace cohort {

absl::StatusOr<std::unique_ptr<Engine>> CreateEngine(const EngineOptions& options) {
  if (options.device == "cuda") {
#ifdef COHORT_HAVE_CUDA
    return cuda::CreateCudaEngine(options);
#else
    return absl::UnimplementedError("--device cuda: this build has no CUDA backend (nvcc was not found at build time)");
#endif
  }
  if (options.device != "cpu" && options.device != "null") {
    return absl::InvalidArgumentError(absl::StrCat("--device ", options.device, " is not a backend: cpu, cuda or null"));
  }
  if (IsSyntheticModel(options.model_dir)) {
    return absl::InvalidArgumentError(absl::StrCat("--model ", options.model_dir,
                                                   ": synthetic models run on --device cuda only"));
  }
  COHORT_ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(options.model_dir));
  if (options.device == "null") return CreateNullEngine(options, std::move(config));
  COHORT_ASSIGN_OR_RETURN(auto checkpoint, Checkpoint::Open(options.model_dir));
  // The CPU backend copies what it needs out of the mapped files, which close with `checkpoint`.
  return cpu::CreateCpuEngine(options, std::move(config), *checkpoint);
}

absl::Status Engine::ForwardAndSample(std::span<const SequenceStep> batch, std::span<Sampler* const> samplers,
                                      std::span<SampledToken> tokens) {
  const int64_t vocab = config().vocab_size;
  COHORT_CHECK(samplers.size() == tokens.size(), samplers.size(), " samplers for ", tokens.size(), " tokens");
  host_logits_.resize(samplers.size() * vocab);
  COHORT_RETURN_IF_ERROR(Forward(batch, host_logits_));
  for (size_t row = 0; row < samplers.size(); ++row) {
    tokens[row] = samplers[row]->Sample({host_logits_.data() + row * vocab, static_cast<size_t>(vocab)});
  }
  return absl::OkStatus();
}

absl::Status ValidateBatch(const ModelConfig& config, const KvCacheGeometry& geometry,
                           std::span<const SequenceStep> batch, size_t logits_size) {
  size_t rows = 0;
  for (size_t s = 0; s < batch.size(); ++s) {
    const SequenceStep& seq = batch[s];
    auto bad = [&](const std::string& what) {
      return absl::InvalidArgumentError(absl::StrCat("sequence ", s, " of the batch: ", what));
    };
    if (seq.tokens.empty()) return bad("no tokens");
    if (seq.start_position < 0) return bad("negative start position");
    const int64_t end = seq.start_position + static_cast<int64_t>(seq.tokens.size());
    if (end > config.max_position_embeddings) {
      return bad(absl::StrCat("reaches position ", end, ", past the model's context of ",
                              config.max_position_embeddings, " tokens"));
    }
    for (int32_t t : seq.tokens) {
      if (t < 0 || t >= config.vocab_size) {
        return bad(absl::StrCat("token id ", t, " is outside the vocabulary [0, ", config.vocab_size, ")"));
      }
    }
    const int64_t blocks_needed = (end + geometry.block_size_tokens - 1) / geometry.block_size_tokens;
    if (static_cast<int64_t>(seq.block_table.size()) < blocks_needed) {
      return bad(absl::StrCat("block table has ", seq.block_table.size(), " blocks, ", blocks_needed, " needed"));
    }
    for (int64_t i = 0; i < blocks_needed; ++i) {
      if (seq.block_table[i] < 0 || seq.block_table[i] >= geometry.num_blocks) {
        return bad(absl::StrCat("block id ", seq.block_table[i], " does not exist"));
      }
      if (geometry.pool_of(seq.block_table[i]) != geometry.pool_of(seq.block_table[0])) {
        return bad(absl::StrCat("blocks ", seq.block_table[0], " and ", seq.block_table[i],
                                " are in different pools (one per GPU)"));
      }
    }
    rows += seq.compute_logits ? 1 : 0;
  }
  if (logits_size < rows * config.vocab_size) {
    return absl::InvalidArgumentError(absl::StrCat("logits buffer holds ", logits_size, " floats, ",
                                                   rows * config.vocab_size, " needed"));
  }
  return absl::OkStatus();
}

absl::StatusOr<KvCacheGeometry> PlanKvCache(const EngineOptions& options, const ModelConfig& config,
                                            int64_t bytes_per_value) {
  if (options.kv_block_size <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("--kv-block-size must be positive, got ", options.kv_block_size));
  }
  KvCacheGeometry geometry;
  geometry.block_size_tokens = options.kv_block_size;
  geometry.bytes_per_token = config.num_layers * config.kv_cache_width() * bytes_per_value;
  geometry.num_blocks = options.num_kv_blocks > 0
                            ? options.num_kv_blocks
                            : options.kv_cache_bytes / (geometry.bytes_per_token * geometry.block_size_tokens);
  if (geometry.num_blocks <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "KV cache of ", options.kv_cache_bytes, " bytes holds no block of ", geometry.block_size_tokens,
        " tokens (", geometry.bytes_per_token * geometry.block_size_tokens, " bytes each): raise --kv-cache-bytes"));
  }
  return geometry;
}

}  // namespace cohort
