// The null backend (--device null): no weights, no KV cache, no compute. It exists so that the
// router's and the worker's own overhead (scheduling, batching, streaming, gRPC) can be benchmarked
// without the model's compute in the way; it reads only config.json.
//
// Forward refuses exactly the batches the CPU engine refuses (ValidateBatch in engine.h). For each
// sequence with compute_logits it writes a row that is -1e4 everywhere except 0 at
// (last token of the step + 1) % vocab_size, so greedy decoding counts up from the last prompt token,
// wrapping at the vocabulary (and stopping at the model's EOS token unless the request ignores it):
//
//   cohort generate --model DIR --prompt-ids 1,2,3 --max-tokens 5 --device null
//   {"token_ids":[4,5,6,7,8]}
//
// kv_geometry() is what the CPU engine would report for the same options, so the block manager
// and scheduler see the same capacity; the block ids are only numbers.
//
// last_step_stats() reports no routed expert read (none runs), so the worker's economics metrics
// on --device null count the model's dense weights and KV traffic as if read by a float32 engine
// and no routed expert: figures for the dashboards' plumbing, not for any hardware.
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "worker/model/config.h"
#include "worker/model/engine.h"

namespace cohort {

absl::StatusOr<std::unique_ptr<Engine>> CreateNullEngine(const EngineOptions& options, ModelConfig config);

}  // namespace cohort
