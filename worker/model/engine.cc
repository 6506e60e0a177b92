#include "worker/model/engine.h"

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "worker/model/checkpoint.h"
#include "worker/model/cpu/cpu_engine.h"

namespace cohort {

absl::StatusOr<std::unique_ptr<Engine>> CreateEngine(const EngineOptions& options) {
  if (options.device != "cpu") {
    return absl::UnimplementedError(
        absl::StrCat("--device ", options.device, " is not available in this build (only cpu so far)"));
  }
  COHORT_ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(options.model_dir));
  COHORT_ASSIGN_OR_RETURN(auto checkpoint, Checkpoint::Open(options.model_dir));
  // The CPU backend copies what it needs out of the mapped files, which close with `checkpoint`.
  return cpu::CreateCpuEngine(options, std::move(config), *checkpoint);
}

}  // namespace cohort
