// The CPU reference backend: float32 throughout, weights upcast from the checkpoint at load.
// It defines what the other backends must compute; tests compare them against it.
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "worker/model/checkpoint.h"
#include "worker/model/engine.h"

namespace cohort::cpu {

absl::StatusOr<std::unique_ptr<Engine>> CreateCpuEngine(const EngineOptions& options, ModelConfig config,
                                                        const Checkpoint& checkpoint);

}  // namespace cohort::cpu
