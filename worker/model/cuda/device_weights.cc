#include "worker/model/cuda/device_weights.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <span>

#include "absl/strings/str_cat.h"
#include "common/dtype.h"
#include "common/status.h"
#include "kernels/cuda_check.h"
#include "kernels/elementwise.h"
#include "kernels/moe.h"

namespace cohort::cuda {
namespace {

// The smallest input norm weight the folded router divides by: smaller ones (zeros above all) keep
// the layer's router product (DeviceLayer::router_folded).
constexpr float kMinFoldedNormWeight = 1e-20f;

DeviceMatrix PlaceMatrix(DeviceArena& arena, int64_t rows, int64_t cols) {
  return {arena.Take<bf16>(rows * cols), rows, cols};
}

// The tensor as bf16 bits: bf16 checkpoints are copied as they are, others rounded.
absl::StatusOr<std::vector<uint16_t>> ReadBf16(const Checkpoint& checkpoint, const std::string& name,
                                               const std::vector<int64_t>& shape) {
  COHORT_ASSIGN_OR_RETURN(const TensorView* view, checkpoint.Get(name, shape));
  std::vector<uint16_t> bits(view->num_elements());
  if (view->dtype == DType::kBF16) {
    std::memcpy(bits.data(), view->data.data(), bits.size() * sizeof(uint16_t));
    return bits;
  }
  COHORT_ASSIGN_OR_RETURN(std::vector<float> values, checkpoint.ReadFloat32(name, shape));
  for (size_t i = 0; i < values.size(); ++i) bits[i] = FloatToBF16(values[i]);
  return bits;
}

class Uploader {
 public:
  explicit Uploader(const Checkpoint& checkpoint) : ckpt_(checkpoint) {}

  // `name` [rows, cols] into dst (rows x cols values).
  absl::Status Tensor(const std::string& name, std::vector<int64_t> shape, bf16* dst) {
    COHORT_ASSIGN_OR_RETURN(std::vector<uint16_t> bits, ReadBf16(ckpt_, name, shape));
    COHORT_CUDA_RETURN_IF_ERROR(cudaMemcpy(dst, bits.data(), bits.size() * sizeof(uint16_t), cudaMemcpyHostToDevice));
    return absl::OkStatus();
  }
  absl::Status Matrix(const std::string& name, const DeviceMatrix& m) {
    return Tensor(name, {m.rows, m.cols}, m.data);
  }
  // gate_proj then up_proj of an MLP under `prefix` into one stacked matrix at `dst`, and its down_proj.
  absl::Status Mlp(const std::string& prefix, int64_t intermediate, int64_t hidden, bf16* gate_up, bf16* down) {
    COHORT_RETURN_IF_ERROR(Tensor(prefix + ".gate_proj.weight", {intermediate, hidden}, gate_up));
    COHORT_RETURN_IF_ERROR(Tensor(prefix + ".up_proj.weight", {intermediate, hidden}, gate_up + intermediate * hidden));
    return Tensor(prefix + ".down_proj.weight", {hidden, intermediate}, down);
  }
  // The MLP under `prefix` (intermediate n * intermediate) as n experts of `intermediate`, of which
  // those listed in `which` are stacked, in that order, into gate_up [.., 2 * intermediate, hidden]
  // and down [.., hidden, intermediate]: expert s takes gate and up rows
  // [s * intermediate, (s + 1) * intermediate) and that column slice of down.
  absl::Status MlpAsExperts(const std::string& prefix, int64_t n, std::span<const int32_t> which,
                            int64_t intermediate, int64_t hidden, bf16* gate_up, bf16* down) {
    const int64_t slice = intermediate * hidden;  // values of one expert's gate (or up) rows
    const char* const halves[] = {".gate_proj.weight", ".up_proj.weight"};  // rows [0, I), [I, 2I)
    for (int half = 0; half < 2; ++half) {
      COHORT_ASSIGN_OR_RETURN(std::vector<uint16_t> bits,
                              ReadBf16(ckpt_, prefix + halves[half], {n * intermediate, hidden}));
      for (size_t i = 0; i < which.size(); ++i) {
        COHORT_CUDA_RETURN_IF_ERROR(cudaMemcpy(gate_up + (2 * i + half) * slice, bits.data() + which[i] * slice,
                                               slice * sizeof(uint16_t), cudaMemcpyHostToDevice));
      }
    }
    COHORT_ASSIGN_OR_RETURN(std::vector<uint16_t> bits,
                            ReadBf16(ckpt_, prefix + ".down_proj.weight", {hidden, n * intermediate}));
    for (size_t i = 0; i < which.size(); ++i) {
      const size_t row_bytes = intermediate * sizeof(uint16_t);
      COHORT_CUDA_RETURN_IF_ERROR(cudaMemcpy2D(down + i * hidden * intermediate, row_bytes,
                                               bits.data() + which[i] * intermediate, n * row_bytes, row_bytes,
                                               hidden, cudaMemcpyHostToDevice));
    }
    return absl::OkStatus();
  }

