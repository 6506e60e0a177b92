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
// GPU, each holding the attention and dense layers whole and its share of the experts.
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

// GPU `rank` of the `world` GPUs an expert-parallel worker spreads a model over (GPU
// options.device_id + rank). Every GPU runs every step on the whole batch: the attention, the dense
// layers and the router on all tokens, then its own experts (worker/model/cuda/device_weights.h's
// ExpertShard) on the tokens routed to them; an all-reduce sums the GPUs' MoE outputs. GPU 0 alone
// computes logits and samples. Each GPU is driven by one thread that made it the current device.
class ShardEngine : public Engine {
 public:
  // Plans memory and loads this GPU's weights; nothing collective yet, so a GPU that fails here
  // leaves no other waiting.
  static absl::StatusOr<std::unique_ptr<ShardEngine>> Prepare(ModelConfig config, const EngineOptions& options,
                                                              int rank, int world);
  // Joins the NCCL group (world > 1; every GPU at once) and captures the decode graphs, which
  // contain the all-reduces, so all GPUs capture together.
  virtual absl::Status Start(const NcclApi* nccl, const ncclUniqueId* id) = 0;
  // Runs a step for a GPU other than 0: everything but the logits.
  virtual absl::Status Follow(std::span<const SequenceStep> batch) = 0;
  // Aborts this GPU's NCCL communicator, so that a step waiting for a GPU that will not come
  // returns. Safe from any thread; the engine takes no step after it.
  virtual void Abort() = 0;
};

}  // namespace cohort::cuda
