// One worker's model spread over several GPUs of its node (--gpus N): experts split between the
// GPUs (expert parallelism), sequences too (data-parallel attention).
//
// Each GPU (a ShardEngine, cuda_engine.h) holds the embedding, the attention, the dense layers, the
// routers and the LM head whole, its share of the experts (the routed experts in even runs, the
// shared experts dealt round-robin: device_weights.h's ExpertShard), and one pool of the KV cache
// (KvCacheGeometry::num_pools). The block manager keeps each sequence's blocks in one pool, and
// the sequence runs on that pool's GPU. A step runs on every GPU at once, each driven by its own
// thread: every GPU runs the attention, dense layers and LM head of its own sequences; around each
// MoE layer an all-gather brings every GPU's tokens to every GPU, each runs its experts on the
// tokens routed to them, and a reduce-scatter returns to each GPU the fp32 sum for its own tokens.
// The GPUs pad their tokens to the same count so the collectives line up (decode steps: the same
// graph bucket). docs/expert_parallel.md says why the attention is split by sequence.
//
// A GPU whose step fails or does not finish within a minute fails the step on every GPU: the NCCL
// group is revoked so that no GPU waits for it, and that step and every later one return
// Unavailable, which makes the worker unhealthy (worker/server/engine_loop.h).
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "worker/model/config.h"
#include "worker/model/engine.h"

namespace cohort::cuda {

// `config` is the model's; options.num_gpus GPUs from options.device_id on. Errors: the ones of
// CreateCudaEngine for any GPU (prefixed with the GPU), InvalidArgument for a model without routed
// experts or with fewer of them than GPUs, and for GPUs that do not exist; FailedPrecondition when
// NCCL cannot be loaded.
absl::StatusOr<std::unique_ptr<Engine>> CreateExpertParallelEngine(ModelConfig config, const EngineOptions& options);

}  // namespace cohort::cuda