 private:
  const Checkpoint& ckpt_;
};

}  // namespace

ExpertShard ExpertShard::Of(const ModelConfig& c, int rank, int world) {
  ExpertShard shard;
  const int64_t experts = c.n_routed_experts;
  shard.first_routed = static_cast<int32_t>(experts * rank / world);
  shard.num_routed = static_cast<int32_t>(experts * (rank + 1) / world) - shard.first_routed;
  for (int32_t s = rank; s < c.n_shared_experts; s += world) shard.shared.push_back(s);
  return shard;
}

DeviceWeights PlaceWeights(const ModelConfig& c, const ExpertShard& shard, DeviceArena& arena) {
  const int64_t hidden = c.hidden_size, heads = c.num_heads;
  DeviceWeights w;
  w.embed_tokens = PlaceMatrix(arena, c.vocab_size, hidden);
  w.norm = arena.Take<bf16>(hidden);
  w.lm_head = PlaceMatrix(arena, c.vocab_size, hidden);
  w.layers.resize(c.num_layers);
  for (int64_t i = 0; i < c.num_layers; ++i) {
    DeviceLayer& l = w.layers[i];
    l.input_norm = arena.Take<bf16>(hidden);
    l.post_attention_norm = arena.Take<bf16>(hidden);
    const int64_t q_rows = c.q_lora_rank > 0 ? c.q_lora_rank : heads * c.qk_head_dim();
    l.moe = c.IsMoeLayer(i);
    // Room for the folded routers when this GPU routes over every expert (DeviceLayer).
    const int64_t fold_rows = l.moe && shard.num_routed == c.n_routed_experts ? c.n_routed_experts : 0;
    l.input_proj = PlaceMatrix(arena, q_rows + c.kv_cache_width() + fold_rows, hidden);
    l.input_proj.rows -= fold_rows;
    l.router_from_input = {l.input_proj.data == nullptr ? nullptr : l.input_proj.data + l.input_proj.rows * hidden,
                           fold_rows, hidden};
    const DeviceMatrix q_part{l.input_proj.data, q_rows, hidden};
    l.kv_a_proj = {l.input_proj.data == nullptr ? nullptr : l.input_proj.data + q_rows * hidden, c.kv_cache_width(),
                   hidden};
    if (c.q_lora_rank > 0) {
      l.q_a_proj = q_part;
      l.q_a_norm = arena.Take<bf16>(c.q_lora_rank);
      l.q_b_proj = PlaceMatrix(arena, heads * c.qk_head_dim(), c.q_lora_rank);
    } else {
      l.q_proj = q_part;
    }
    l.kv_a_norm = arena.Take<bf16>(c.kv_lora_rank);
    l.kv_b_proj = PlaceMatrix(arena, heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank);
    l.absorbed_keys = arena.Take<bf16>(heads * c.kv_lora_rank * c.qk_nope_head_dim);
    l.o_proj = PlaceMatrix(arena, hidden + fold_rows, heads * c.v_head_dim);
    l.o_proj.rows = hidden;
    l.router_from_attention = {l.o_proj.data == nullptr ? nullptr : l.o_proj.data + hidden * l.o_proj.cols, fold_rows,
                               l.o_proj.cols};
    if (!l.moe) {
      l.mlp_gate_up = PlaceMatrix(arena, 2 * c.intermediate_size, hidden);
      l.mlp_down = PlaceMatrix(arena, hidden, c.intermediate_size);
      continue;
    }
    const int64_t experts = c.n_routed_experts, inter = c.moe_intermediate_size;
    l.router = PlaceMatrix(arena, experts, hidden);
    if (c.topk_method == TopkMethod::kNoAuxTc) l.router_bias = arena.Take<float>(experts);
    l.experts_gate_up = arena.Take<bf16>(shard.num_experts() * 2 * inter * hidden);
    l.experts_down = arena.Take<bf16>(shard.num_experts() * hidden * inter);
  }
  return w;
}

absl::Status LoadWeights(const ModelConfig& c, const ExpertShard& shard, const Checkpoint& checkpoint,
                         const DeviceWeights& w) {
  if (c.attention_bias) {
    return absl::UnimplementedError("the CUDA backend does not support attention_bias: true; use --device cpu");
  }
  Uploader up(checkpoint);
  const int64_t hidden = c.hidden_size;
  COHORT_RETURN_IF_ERROR(up.Matrix("model.embed_tokens.weight", w.embed_tokens));
  COHORT_RETURN_IF_ERROR(up.Tensor("model.norm.weight", {hidden}, w.norm));
  const bool tied = !checkpoint.Has("lm_head.weight") && c.tie_word_embeddings;
  COHORT_RETURN_IF_ERROR(up.Matrix(tied ? "model.embed_tokens.weight" : "lm_head.weight", w.lm_head));
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const DeviceLayer& l = w.layers[i];
    const std::string p = absl::StrCat("model.layers.", i);
    COHORT_RETURN_IF_ERROR(up.Tensor(p + ".input_layernorm.weight", {hidden}, l.input_norm));
    COHORT_RETURN_IF_ERROR(up.Tensor(p + ".post_attention_layernorm.weight", {hidden}, l.post_attention_norm));
    const std::string a = p + ".self_attn";
    if (c.q_lora_rank > 0) {
      COHORT_RETURN_IF_ERROR(up.Matrix(a + ".q_a_proj.weight", l.q_a_proj));
      COHORT_RETURN_IF_ERROR(up.Tensor(a + ".q_a_layernorm.weight", {c.q_lora_rank}, l.q_a_norm));
      COHORT_RETURN_IF_ERROR(up.Matrix(a + ".q_b_proj.weight", l.q_b_proj));
    } else {
      COHORT_RETURN_IF_ERROR(up.Matrix(a + ".q_proj.weight", l.q_proj));
    }
    COHORT_RETURN_IF_ERROR(up.Matrix(a + ".kv_a_proj_with_mqa.weight", l.kv_a_proj));
    COHORT_RETURN_IF_ERROR(up.Tensor(a + ".kv_a_layernorm.weight", {c.kv_lora_rank}, l.kv_a_norm));
    COHORT_RETURN_IF_ERROR(up.Matrix(a + ".kv_b_proj.weight", l.kv_b_proj));
    COHORT_RETURN_IF_ERROR(up.Matrix(a + ".o_proj.weight", l.o_proj));
    const std::string m = p + ".mlp";
    if (!l.moe) {
      COHORT_RETURN_IF_ERROR(up.Mlp(m, c.intermediate_size, hidden, l.mlp_gate_up.data, l.mlp_down.data));
      continue;
    }
    const int64_t inter = c.moe_intermediate_size;
    COHORT_RETURN_IF_ERROR(up.Matrix(m + ".gate.weight", l.router));
    if (l.router_bias != nullptr) {
      COHORT_ASSIGN_OR_RETURN(std::vector<float> bias,
                              checkpoint.ReadFloat32(m + ".gate.e_score_correction_bias", {c.n_routed_experts}));
      COHORT_CUDA_RETURN_IF_ERROR(
          cudaMemcpy(l.router_bias, bias.data(), bias.size() * sizeof(float), cudaMemcpyHostToDevice));
    }
    for (int64_t e = 0; e < shard.num_routed; ++e) {
      COHORT_RETURN_IF_ERROR(up.Mlp(absl::StrCat(m, ".experts.", shard.first_routed + e), inter, hidden,
                                    l.experts_gate_up + e * 2 * inter * hidden, l.experts_down + e * hidden * inter));
    }
    if (!shard.shared.empty()) {
      const int64_t first = shard.num_routed;
      COHORT_RETURN_IF_ERROR(up.MlpAsExperts(m + ".shared_experts", c.n_shared_experts, shard.shared, inter, hidden,
                                             l.experts_gate_up + first * 2 * inter * hidden,
                                             l.experts_down + first * hidden * inter));
    }
  }
  return absl::OkStatus();
}

