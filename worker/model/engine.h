// The model engine: one forward step over a batch of sequences, whatever their phase.
//
// Each sequence in a step brings the tokens whose KV entries this step computes, at consecutive
// positions from `start_position`; the positions before it are already in the paged latent cache,
// in the blocks its `block_table` lists (block i holds positions [i*block_size, (i+1)*block_size)).
// A sequence in prefill brings many tokens, one in decode brings one; they share the step.
//
//   COHORT_ASSIGN_OR_RETURN(auto engine, CreateEngine({.model_dir = dir}));
//   std::vector<float> logits(batch.size() * engine->config().vocab_size);
//   COHORT_RETURN_IF_ERROR(engine->Forward(batch, logits));
//
// The KV cache stores, per token and layer, MLA's compressed latent (kv_lora_rank values, after
// kv_a_layernorm) and the rotated rope key (qk_rope_head_dim values), not full keys and values.
// Which blocks belong to whom is the caller's business (worker/kv/block_manager.h).
//
// Backends (EngineOptions::device): "cpu", the float32 reference (cpu/cpu_engine.h); "cuda", bf16 on
// one GPU with kernels from kernels/ (cuda/cuda_engine.h; builds with CUDA only); and "null", which
// computes nothing and writes predictable logits, for benchmarking the router and worker without the
// model (null_engine.h).
//
// The serving loop calls ForwardAndSample, which returns sampled tokens only: the CUDA backend samples
// on the device and copies back token ids, the others compute logits on the host and sample there.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "absl/status/statusor.h"
#include "worker/model/config.h"
#include "worker/sampling/sampler.h"

namespace cohort {

struct SequenceStep {
  std::span<const int32_t> tokens;
  int64_t start_position = 0;
  std::span<const int32_t> block_table;
  // Whether to return the logits of this sequence's last token in this step (false for a
  // prefill chunk that does not reach the end of the prompt).
  bool compute_logits = true;
};

struct KvCacheGeometry {
  int64_t block_size_tokens = 0;
  int64_t num_blocks = 0;
  int64_t bytes_per_token = 0;  // all layers
  // The blocks form this many pools of num_blocks / num_pools consecutive ids, and all blocks of one
  // sequence must come from one pool: with data-parallel attention each pool lives on one GPU, which
  // attends over the sequences whose blocks it holds (worker/kv/block_manager.h keeps to this).
  int64_t num_pools = 1;
  int64_t pool_of(int64_t block) const { return block / (num_blocks / num_pools); }
};

// What the last step did, for the batching-economics metrics.
struct StepStats {
  // (MoE layer, routed expert) pairs that received at least one token: each is one read of that
  // expert's weights.
  int64_t routed_expert_reads = 0;
};

class Engine {
 public:
  virtual ~Engine() = default;

  virtual const ModelConfig& config() const = 0;
  virtual const KvCacheGeometry& kv_geometry() const = 0;

  // Runs one step. `logits` receives one row of vocab_size floats for each sequence with
  // compute_logits, in batch order. InvalidArgument for a token outside the vocabulary, a position
  // past max_position_embeddings, or a block table too short, naming a block that does not exist, or
  // taking blocks from two pools.
  virtual absl::Status Forward(std::span<const SequenceStep> batch, std::span<float> logits) = 0;

  // Runs one step and samples the next token of each sequence with compute_logits: `samplers` and
  // `tokens` hold one entry per such sequence, in batch order. Each sampler chooses and records its
  // token exactly once. The default computes logits on the host and calls Sampler::Sample; a device
  // backend samples where the logits are (Sampler::BeginDeviceSample / EndDeviceSample).
  virtual absl::Status ForwardAndSample(std::span<const SequenceStep> batch, std::span<Sampler* const> samplers,
                                        std::span<SampledToken> tokens);

  virtual StepStats last_step_stats() const { return {}; }

  // Bytes per stored weight value, for the bytes-read metrics (worker/model/step_cost.h): the CPU
  // backend's float32 is 4; a bf16 backend returns 2.
  virtual int64_t weight_value_bytes() const { return 4; }

 private:
  std::vector<float> host_logits_;  // the default ForwardAndSample's, reused across steps
};

class RemoteRanks;  // remote_ranks.h

struct EngineOptions {
  // A checkpoint folder, or (cuda only) "synthetic:deepseek-v2-lite" / "synthetic:deepseek-v3":
  // random weights of the published shapes, made on the device (performance work without files).
  std::string model_dir;
  std::string device = "cpu";  // "cpu", "cuda", or "null" (no weights, no compute: benchmarks only)
  int64_t kv_block_size = 16;
  // KV cache size: num_kv_blocks when positive, else as many blocks as kv_cache_bytes holds.
  int64_t num_kv_blocks = 0;
  int64_t kv_cache_bytes = int64_t{256} << 20;
  int num_threads = 0;  // CPU backend; 0: one per core

  // Device backends plan all memory at start-up from these.
  double gpu_memory_fraction = 0.90;  // of the device's memory for weights, workspaces and the KV cache;
                                      // the KV cache gets what is left when kv_cache_bytes is 0
  int64_t max_batch_tokens = 2048;    // tokens computed per step (the scheduler's limit)
  int64_t max_sequences = 256;        // sequences per step (the scheduler's max_running)
  int64_t num_layers = 0;             // synthetic models only: override the preset's layer count
  // Longest context a prefill chunk attends over in the expanded form (keys and values expanded
  // from the latent); longer ones use the absorbed form. 0: as long as the workspace allows.
  int64_t expanded_prefill_max_context = 0;
  int device_id = 0;                  // which GPU (the first, with num_gpus > 1)
  // GPUs the model is spread over (cuda only): the experts split between them, the rest of the
  // model on each (worker/model/cuda/cuda_engine.h's ShardEngine).
  int num_gpus = 1;
  // Benchmarks only (cohort bench step): the GPUs skip their collectives (each GPU's rows stand in
  // for every GPU's), so the logits are wrong; timing steps with and without them splits compute
  // from communication.
  bool skip_collectives = false;
  // A worker whose GPUs span processes (cuda only): this process is rank 0 of
  // remote_ranks->world_size() ranks, one GPU each (--gpu), and drives the others through
  // remote_ranks (worker/model/remote_ranks.h), which outlives the engine.
  RemoteRanks* remote_ranks = nullptr;
};

// Loads the checkpoint and builds the engine for `options.device`. Errors name the file and
// tensor that were wrong. The null device reads only config.json.
absl::StatusOr<std::unique_ptr<Engine>> CreateEngine(const EngineOptions& options);

// For backends. The InvalidArgument errors Engine::Forward documents; every backend checks a batch
// with this before touching it, so all of them refuse the same batches with the same messages.
absl::Status ValidateBatch(const ModelConfig& config, const KvCacheGeometry& geometry,
                           std::span<const SequenceStep> batch, size_t logits_size);

// For backends. The cache `options` asks for when each cached value takes `bytes_per_value` bytes:
// num_kv_blocks blocks when positive, else as many as kv_cache_bytes holds. InvalidArgument for a
// block size that is not positive or a cache that holds no block.
absl::StatusOr<KvCacheGeometry> PlanKvCache(const EngineOptions& options, const ModelConfig& config,
                                            int64_t bytes_per_value);

}  // namespace cohort
