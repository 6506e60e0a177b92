#include "worker/model/null_engine.h"

#include <algorithm>

#include "common/status.h"

namespace cohort {
namespace {

// Far below the chosen token's 0, yet finite, so that samplers taking exp() or a softmax stay exact.
constexpr float kUnlikelyLogit = -1e4f;

class NullEngine final : public Engine {
 public:
  NullEngine(ModelConfig config, KvCacheGeometry geometry) : config_(std::move(config)), geometry_(geometry) {}

  const ModelConfig& config() const override { return config_; }
  const KvCacheGeometry& kv_geometry() const override { return geometry_; }

  absl::Status Forward(std::span<const SequenceStep> batch, std::span<float> logits) override {
    COHORT_RETURN_IF_ERROR(ValidateBatch(config_, geometry_, batch, logits.size()));
    const int64_t vocab = config_.vocab_size;
    float* row = logits.data();
    for (const SequenceStep& seq : batch) {
      if (!seq.compute_logits) continue;
      std::fill_n(row, vocab, kUnlikelyLogit);
      row[(static_cast<int64_t>(seq.tokens.back()) + 1) % vocab] = 0.0f;
      row += vocab;
    }
    return absl::OkStatus();
  }

  // No expert runs, so none is read. weight_value_bytes() keeps the default (the float32 the CPU
  // engine would hold).
  StepStats last_step_stats() const override { return {}; }

 private:
  ModelConfig config_;
  KvCacheGeometry geometry_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Engine>> CreateNullEngine(const EngineOptions& options, ModelConfig config) {
  // Sized as the CPU engine's float32 cache, so both report the same capacity for the same options.
  COHORT_ASSIGN_OR_RETURN(const KvCacheGeometry geometry, PlanKvCache(options, config, sizeof(float)));
  return std::make_unique<NullEngine>(std::move(config), geometry);
}

}  // namespace cohort