absl::Status FillSyntheticWeights(const ModelConfig& c, const ExpertShard& shard, const DeviceWeights& w,
                                  uint64_t seed) {
  uint64_t next = seed;
  auto random = [&](bf16* data, int64_t count, int64_t fan_in) {
    return CudaStatus(kernels::LaunchFillRandom(data, count, next++ * 0x2545f4914f6cdd1dull,
                                                1.0f / std::sqrt(static_cast<float>(fan_in)), nullptr),
                      "LaunchFillRandom");
  };
  auto matrix = [&](const DeviceMatrix& m) { return random(m.data, m.size(), m.cols); };
  auto ones = [&](bf16* data, int64_t count) {
    return CudaStatus(kernels::LaunchFillConstant(data, count, 1.0f, nullptr), "LaunchFillConstant");
  };
  const int64_t hidden = c.hidden_size;
  COHORT_RETURN_IF_ERROR(random(w.embed_tokens.data, w.embed_tokens.size(), 1));
  COHORT_RETURN_IF_ERROR(ones(w.norm, hidden));
  COHORT_RETURN_IF_ERROR(matrix(w.lm_head));
  for (const DeviceLayer& l : w.layers) {
    COHORT_RETURN_IF_ERROR(ones(l.input_norm, hidden));
    COHORT_RETURN_IF_ERROR(ones(l.post_attention_norm, hidden));
    if (c.q_lora_rank > 0) {
      COHORT_RETURN_IF_ERROR(matrix(l.q_a_proj));
      COHORT_RETURN_IF_ERROR(ones(l.q_a_norm, c.q_lora_rank));
      COHORT_RETURN_IF_ERROR(matrix(l.q_b_proj));
    } else {
      COHORT_RETURN_IF_ERROR(matrix(l.q_proj));
    }
    COHORT_RETURN_IF_ERROR(matrix(l.kv_a_proj));
    COHORT_RETURN_IF_ERROR(ones(l.kv_a_norm, c.kv_lora_rank));
    COHORT_RETURN_IF_ERROR(matrix(l.kv_b_proj));
    COHORT_RETURN_IF_ERROR(matrix(l.o_proj));
    if (!l.moe) {
      COHORT_RETURN_IF_ERROR(matrix(l.mlp_gate_up));
      COHORT_RETURN_IF_ERROR(matrix(l.mlp_down));
      continue;
    }
    const int64_t experts = c.n_routed_experts, inter = c.moe_intermediate_size;
    COHORT_RETURN_IF_ERROR(matrix(l.router));
    if (l.router_bias != nullptr) {
      COHORT_RETURN_IF_ERROR(CudaStatus(kernels::LaunchFillRandomFloat(l.router_bias, experts, next++, 0.01f, nullptr),
                                        "LaunchFillRandomFloat"));
    }
    // The shared experts (after the routed ones) have the fan-ins of the one shared MLP they form.
    const int64_t routed = shard.num_routed, shared = shard.num_shared();
    COHORT_RETURN_IF_ERROR(random(l.experts_gate_up, (routed + shared) * 2 * inter * hidden, hidden));
    COHORT_RETURN_IF_ERROR(random(l.experts_down, routed * hidden * inter, inter));
    if (shared > 0) {
      COHORT_RETURN_IF_ERROR(
          random(l.experts_down + routed * hidden * inter, shared * hidden * inter, c.n_shared_experts * inter));
    } else {
      ++next;  // the seed a shard with shared experts takes: the next layer's weights are every shard's
    }
  }
  COHORT_CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
  return absl::OkStatus();
}

