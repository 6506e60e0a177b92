// Synthetic models: the published shapes of DeepSeek models with random weights, so performance
// work needs no checkpoint files. `--model synthetic:<preset>` on a device backend.
//
//   synthetic:deepseek-v2-lite   27 layers, hidden 2048, 16 heads, kv_lora 512, no q LoRA,
//                                64 routed experts (top-6) + 2 shared, first layer dense
//   synthetic:deepseek-v3        61 layers, hidden 7168, 128 heads, q LoRA 1536, kv_lora 512,
//                                256 routed experts (top-8, 8 groups) + 1 shared, 3 dense layers
#pragma once

#include <cstdint>
#include <string_view>

#include "absl/status/statusor.h"
#include "worker/model/config.h"

namespace cohort {

inline constexpr std::string_view kSyntheticPrefix = "synthetic:";

inline bool IsSyntheticModel(std::string_view model) { return model.substr(0, kSyntheticPrefix.size()) == kSyntheticPrefix; }

// The config of `model` ("synthetic:<preset>"), parsed from the preset's config.json text like a
// checkpoint's. `num_layers` > 0 overrides the preset's layer count (dense layers stay first).
// InvalidArgument naming the presets for an unknown one.
absl::StatusOr<ModelConfig> SyntheticModelConfig(std::string_view model, int64_t num_layers);

}  // namespace cohort
