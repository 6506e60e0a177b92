// The model's weights on one GPU, bf16, placed in one arena. Layout as published ([out, in]
// row-major, like torch.nn.Linear), except that gate_proj and up_proj are stacked into one
// [2 * intermediate, hidden] matrix (gate rows first) so one product computes both, and the experts
// of a layer are stacked [experts, ...] for the grouped products (kernels/moe.h): the routed experts,
// then the shared MLP (intermediate n_shared * I) as n_shared more experts of intermediate I, since
// the MLP is a sum over its intermediate units. Shared expert s takes gate and up rows
// [s * I, (s + 1) * I) and down columns [s * I, (s + 1) * I).
#pragma once

#include <cuda_bf16.h>

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "worker/model/checkpoint.h"
#include "worker/model/config.h"
#include "worker/model/cuda/device_memory.h"

namespace cohort::cuda {

using bf16 = __nv_bfloat16;

struct DeviceMatrix {
  bf16* data = nullptr;
  int64_t rows = 0;  // out features
  int64_t cols = 0;  // in features
  int64_t size() const { return rows * cols; }
};

struct DeviceLayer {
  bf16* input_norm = nullptr;
  bf16* post_attention_norm = nullptr;
  // The products that read the normalised hidden state, stacked so that one product reads it once:
  // [q_proj (or q_a_proj with q LoRA); kv_a_proj], of which the three below are views.
  DeviceMatrix input_proj;
  DeviceMatrix q_proj;                   // without q LoRA
  DeviceMatrix q_a_proj, q_b_proj;       // with q LoRA
  bf16* q_a_norm = nullptr;
  DeviceMatrix kv_a_proj;                // hidden -> kv_lora_rank + qk_rope_head_dim
  bf16* kv_a_norm = nullptr;
  DeviceMatrix kv_b_proj;                // kv_lora_rank -> heads * (qk_nope + v_head)
  bf16* absorbed_keys = nullptr;         // [heads, kv_lora_rank, qk_nope]: each head's key rows of
                                         // kv_b_proj transposed, the weights of the absorbed query product
  DeviceMatrix o_proj;
  bool moe = false;
  DeviceMatrix mlp_gate_up, mlp_down;    // dense layers
  DeviceMatrix router;                   // MoE: hidden -> experts
  float* router_bias = nullptr;          // e_score_correction_bias, or null
  // The router folded into the two attention projections (MoeRouterFold in kernels/moe.h), so that a small
  // step's MoE block starts with the route instead of a router product: [experts, hidden] rows right
  // after input_proj's, and [experts, heads * v_head] rows right after o_proj's, which one product
  // each computes with them. Placed for MoE layers when one GPU holds every routed expert;
  // router_folded once DeriveWeights made them (it does not where the input norm has a zero weight).
  DeviceMatrix router_from_input, router_from_attention;
  bool router_folded = false;
  bf16* experts_gate_up = nullptr;       // [routed + shared experts, 2 * moe_intermediate, hidden]
  bf16* experts_down = nullptr;          // [routed + shared experts, hidden, moe_intermediate]
};

// The experts one GPU holds when a worker splits them over its GPUs (expert parallelism): routed
// experts [first_routed, first_routed + num_routed) of every MoE layer, then the shared experts
// listed in `shared` (their indices among the model's), stacked in that order. On one GPU: all.
struct ExpertShard {
  int32_t first_routed = 0;
  int32_t num_routed = 0;
  std::vector<int32_t> shared;

  // GPU `rank` of `world`: the routed experts split into `world` runs as even as they go, shared
  // expert s on GPU s % world (with fewer shared experts than GPUs, the last GPUs hold none).
  static ExpertShard Of(const ModelConfig& config, int rank, int world);
  int32_t num_shared() const { return static_cast<int32_t>(shared.size()); }
  int32_t num_experts() const { return num_routed + num_shared(); }
};

struct DeviceWeights {
  DeviceMatrix embed_tokens;
  bf16* norm = nullptr;
  DeviceMatrix lm_head;
  std::vector<DeviceLayer> layers;
};

// Places every tensor of `config` in `arena` (a dry run only counts bytes): all but the experts,
// and of those the ones in `shard`.
DeviceWeights PlaceWeights(const ModelConfig& config, const ExpertShard& shard, DeviceArena& arena);

// Copies a checkpoint's tensors into placed weights (converted to bf16 on the host); of the experts,
// only those of `shard` are read. Errors name the tensor. Unimplemented for features the CUDA
// backend lacks (attention biases).
absl::Status LoadWeights(const ModelConfig& config, const ExpertShard& shard, const Checkpoint& checkpoint,
                         const DeviceWeights& weights);

// Random weights of the right scale (uniform, +-1/sqrt(fan_in); norms 1), made on the device. All
// but the experts come out the same for every shard.
absl::Status FillSyntheticWeights(const ModelConfig& config, const ExpertShard& shard, const DeviceWeights& weights,
                                  uint64_t seed);

// Computes the weights derived from the loaded ones (absorbed_keys, the folded routers); after
// LoadWeights or FillSyntheticWeights.
absl::Status DeriveWeights(const ModelConfig& config, DeviceWeights& weights);

}  // namespace cohort::cuda