absl::Status DeriveWeights(const ModelConfig& c, DeviceWeights& w) {
  const int64_t nope = c.qk_nope_head_dim, rank = c.kv_lora_rank, hidden = c.hidden_size;
  std::vector<uint16_t> input_norm(hidden);
  for (DeviceLayer& l : w.layers) {
    // Head h's key rows of kv_b_proj are rows [h (nope + v), + nope): a [nope, rank] matrix.
    COHORT_CUDA_RETURN_IF_ERROR(kernels::LaunchTranspose(l.kv_b_proj.data, static_cast<int>(nope),
                                                         static_cast<int>(rank), (nope + c.v_head_dim) * rank,
                                                         static_cast<int>(c.num_heads), l.absorbed_keys, nullptr));
    if (l.router_from_input.rows == 0) continue;
    // The fold divides by the input norm's weights: a zero (or a value that is not finite) would lose
    // that dimension of the residual, so such a layer keeps its router product.
    COHORT_CUDA_RETURN_IF_ERROR(
        cudaMemcpy(input_norm.data(), l.input_norm, hidden * sizeof(bf16), cudaMemcpyDeviceToHost));
    l.router_folded = std::all_of(input_norm.begin(), input_norm.end(), [](uint16_t bits) {
      const float g = BF16ToFloat(bits);
      return std::isfinite(g) && std::fabs(g) >= kMinFoldedNormWeight;
    });
    if (!l.router_folded) continue;
    COHORT_CUDA_RETURN_IF_ERROR(LaunchFoldRouter(
        l.router.data, l.input_norm, l.post_attention_norm, l.o_proj.data, l.router.rows, hidden, l.o_proj.cols,
        l.router_from_input.data, l.router_from_attention.data, nullptr));
  }
  COHORT_CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
  return absl::OkStatus();
}

}  // namespace cohort::cuda
