// One worker's model spread over several GPUs of its node by expert parallelism (--gpus N).
//
// Each GPU (a ShardEngine, cuda_engine.h) holds the attention, the dense layers, the router and the
// lm_head whole, and its share of the experts: the routed experts in even runs, the shared experts
// dealt round-robin (device_weights.h's ExpertShard). A step runs on every GPU at once, each driven
// by its own thread: every GPU runs the attention over the whole batch on its own copy of the KV
// cache (the same values on every GPU), routes all tokens, runs the experts it holds on the tokens
// routed to them, and an NCCL all-reduce sums the GPUs' MoE outputs in fp32. GPU 0 then computes
// the logits and samples. docs/expert_parallel.md says why the attention is replicated and what
// splitting it by request would change.
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
