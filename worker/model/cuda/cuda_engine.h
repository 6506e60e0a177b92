// The CUDA backend: the model in bf16 on one GPU, fp32 accumulation, behind the same Engine
// interface as the CPU reference.
//
// A step, for T tokens of S sequences:
//   inputs (token ids, positions, block tables) go up in one copy; embeddings; per layer RMSNorm,
//   q (through q LoRA when the model has it), the new latents normalised, rotated and written into
//   the paged cache, attention, o_proj, RMSNorm, then the dense MLP or the MoE (router, top-k on
//   the GPU, tokens grouped by expert, grouped products, shared experts, weighted combine); the
//   final norm and lm_head for the rows that want logits; sampling on the GPU. Only token ids (and
//   requested logprobs) come back.
// Attention: decode tokens, and prefill tokens of contexts too long for the expanded workspace,
// use MLA's absorbed form over the latent cache (kernels/mla_decode.h); other prefill chunks expand
// the latent through kv_b_proj and attend with cuBLAS (kernels/attention.h).
// Decode-only steps replay CUDA graphs captured at start-up for bucketed batch sizes.
// All memory (weights, workspaces, KV cache) is planned and allocated when the engine is created.
//
// With options.num_gpus > 1 the engine is expert parallel (expert_parallel.h): one ShardEngine per
// GPU, each holding the attention and dense layers whole, its share of the experts, and one pool of
// the KV cache.
#pragma once

#include <nccl.h>

#include <memory>
#include <span>

#include "absl/status/statusor.h"
#include "worker/model/engine.h"

namespace cohort::cuda {

struct NcclApi;

// `options.model_dir` is a checkpoint folder or "synthetic:<preset>" (worker/model/synthetic.h).
// Errors: no CUDA device; the model or workspaces not fitting in --gpu-memory-fraction of the
// device (one line with the numbers); unsupported model features; with num_gpus > 1, a model
// without routed experts or with fewer of them than GPUs, and GPUs that do not exist.
absl::StatusOr<std::unique_ptr<Engine>> CreateCudaEngine(const EngineOptions& options);

// The model's config for `options.model_dir` (a checkpoint folder or synthetic:<preset>), as
// CreateCudaEngine reads it.
absl::StatusOr<ModelConfig> CudaModelConfig(const EngineOptions& options);

// A new NCCL unique id (ncclUniqueId's bytes), for the ranks of a group that spans processes.
// FailedPrecondition when NCCL cannot be loaded.
absl::StatusOr<std::string> NewNcclId();

// What the GPUs of one expert-parallel step agree on (expert_parallel.h makes it).
struct ShardStep {
  // Rows each GPU brings to the MoE layers: its tokens, then padding rows. With decode_graph, every
  // GPU instead replays its decode graph of the smallest bucket that holds `rows` sequences, and the
  // bucket is the rows.
  int rows = 0;
  bool decode_graph = false;
  std::span<const int32_t> tokens;  // each GPU's tokens: the rest of its rows are padding
  // GPU 0 computes the logits of every GPU's sequences, from every GPU's `rows` final rows gathered
  // one GPU after another: for each logits row of the step in batch order, which gathered row it is
  // (g * rows + i for the i-th sequence of GPU g that wants logits).
  std::span<const int32_t> logits_rows;
};

// GPU `rank` of the `world` GPUs an expert-parallel worker spreads a model over (GPU
// options.device_id + rank), with data-parallel attention: each GPU holds one pool of the KV cache
// and runs the attention and the dense layers of the sequences whose blocks are in it. Around every
// MoE layer the GPUs gather all their tokens, each runs its own experts
// (worker/model/cuda/device_weights.h's ExpertShard) on the tokens routed to them, and a
// reduce-scatter returns to each GPU the sum for its own tokens. At the end the GPUs' final rows go
// to GPU 0, which alone computes logits and samples. Each GPU is driven by one thread.
class ShardEngine : public Engine {
 public:
  // Plans memory and loads this GPU's weights; nothing collective yet, so a GPU that fails here
  // leaves no other waiting. The GPU is `device`, or options.device_id + rank when it is -1 (the
  // GPUs of one process).
  static absl::StatusOr<std::unique_ptr<ShardEngine>> Prepare(ModelConfig config, const EngineOptions& options,
                                                              int rank, int world, int device = -1);
  // Joins the NCCL group (world > 1; every GPU at once) and captures the decode graphs, which
  // contain the collectives, so all GPUs capture together.
  virtual absl::Status Start(const NcclApi* nccl, const ncclUniqueId* id) = 0;
  // This GPU's part of an expert-parallel step: its own sequences, block ids counted from the start
  // of its pool. Every GPU takes part in every step, with no sequences if need be. GPU 0 gets the
  // logits buffer, or the samplers and tokens, of the whole step in batch order; the others none.
  virtual absl::Status ForwardShard(std::span<const SequenceStep> batch, const ShardStep& step,
                                    std::span<float> logits) = 0;
  virtual absl::Status ForwardAndSampleShard(std::span<const SequenceStep> batch, const ShardStep& step,
                                             std::span<Sampler* const> samplers, std::span<SampledToken> tokens) = 0;
  // Aborts this GPU's NCCL communicator, so that a step waiting for a GPU that will not come
  // returns. Safe from any thread; the engine takes no step after it.
  virtual void Abort() = 0;
};

}  // namespace cohort::cuda
