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
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "worker/model/engine.h"

namespace cohort::cuda {

// `options.model_dir` is a checkpoint folder or "synthetic:<preset>" (worker/model/synthetic.h).
// Errors: no CUDA device; the model or workspaces not fitting in --gpu-memory-fraction of the
// device (one line with the numbers); unsupported model features.
absl::StatusOr<std::unique_ptr<Engine>> CreateCudaEngine(const EngineOptions& options);

}  // namespace cohort::cuda
