#include "worker/model/cuda/cuda_engine.h"

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <limits>
#include <map>
#include <optional>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "kernels/attention.h"
#include "kernels/cuda_check.h"
#include "kernels/elementwise.h"
#include "kernels/head_gemm.h"
#include "kernels/mla_decode.h"
#include "kernels/moe.h"
#include "kernels/skinny_gemm.h"
#include "spdlog/spdlog.h"
#include "worker/model/checkpoint.h"
#include "worker/model/cuda/cublas_api.h"
#include "worker/model/cuda/device_memory.h"
#include "worker/model/cuda/device_sampler.h"
#include "worker/model/cuda/device_weights.h"
#include "worker/model/cuda/expert_parallel.h"
#include "worker/model/cuda/gemm.h"
#include "worker/model/cuda/moe_gate.h"
#include "worker/model/cuda/nccl_api.h"
#include "worker/model/rope.h"
#include "worker/model/synthetic.h"

namespace cohort::cuda {
namespace {

// q_a_layernorm and kv_a_layernorm use the RMSNorm default, not rms_norm_eps (as DeepSeek's code does).
constexpr float kLatentNormEps = 1e-6f;
constexpr int64_t kSplitPairs = 1024;                   // partial rows (query, part) the split workspace holds
constexpr int64_t kExpandedKvBytes = int64_t{256} << 20;     // keys and values expanded from the latent
constexpr int64_t kCublasWorkspaceBytes = int64_t{32} << 20;
// Products of up to this many rows use the skinny kernel (kernels/skinny_gemm.h): on the H200 it
// matches or beats cuBLAS at 1-8 rows and trails it at 16-32 (skinny_gemm_bench).
constexpr int64_t kSkinnyRows = 8;
// The attention's per-head products (W_uk, W_uv: Product's batched ones) of more rows, up to this
// many, use the head GEMM (kernels/head_gemm.h): launched under PDL with its weights copied before its
// wait, where cuBLAS's launch stops the chain. cohort bench step against cuBLAS (H200, four device
// calls): batch 16-32 0.5-1.5% faster, 48-64 no faster, 128-512 1-3% slower (skinny_gemm_bench: it
// reads each head's weights and rows again tile by tile, 0.3-0.7x cuBLAS's speed at 128-512 rows).
// W_uk of up to kernels::kMaxAbsorbRows rows is formed by the cache write's own head GEMM tiles, so
// this takes W_uv (and W_uk where the cache write cannot); W_uv up to 48 or 64 rows measured no
// faster than cuBLAS.
constexpr int64_t kHeadProductMaxRows = 32;
// Steps of up to this many rows (on one GPU) take their router's logits from the two attention
// projections (DeviceLayer::router_folded) instead of a router product after the post-attention
// norm: a launch fewer between the attention and the expert products, where every launch at small
// batch is latency. The part over the layer's input is extra columns of the input projection. The
// part over the attention is, up to kRouterTailMaxTokens rows, extra columns of o_proj on the skinny
// GEMM, which cost about nothing; past them (cuBLAS writes one type a product, and o_proj's is bf16)
// a product of its own on the side stream, beside o_proj and the post-attention norm. Except at kRouterProductTokens
// rows: there the shared experts' weights, streamed beside the router product and the route
// (SharedExpertsApart), are worth more than the launch. Against the router product (H200, A/B runs
// in four device calls, contexts 1024 / 4096): batch 1 -2.3 to -3.6%, batch 3 -1.0 to -1.6%, batch 4
// -0.6 to -2.3%, batch 8 -0.2 to -1.4%, but batch 2 -0.2 to +1.4%. With the side product (one call,
// three runs each): batch 16-32 -1.7 to -2.1% at both contexts, 48 -1.1 / -1.4%, 64 -1.1 / 0.0%; in
// an earlier call 128-512 showed no gain, so larger steps keep the router product.
constexpr int64_t kRouterFoldMaxTokens = 64;
// o_proj with the router's part as its tail runs on the skinny GEMM up to here, past kSkinnyRows too:
// a launch fewer than cuBLAS's o_proj and the side product, though the skinny GEMM trails cuBLAS at
// 16 rows. Against 8 (H200, cohort bench step, three runs each, contexts 1024 / 4096): batch 12
// -1.7 / -0.6%, 16 -1.2 / -0.2%; 8 and 24 unchanged.
constexpr int64_t kRouterTailMaxTokens = kernels::kSkinnyMaxTailRows;
constexpr int64_t kRouterProductTokens = 2;
// The side stream's cuBLAS workspace (the folded router's part over the attention: a small product).
constexpr int64_t kSideCublasWorkspaceBytes = int64_t{4} << 20;
// Steps of up to this many tokens run the shared experts inside the grouped MoE products; larger
// (prefill) steps run them on cuBLAS, whose tiles are faster at thousands of rows. (With the
// warp-specialised grouped products, folding them in at every size measured V2-Lite prefill steps
// of 1 x 4096 and 16 x 1024 1.4-2.1% slower on an H200, 1 x 1024 0.6% faster; with their fast SiLU,
// 1 x 2048 and 1 x 4096 0.9-1.4% slower, 1 x 1024 1.5% faster.)
constexpr int64_t kFoldSharedMaxTokens = 512;
// Steps of up to this many tokens run the shared experts on a second stream, beside the routing
// (SharedExpertsApart), where the layer keeps its router product. cohort bench step, V2-Lite on an
// H200, same device call: batch 1 and 2 steps 2% faster than with the shared experts folded into
// the routed products; batch 4 and up 1-3% slower. With the router folded (RouterFolded) at one
// token the routing is one launch and they run in the routed products again; at 8-48, below.
constexpr int64_t kSharedApartMaxTokens = 2;
// With the router folded, steps of this many tokens run them apart too: from the post-attention norm
// (and the router's part beside o_proj, past kRouterTailMaxTokens) on, their 35 MB stream beside
// the route's launch instead of after it in the routed products. Against the routed products (H200,
// cohort bench step, contexts 1024 / 4096, medians of 3-5 runs, four device calls, batch sizes
// padded to these graph buckets): 8 rows -0.2 to -0.8%, 16 rows -0.8 to +0.7%, 24 rows -0.3 to
// -1.9% and 32 rows -1.0 to -2.1% in three calls, +1.2% and +0.1 / +0.2% in the fourth (whose runs
// of this code were all slow together: a mode of a process, not of its steps), 48 rows -0.9 to
// +0.2%; but 4 rows +0.8 / +0.9% and 64 rows +0.3 to +0.6%.
constexpr int64_t kSharedApartFoldedMinTokens = 8;
constexpr int64_t kSharedApartFoldedMaxTokens = 48;
// Routed ids per token in the shared experts' own routing (SharedExpertsApart): all -1, so one is
// enough. The grouped products size their grids from it (a bound on the tiles from the batch shape):
// with the model's k they would launch blocks for tiles that cannot exist.
constexpr int32_t kSharedApartTopK = 1;
// Up to this many absorbed tokens the attention's W_uv product is done by the merge of its context
// splits (kernels::MlaDecodeParams::value_weights): a launch less, but every block of a head merges
// the head's partials again. H200, cohort bench step against the separate product: batch 1 2.5%
// faster; with the merge's one-pass loads (kernels/mla_decode.cu), batch 2 2% faster at context
// 1024 and the same at 4096, batch 4 the same at 1024 and 3% slower at 4096, batch 8 3-5% slower.
constexpr int64_t kMergeValuesMaxTokens = 2;
constexpr int64_t kReserveBytes = int64_t{512} << 20;   // CUDA graphs, cuBLAS and driver state
constexpr uint64_t kSyntheticSeed = 0x5eed;
// What ValidateBatch is told of the logits buffer for one GPU's part of a step: GPU 0 returns every
// GPU's logits, and the engine that split the batch checked the buffer for them.
constexpr size_t kLogitsChecked = std::numeric_limits<size_t>::max();

// Batch sizes decode graphs are captured for; a decode step of n sequences replays the smallest
// bucket >= n with padding rows.
std::vector<int> GraphBuckets(int64_t max_sequences) {
  std::vector<int> buckets;
  for (int b : {1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 896, 1024}) {
    if (b < max_sequences) buckets.push_back(b);
  }
  buckets.push_back(static_cast<int>(max_sequences));
  return buckets;
}

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// y = x . w^T's shape, pointers and strides into a kernel's parameters (kernels::SkinnyGemmParams,
// kernels::HeadGemmParams: the same fields).
template <class Params>
void SetOperands(int64_t m, int64_t n, int64_t k, const GemmOperand& x, const GemmOperand& w, const GemmOutput& y,
                 int batch, Params& p) {
  p.x = static_cast<const bf16*>(x.data);
  p.x_row_stride = x.ld;
  p.x_batch_stride = x.batch_stride;
  p.w = static_cast<const bf16*>(w.data);
  p.w_row_stride = w.ld;
  p.w_batch_stride = w.batch_stride;
  p.y = static_cast<decltype(p.y)>(y.data);
  p.y_row_stride = y.ld;
  p.y_batch_stride = y.batch_stride;
  p.rows = static_cast<int>(m);
  p.n_out = static_cast<int>(n);
  p.k = static_cast<int>(k);
  p.batch = batch;
}

// Columns of the query part of DeviceLayer::input_proj: the queries, or their LoRA down-projection.
int64_t QueryProjectionWidth(const ModelConfig& c) {
  return c.q_lora_rank > 0 ? c.q_lora_rank : c.num_heads * c.qk_head_dim();
}

// Columns of DeviceLayer::input_proj's product: [queries | latent], then (with a folded router) the
// router's part, in ws_.projected.
int64_t InputProjectionWidth(const ModelConfig& c) { return QueryProjectionWidth(c) + c.kv_cache_width(); }

// Longest contexts decode graphs are captured for (0: any). The attention's context splits are
// fixed in a graph; short contexts get fewer of them, so fewer partial results to merge.
constexpr int64_t kGraphContexts[] = {512, 2048, 0};  // 0 last: RunStep takes the first that fits

// A captured decode graph: batch size, context class, whether its attention has room to cut
// contexts unevenly (kernels::MlaDecodeShapeFor): a wider merge, or one where the even plan has
// none, which steps of even contexts do without; and on one GPU, which sampling kernel it ends with
// (DeviceSampler::greedy_only: the greedy one, or the general one).
struct GraphKey {
  int bucket;
  int64_t max_context;
  bool uneven = false;
  bool greedy = true;
  auto operator<=>(const GraphKey&) const = default;
};

// Consecutive prefill chunks attended in the expanded form whose contexts fit the expanded
// workspace together: their contexts are gathered one after another (each from a multiple of 8
// rows, as the flash launch asks), expanded by one pair of products and attended in one launch.
struct ExpandedGroup {
  std::vector<kernels::FlashChunk> chunks;  // query rows in token order, key rows of the workspace
  std::vector<int> table_offsets;           // of each chunk's block table in the step's tables
  // The workspace rows up to the last chunk's last key.
  int64_t keys() const { return int64_t{chunks.back().first_key} + chunks.back().keys; }
};

// How a step is laid out on the device. Tokens are reordered so those attending in the absorbed
// form come first; logits rows stay in batch order.
struct StepLayout {
  int bucket = 0;           // the decode graph's batch size; 0 for an eager step
  int num_tokens = 0;       // rows of every activation (padded to the bucket under a graph)
  int batch_tokens = 0;     // the batch's own tokens: rows [batch_tokens, num_tokens) are padding
  int absorbed_tokens = 0;  // tokens [0, absorbed_tokens)
  int rows = 0;             // this GPU's logits rows
  // Rows of the LM head: `rows` on one GPU; on GPU 0 of several, every GPU's logits rows (the others
  // compute none).
  int lm_rows = 0;
  // The absorbed attention's launch (with room for uneven plans where the step's plan takes them:
  // GraphKey::uneven), and its plan's place in the inputs.
  kernels::MlaDecodeShape attention;
  bool values_in_merge = false;       // the attention's merge applies W_uv
  int absorbed_run = 0;     // the most absorbed tokens of one sequence (MlaDecodeParams::step_tokens_bound)
  std::vector<ExpandedGroup> expanded;
};

class CudaEngine final : public ShardEngine {
 public:
  CudaEngine(ModelConfig config, const EngineOptions& options, int rank, int world, int device)
      : config_(std::move(config)),
        options_(options),
        rope_(config_),
        rank_(rank),
        world_(world),
        shard_(ExpertShard::Of(config_, rank, world)),
        device_(device >= 0 ? device : options.device_id + rank) {}
  ~CudaEngine() override;

  // Everything but the NCCL group and the graphs (ShardEngine::Prepare).
  absl::Status Initialize();
  absl::Status Start(const NcclApi* nccl, const ncclUniqueId* id) override;
  absl::Status ForwardShard(std::span<const SequenceStep> batch, const ShardStep& step,
                            std::span<float> logits) override;
  absl::Status ForwardAndSampleShard(std::span<const SequenceStep> batch, const ShardStep& step,
                                     std::span<Sampler* const> samplers, std::span<SampledToken> tokens) override;
  void Abort() override;

  const ModelConfig& config() const override { return config_; }
  const KvCacheGeometry& kv_geometry() const override { return geometry_; }
  StepStats last_step_stats() const override { return stats_; }
  int64_t weight_value_bytes() const override { return sizeof(bf16); }

  absl::Status Forward(std::span<const SequenceStep> batch, std::span<float> logits) override {
    return ForwardOn(batch, nullptr, logits);
  }
  absl::Status ForwardAndSample(std::span<const SequenceStep> batch, std::span<Sampler* const> samplers,
                                std::span<SampledToken> tokens) override {
    return SampleOn(batch, nullptr, samplers, tokens);
  }

 private:
  // Device buffers for one step at the largest size the engine accepts.
  struct Workspace {
    // Step inputs, uploaded in one copy from `staging_` (same layout, int32). The attention's plan
    // (kernels::MlaDecodePlanner) comes first, as many rows as the step's launch has, placed to
    // end where the tokens begin (PlanOffset) so that the copy starts at it.
    int32_t* inputs = nullptr;
    int32_t *tokens, *positions, *token_sequence, *table_offsets, *logits_rows, *num_valid, *gathered_logits_rows,
        *block_tables;
    float* residual;
    bf16 *x, *delta, *q, *q_a_normed, *q_latent, *o_latent, *attn;
    float *projected, *split_partials, *router_logits, *topk_weights;
    float *inv_rms_in, *inv_rms_post;  // the two norms' per-row scales, for a folded router
    int32_t* topk_ids;
    bf16 *mlp_gate_up, *mlp_act, *routed_act, *routed_out, *shared_out;
    // With several GPUs: every GPU's rows gathered [world * T, H], this GPU's share of their combine
    // (fp32, the same rows), and the sum of the shares for this GPU's rows [T, H].
    bf16* x_all;
    float *moe_all, *moe_sum;
    bf16* final_all;  // every GPU's final rows [world * T, H], which GPU 0 turns into logits
    void* moe_workspace;
    // The shared experts apart (SharedExpertsApart): their routing, made from kSharedApartTopK routed
    // ids per token that are all -1, their activations and their S output matrices [S][T, H].
    void* shared_routing;
    int32_t* no_routed_ids;
    bf16 *shared_act, *shared_rows;
    bf16 *final_rows, *gathered, *expanded_keys, *expanded_values_t;
    float* logits;
    int32_t* experts_used;
    void* cublas_workspace;
    void* side_cublas_workspace;
  };

  void PlaceWorkspace(DeviceArena& arena, Workspace& ws) const;
  // `graph` pads a decode step to a captured graph's batch size and uses its context splits; `shard`
  // (several GPUs) pads an eager step to the rows every GPU brings.
  absl::StatusOr<StepLayout> Plan(std::span<const SequenceStep> batch, const GraphKey* graph,
                                  const ShardStep* shard = nullptr);
  absl::Status Upload(int64_t first, int64_t used_table_entries);
  absl::Status RecordForward(const StepLayout& layout);
  absl::Status Attention(const DeviceLayer& layer, int64_t index, const StepLayout& s);
  absl::Status ExpandedAttention(const ExpandedGroup& group, const DeviceLayer& layer, bf16* layer_cache);
  // The MoE path leaves its weighted combine to the next NormalizeResidual (pending_combine_); with
  // several GPUs it runs this GPU's experts on every GPU's rows (GatherRows), combines them, and
  // sums the GPUs' combines for this GPU's rows (ReduceScatterMoe).
  absl::Status FeedForward(const DeviceLayer& layer, const StepLayout& s);
  // all [world * T, H] = every GPU's rows [T, H], one GPU after another.
  absl::Status GatherRows(const bf16* rows, bf16* all, int64_t T);
  absl::Status ReduceScatterMoe(const MoeRouting& routing, const MoeCombineAdd& add, int64_t rows);
  // Launches a small step's shared experts on the rows x on side_stream_, which forks from stream_
  // here (after the post-attention norm, the gather of every GPU's rows, and the join of a folded
  // router's part beside o_proj) and joins it again in FeedForward before the combine; they leave
  // their S outputs in ws_.shared_rows.
  absl::Status SharedExpertsApart(const DeviceLayer& layer, const bf16* x, int64_t num_tokens);
  // side_stream_ waits for what stream_ has queued so far; work queued on it after runs beside
  // stream_'s next launches until side_join_ is recorded there and waited for on stream_.
  absl::Status ForkSide() {
    COHORT_CUDA_RETURN_IF_ERROR(cudaEventRecord(side_fork_, stream_));
    COHORT_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(side_stream_, side_fork_, 0));
    return absl::OkStatus();
  }
  // residual += the last block's output (ws_.delta, or the pending MoE combine; nothing before the
  // first layer), then x = RMSNorm(residual) * weight; inv_rms, when not null, gets each row's scale.
  absl::Status NormalizeResidual(const bf16* weight, int64_t rows, bool first, float* inv_rms = nullptr);
  // Whether a step of `tokens` rows takes layer l's router logits from its attention projections.
  bool RouterFolded(const DeviceLayer& l, int64_t tokens) const {
    return l.router_folded && world_ == 1 && tokens <= kRouterFoldMaxTokens && tokens != kRouterProductTokens;
  }
  // Whether a step of `tokens` rows does layer l's post-attention norm in its route (MoeRouteNorm):
  // one token with a folded router. (Up to four tokens in one block measured within 0.3% of the
  // norm launch at batch 3-4, H200; two tokens folded, with it, no better than the router product.)
  bool NormInRoute(const DeviceLayer& l, int64_t tokens) const { return tokens == 1 && RouterFolded(l, tokens); }
  // Whether a folded router's part over the attention is a product of its own on side_stream_
  // (forked in Attention, joined in FeedForward) rather than o_proj's tail.
  bool RouterPartBeside(const DeviceLayer& l, int64_t tokens) const {
    return RouterFolded(l, tokens) && tokens > kRouterTailMaxTokens;
  }
  // Row stride of ws_.projected in a step of `tokens` rows: the input projection's columns, and with
  // a folded router its rows over the layer's input (which the route then reads at this stride).
  int64_t ProjectedStride(const DeviceLayer& l, int64_t tokens) const {
    return InputProjectionWidth(config_) + (RouterFolded(l, tokens) ? l.router_from_input.rows : 0);
  }
  // y = x . w^T for a weight w stored [n, k] like a Linear layer's (per attention head with
  // batch > 1): the skinny kernel at decode row counts, where it streams weights faster than cuBLAS
  // and overlaps the kernel before it; the per-head products (W_uk, W_uv) on the head GEMM up to
  // kHeadProductMaxRows rows; cuBLAS above.
  absl::Status Product(int64_t m, int64_t n, int64_t k, const GemmOperand& x, const GemmOperand& w,
                       const GemmOutput& y, int batch = 1);
  // y[T, N] = x[T, K] . w^T in bf16 (a Linear layer).
  absl::Status Linear(const DeviceMatrix& w, const bf16* x, int64_t rows, bf16* y);
  // Enqueues one step: inputs, the forward pass (a graph replay for decode-only steps), up to logits;
  // true when a graph also sampled them (SamplesInGraph), with the parameters of sampler_'s
  // prepared step.
  absl::StatusOr<bool> RunStep(std::span<const SequenceStep> batch, const ShardStep* shard);
  // Decode graphs end with the sampling kernel on one GPU. Launched after the graph, it started 11 us
  // after the LM head ended and ended 22 us after it; in the graph, under PDL, it ends 10 us after
  // it (kernel trace at batch 1, H200; cohort bench step 0.6-1.3% faster at batch 1-4). With several
  // GPUs, GPU 0 samples every GPU's rows after its graph.
  bool SamplesInGraph() const { return world_ == 1; }
  // Ends a step: the count of routed experts it used comes down for last_step_stats(), after whatever
  // the caller enqueued, and the stream is synchronised.
  absl::Status FinishStep();
  // Forward and ForwardAndSample, on one GPU (shard null) or as one GPU's part of a step.
  absl::Status ForwardOn(std::span<const SequenceStep> batch, const ShardStep* shard, std::span<float> logits);
  absl::Status SampleOn(std::span<const SequenceStep> batch, const ShardStep* shard,
                        std::span<Sampler* const> samplers, std::span<SampledToken> tokens);
  // Makes this engine's GPU the calling thread's current device: the thread that steps the engine
  // need not be the one that created it.
  absl::Status UseDevice() const { return CudaStatus(cudaSetDevice(device_), "cudaSetDevice"); }
  // Keys a row of the transposed expanded values holds: the longest expanded context in whole 16-byte chunks.
  int64_t ExpandedValuesLd() const { return CeilDiv(expanded_context_, 8) * 8; }
  absl::Status CaptureGraphs();
  absl::Status CaptureGraph(const GraphKey& key, bool warm_up);
  // Plans the absorbed attention of a step into `s` and the staging buffer: the launch for `queries`
  // queries whose longest context is `max_context` (positions, token_sequence and table_offsets:
  // the step inputs being staged), with room for uneven cuts where the plan takes them
  // (kernels::MlaDecodePlanner), or always with `uneven` (a graph's capture, whose padding rows the
  // even plan cuts into one item each: it fits).
  absl::Status PlanAttention(int queries, int64_t max_context, bool uneven, const int32_t* positions,
                             const int32_t* token_sequence, const int32_t* table_offsets, StepLayout& s);
  // Where `shape`'s plan lies in the step inputs (as an offset in ints): merge rows, then work items,
  // ending at the tokens.
  int64_t PlanOffset(const kernels::MlaDecodeShape& shape) const {
    return plan_ints_ - kernels::MlaPlanBytes(shape) / static_cast<int64_t>(sizeof(int32_t));
  }
  bf16* LayerCache(int64_t layer) const { return kv_cache_ + layer * layer_cache_elements_; }
  kernels::RopeParams RopeArgs() const {
    return {rope_inv_freq_, static_cast<int>(config_.qk_rope_head_dim), rope_.attention_factor(),
            config_.rope_interleave};
  }

  ModelConfig config_;
  EngineOptions options_;
  Rope rope_;
  const int rank_;   // of the GPUs the experts are split over (0 on one GPU)
  const int world_;  // how many there are
  const ExpertShard shard_;
  const int device_;  // this GPU
  const NcclApi* nccl_ = nullptr;  // with world_ > 1
  ncclComm_t comm_ = nullptr;
  std::atomic<bool> aborted_{false};    // Abort() was called: no more NCCL calls
  std::atomic<bool> comm_freed_{false};  // by Abort(), with an NCCL that cannot revoke
  KvCacheGeometry geometry_;
  StepStats stats_;
  int num_sms_ = 0;
  int64_t mla_resident_blocks_ = 0;  // attention blocks the GPU holds at once
  int64_t max_tokens_ = 0;     // per step
  int64_t moe_tokens_ = 0;     // rows of an MoE layer: max_tokens_ of every GPU
  int64_t max_sequences_ = 0;  // per step
  int64_t table_capacity_ = 0; // block-table entries per step
  int64_t expanded_context_ = 0;  // longest context the expanded prefill path takes
  int64_t layer_cache_elements_ = 0;

  DeviceArena weight_arena_, workspace_arena_, cache_arena_;
  DeviceWeights weights_;
  Workspace ws_{};
  float* rope_inv_freq_ = nullptr;
  bf16* kv_cache_ = nullptr;  // [layers][blocks + 1][block_size][kv_cache_width]; the last block is scratch
  int64_t moe_workspace_bytes_ = 0;
  int64_t shared_apart_tokens_ = 0;   // tokens SharedExpertsApart's buffers hold (0: no shared experts)
  int64_t shared_routing_bytes_ = 0;
  MoeGateParams gate_params_;  // the model's routing, for every MoE layer's gate
  // An MoE block's output, combined by the norm after it (LaunchMoeCombineAddRmsNorm), or already
  // combined and summed across GPUs in ws_.moe_sum.
  struct PendingCombine {
    MoeRouting routing;
    MoeCombineAdd add;  // the shared experts' outputs when they ran outside the routed products
    bool summed = false;
  };
  std::optional<PendingCombine> pending_combine_;

  cudaStream_t stream_ = nullptr;
  // A second stream for work beside the main chain (SharedExpertsApart's products, a folded router's
  // part over the attention), forked from stream_ and joined back through the two events; with its own
  // cuBLAS handle and workspace, as a product there may run beside one on stream_.
  cudaStream_t side_stream_ = nullptr;
  cudaEvent_t side_fork_ = nullptr, side_join_ = nullptr;
  const CublasApi* cublas_api_ = nullptr;
  cublasHandle_t cublas_ = nullptr, side_cublas_ = nullptr;
  std::unique_ptr<DeviceSampler> sampler_;
  PinnedBuffer<int32_t> staging_;
  PinnedBuffer<int32_t> experts_used_host_;
  int64_t staging_header_ = 0;  // ints before the block tables
  int64_t plan_ints_ = 0;       // ints before the tokens, for the attention's plan
  std::vector<int> buckets_;  // batch sizes with decode graphs, ascending
  std::map<GraphKey, cudaGraphExec_t> graphs_;
  // Plan's per-step scratch, kept so a step allocates nothing on the host either.
  std::vector<size_t> order_;
  std::vector<int> last_token_;
  std::vector<int32_t> query_tables_;  // each absorbed query's table offset
  kernels::MlaDecodePlanner attention_planner_;
};

CudaEngine::~CudaEngine() {
  (void)UseDevice();
  for (auto& [bucket, graph] : graphs_) cudaGraphExecDestroy(graph);
  if (comm_ != nullptr && !comm_freed_) (aborted_ ? nccl_->comm_abort : nccl_->comm_destroy)(comm_);
  if (cublas_ != nullptr) cublas_api_->destroy(cublas_);
  if (side_cublas_ != nullptr) cublas_api_->destroy(side_cublas_);
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
  if (side_stream_ != nullptr) cudaStreamDestroy(side_stream_);
  if (side_fork_ != nullptr) cudaEventDestroy(side_fork_);
  if (side_join_ != nullptr) cudaEventDestroy(side_join_);
}

void CudaEngine::PlaceWorkspace(DeviceArena& a, Workspace& ws) const {
  const ModelConfig& c = config_;
  const int64_t T = max_tokens_, S = max_sequences_, H = c.hidden_size, heads = c.num_heads;
  const int64_t width = c.kv_cache_width(), rank = c.kv_lora_rank;
  ws.inputs = a.Take<int32_t>(staging_header_ + table_capacity_);
  ws.tokens = ws.inputs + plan_ints_;
  ws.positions = ws.tokens + T;
  ws.token_sequence = ws.positions + T;
  ws.table_offsets = ws.token_sequence + T;
  ws.logits_rows = ws.table_offsets + S + 1;  // + the padding rows' sequence
  ws.num_valid = ws.logits_rows + S;
  ws.gathered_logits_rows = ws.num_valid + world_;  // several GPUs: ShardStep::logits_rows, padded
  ws.block_tables = ws.gathered_logits_rows + (world_ > 1 ? S : 0);
  if (a.dry_run()) ws = Workspace{};

  ws.residual = a.Take<float>(T * H);
  ws.x = a.Take<bf16>(T * H);
  ws.delta = a.Take<bf16>(T * H);
  ws.q = a.Take<bf16>(T * heads * c.qk_head_dim());
  if (c.q_lora_rank > 0) ws.q_a_normed = a.Take<bf16>(T * c.q_lora_rank);
  // With the folded router's columns for up to kRouterFoldMaxTokens rows.
  ws.projected = a.Take<float>(T * InputProjectionWidth(c) + kRouterFoldMaxTokens * c.n_routed_experts);
  ws.q_latent = a.Take<bf16>(T * heads * rank);
  ws.o_latent = a.Take<bf16>(T * heads * rank);
  ws.attn = a.Take<bf16>(T * heads * c.v_head_dim);
  // Partial outputs and log-sum-exps of up to kSplitPairs partial rows.
  ws.split_partials = a.Take<float>(kernels::MlaSplitWorkspaceFloats(kSplitPairs, static_cast<int>(heads),
                                                                     static_cast<int>(rank)));

  // The dense layers' MLP, and the shared experts of steps too large to fold them into the grouped products.
  const int64_t shared = shard_.num_shared(), M = moe_tokens_;
  const int64_t mlp_values = std::max(T * c.intermediate_size, M * c.moe_intermediate_size * shared);
  ws.mlp_gate_up = a.Take<bf16>(2 * mlp_values);
  ws.mlp_act = a.Take<bf16>(mlp_values);
  if (c.n_routed_experts > 0) {
    // One row per (token, routed slot) and per (token, shared expert): the grouped GEMMs run both.
    const int64_t pairs = M * c.num_experts_per_tok, inter = c.moe_intermediate_size;
    const int64_t rows = M * (c.num_experts_per_tok + shared);
    ws.router_logits = a.Take<float>(M * c.n_routed_experts);
    ws.inv_rms_in = a.Take<float>(kRouterFoldMaxTokens);
    ws.inv_rms_post = a.Take<float>(kRouterFoldMaxTokens);
    ws.topk_ids = a.Take<int32_t>(pairs);
    ws.topk_weights = a.Take<float>(pairs);
    ws.routed_act = a.Take<bf16>(rows * inter);
    ws.routed_out = a.Take<bf16>(rows * H);
    if (shared > 0) ws.shared_out = a.Take<bf16>(M * H);
    if (world_ > 1) {
      ws.x_all = a.Take<bf16>(M * H);
      ws.moe_all = a.Take<float>(M * H);
      ws.moe_sum = a.Take<float>(T * H);
    }
    ws.moe_workspace = a.Take<char>(moe_workspace_bytes_);
    if (shared_apart_tokens_ > 0) {
      const int64_t apart = shared_apart_tokens_;
      ws.shared_routing = a.Take<char>(shared_routing_bytes_);
      ws.no_routed_ids = a.Take<int32_t>(apart * kSharedApartTopK);
      ws.shared_act = a.Take<bf16>(apart * shared * inter);
      ws.shared_rows = a.Take<bf16>(apart * shared * H);
    }
  }
  // With several GPUs every GPU sends GPU 0 as many final rows as the MoE rows it brings.
  ws.final_rows = a.Take<bf16>((world_ > 1 ? T : S) * H);
  if (world_ > 1) ws.final_all = a.Take<bf16>(world_ * T * H);
  ws.logits = a.Take<float>(S * c.vocab_size);
  ws.gathered = a.Take<bf16>(expanded_context_ * width);
  ws.expanded_keys = a.Take<bf16>(expanded_context_ * heads * c.qk_nope_head_dim);
  ws.expanded_values_t = a.Take<bf16>(heads * c.v_head_dim * ExpandedValuesLd());
  ws.experts_used = a.Take<int32_t>(1);
  ws.cublas_workspace = a.Take<char>(kCublasWorkspaceBytes);
  ws.side_cublas_workspace = a.Take<char>(kSideCublasWorkspaceBytes);
}

absl::Status CudaEngine::Initialize() {
  const ModelConfig& c = config_;
  if (c.attention_bias) {
    return absl::UnimplementedError("the CUDA backend does not support attention_bias: true; use --device cpu");
  }
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    (void)cudaGetLastError();
    return absl::FailedPreconditionError("--device cuda: no CUDA device is visible on this machine");
  }
  if (device_ < 0 || device_ >= devices) {
    return absl::InvalidArgumentError(absl::StrCat("GPU ", device_, " does not exist; this machine has ", devices));
  }
  COHORT_RETURN_IF_ERROR(UseDevice());
  cudaDeviceProp props{};
  COHORT_CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&props, device_));
  num_sms_ = props.multiProcessorCount;
  int mla_blocks_per_sm = 0;
  if (kernels::MlaDecodeResidentBlocks(static_cast<int>(c.kv_lora_rank), static_cast<int>(c.qk_rope_head_dim),
                                       &mla_blocks_per_sm) != cudaSuccess) {
    (void)cudaGetLastError();
    return absl::UnimplementedError(absl::StrCat(
        "the CUDA backend's MLA attention supports (kv_lora_rank, qk_rope_head_dim) of (512, 64), (64, 16) "
        "and (32, 8); this model has (", c.kv_lora_rank, ", ", c.qk_rope_head_dim, "): use --device cpu"));
  }
  mla_resident_blocks_ = int64_t{num_sms_} * mla_blocks_per_sm;
  if (options_.kv_block_size <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("--kv-block-size must be positive, got ", options_.kv_block_size));
  }
  if (!(options_.gpu_memory_fraction > 0.0 && options_.gpu_memory_fraction <= 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--gpu-memory-fraction must be in (0, 1], got ", options_.gpu_memory_fraction));
  }

  max_sequences_ = std::max<int64_t>(1, options_.max_sequences);
  max_tokens_ = std::max(options_.max_batch_tokens, max_sequences_);
  const int64_t max_blocks_per_sequence = CeilDiv(c.max_position_embeddings, options_.kv_block_size);
  table_capacity_ = std::min(max_sequences_ * max_blocks_per_sequence, max_tokens_ * max_blocks_per_sequence) + 1;
  moe_tokens_ = world_ * max_tokens_;
  // As PlaceWorkspace lays it out. The attention's plan: a launch has at most a work item for each
  // of max(queries, kSplitPairs) (query, part) pairs and one wave of blocks more, and merge rows for
  // each query of a split launch (at most kSplitPairs / 2 queries) or of one wave of blocks
  // (MlaDecodeShapeFor).
  kernels::MlaDecodeShape most;
  most.work_slots = static_cast<int>(std::max(max_tokens_, kSplitPairs) + mla_resident_blocks_);
  most.merge_rows = static_cast<int>(std::min(max_tokens_, std::max(kSplitPairs / 2, mla_resident_blocks_)));
  plan_ints_ = kernels::MlaPlanBytes(most) / static_cast<int64_t>(sizeof(int32_t));
  staging_header_ = plan_ints_ + 3 * max_tokens_ + 2 * max_sequences_ + 1 + world_ + (world_ > 1 ? max_sequences_ : 0);
  expanded_context_ = std::min<int64_t>(
      c.max_position_embeddings, kExpandedKvBytes / (2 * c.num_heads * (c.qk_nope_head_dim + c.v_head_dim)));
  // Head sizes the flash kernel lacks take the absorbed path for prefill too.
  if (!kernels::FlashPrefillSupports(static_cast<int>(c.qk_nope_head_dim), static_cast<int>(c.qk_rope_head_dim),
                                     static_cast<int>(c.v_head_dim))) {
    expanded_context_ = 0;
  }
  if (options_.expanded_prefill_max_context > 0) {
    expanded_context_ = std::min(expanded_context_, options_.expanded_prefill_max_context);
  }

  if (c.n_routed_experts > 0) {
    if (c.n_routed_experts > kMoeMaxExperts || c.num_experts_per_tok > kMoeMaxTopK ||
        c.n_shared_experts > kMoeMaxShared) {
      return absl::UnimplementedError(absl::StrCat(
          "the CUDA MoE kernels take up to ", kMoeMaxExperts, " routed experts, top-", kMoeMaxTopK, " and ",
          kMoeMaxShared, " shared experts; this model has ", c.n_routed_experts, ", top-", c.num_experts_per_tok,
          " and ", c.n_shared_experts, ": use --device cpu"));
    }
    gate_params_ = MoeGateParamsFor(c);
    moe_workspace_bytes_ = MoeRoutingWorkspaceBytes(moe_tokens_, static_cast<int32_t>(c.num_experts_per_tok),
                                                    shard_.num_routed, shard_.num_shared());
    shared_apart_tokens_ =
        shard_.num_shared() > 0 ? std::min(moe_tokens_, std::max(kSharedApartMaxTokens, kSharedApartFoldedMaxTokens))
                                : 0;
    shared_routing_bytes_ =
        MoeRoutingWorkspaceBytes(shared_apart_tokens_, kSharedApartTopK, shard_.num_routed, shard_.num_shared());
  }

  // Plan: weights, workspace, then the KV cache from what is left.
  DeviceArena weight_plan, workspace_plan;
  PlaceWeights(c, shard_, weight_plan);
  Workspace dry{};
  PlaceWorkspace(workspace_plan, dry);
  const int64_t rope_bytes = 256 + sizeof(float) * c.qk_rope_head_dim / 2;
  size_t free_bytes = 0, total_bytes = 0;
  COHORT_CUDA_RETURN_IF_ERROR(cudaMemGetInfo(&free_bytes, &total_bytes));
  const int64_t budget = static_cast<int64_t>(options_.gpu_memory_fraction * static_cast<double>(total_bytes));
  const int64_t fixed = static_cast<int64_t>(weight_plan.bytes() + workspace_plan.bytes()) + rope_bytes + kReserveBytes;
  const int64_t bytes_per_token = c.num_layers * c.kv_cache_width() * static_cast<int64_t>(sizeof(bf16));
  geometry_.block_size_tokens = options_.kv_block_size;
  geometry_.bytes_per_token = bytes_per_token;
  if (options_.num_kv_blocks > 0) {
    geometry_.num_blocks = options_.num_kv_blocks;
  } else if (options_.kv_cache_bytes > 0) {
    geometry_.num_blocks = options_.kv_cache_bytes / (bytes_per_token * options_.kv_block_size);
  } else {
    geometry_.num_blocks = (budget - fixed) / (bytes_per_token * options_.kv_block_size) - 1;  // + scratch
  }
  const int64_t cache_bytes = (geometry_.num_blocks + 1) * options_.kv_block_size * bytes_per_token;
  auto gib = [](int64_t bytes) { return absl::StrCat(static_cast<double>(bytes >> 20) / 1024.0); };
  if (geometry_.num_blocks <= 0 || fixed + cache_bytes > std::min<int64_t>(budget, static_cast<int64_t>(free_bytes))) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "out of GPU memory: weights ", gib(weight_plan.bytes()), " GiB + workspaces ",
        gib(workspace_plan.bytes()), " GiB + reserve ", gib(kReserveBytes), " GiB + KV cache ",
        gib(std::max<int64_t>(cache_bytes, 0)), " GiB do not fit in --gpu-memory-fraction ",
        options_.gpu_memory_fraction, " of ", gib(total_bytes), " GiB (", gib(free_bytes),
        " GiB free now); lower --max-batch-tokens, --max-running or the KV cache, or use more GPUs"));
  }
  layer_cache_elements_ = (geometry_.num_blocks + 1) * options_.kv_block_size * c.kv_cache_width();
  spdlog::info("cuda: {} on {} ({} SMs): weights {} GiB, workspaces {} GiB, KV cache {} GiB = {} blocks of {} tokens",
               IsSyntheticModel(options_.model_dir) ? options_.model_dir : c.architecture_name, props.name, num_sms_,
               gib(weight_plan.bytes()), gib(workspace_plan.bytes()), gib(cache_bytes), geometry_.num_blocks,
               geometry_.block_size_tokens);
  if (world_ > 1) {
    spdlog::info("cuda: GPU {} of {} (device {}) holds routed experts [{}, {}), {} of {} shared experts and KV pool {}",
                 rank_, world_, device_, shard_.first_routed, shard_.first_routed + shard_.num_routed,
                 shard_.num_shared(), c.n_shared_experts, rank_);
  }

  COHORT_ASSIGN_OR_RETURN(weight_arena_, DeviceArena::Allocate(weight_plan.bytes() + rope_bytes, "the weights"));
  weights_ = PlaceWeights(c, shard_, weight_arena_);
  rope_inv_freq_ = weight_arena_.Take<float>(c.qk_rope_head_dim / 2);
  COHORT_ASSIGN_OR_RETURN(workspace_arena_, DeviceArena::Allocate(workspace_plan.bytes(), "the step workspaces"));
  PlaceWorkspace(workspace_arena_, ws_);
  COHORT_ASSIGN_OR_RETURN(cache_arena_, DeviceArena::Allocate(cache_bytes, "the KV cache"));
  kv_cache_ = cache_arena_.Take<bf16>(cache_bytes / sizeof(bf16));
  COHORT_CUDA_RETURN_IF_ERROR(cudaMemcpy(rope_inv_freq_, rope_.inv_freq().data(),
                                         rope_.inv_freq().size() * sizeof(float), cudaMemcpyHostToDevice));

  if (IsSyntheticModel(options_.model_dir)) {
    COHORT_RETURN_IF_ERROR(FillSyntheticWeights(c, shard_, weights_, kSyntheticSeed));
    // A random cache too, so decode benchmarks at long contexts need no prefill first.
    COHORT_CUDA_RETURN_IF_ERROR(kernels::LaunchFillRandom(kv_cache_, cache_bytes / sizeof(bf16), kSyntheticSeed, 1.0f, nullptr));
    COHORT_CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
  } else {
    COHORT_ASSIGN_OR_RETURN(auto checkpoint, Checkpoint::Open(options_.model_dir));
    COHORT_RETURN_IF_ERROR(LoadWeights(c, shard_, *checkpoint, weights_));
  }
  COHORT_RETURN_IF_ERROR(DeriveWeights(c, weights_));

  COHORT_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  COHORT_ASSIGN_OR_RETURN(cublas_api_, CublasApi::Load());
  COHORT_RETURN_IF_ERROR(CublasStatus(cublas_api_->create(&cublas_), "cublasCreate"));
  COHORT_RETURN_IF_ERROR(CublasStatus(cublas_api_->set_stream(cublas_, stream_), "cublasSetStream"));
  COHORT_RETURN_IF_ERROR(CublasStatus(cublas_api_->set_workspace(cublas_, ws_.cublas_workspace, kCublasWorkspaceBytes),
                                      "cublasSetWorkspace"));
  COHORT_CUDA_RETURN_IF_ERROR(staging_.Allocate(staging_header_ + table_capacity_));
  COHORT_CUDA_RETURN_IF_ERROR(experts_used_host_.Allocate(1));
  COHORT_ASSIGN_OR_RETURN(sampler_, DeviceSampler::Create(c.vocab_size, max_sequences_));
  COHORT_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&side_stream_, cudaStreamNonBlocking));
  COHORT_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&side_fork_, cudaEventDisableTiming));
  COHORT_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&side_join_, cudaEventDisableTiming));
  COHORT_RETURN_IF_ERROR(CublasStatus(cublas_api_->create(&side_cublas_), "cublasCreate"));
  COHORT_RETURN_IF_ERROR(CublasStatus(cublas_api_->set_stream(side_cublas_, side_stream_), "cublasSetStream"));
  COHORT_RETURN_IF_ERROR(CublasStatus(
      cublas_api_->set_workspace(side_cublas_, ws_.side_cublas_workspace, kSideCublasWorkspaceBytes),
      "cublasSetWorkspace"));
  if (ws_.no_routed_ids != nullptr) {  // SharedExpertsApart's ids
    const int64_t ids = shared_apart_tokens_ * kSharedApartTopK;  // as PlaceWorkspace sized them
    COHORT_CUDA_RETURN_IF_ERROR(cudaMemset(ws_.no_routed_ids, 0xff, ids * sizeof(int32_t)));  // -1 each
  }
  // The rows between two chunks' contexts in the expanded workspace (up to 7) are expanded too, and
  // their values multiplied by probabilities of zero (kernels/attention.h), so they must be finite:
  // zeros from here on, or rows of earlier steps' contexts.
  if (expanded_context_ > 0) {
    COHORT_CUDA_RETURN_IF_ERROR(cudaMemset(ws_.gathered, 0, expanded_context_ * c.kv_cache_width() * sizeof(bf16)));
  }
  return absl::OkStatus();
}

absl::Status CudaEngine::Start(const NcclApi* nccl, const ncclUniqueId* id) {
  COHORT_RETURN_IF_ERROR(UseDevice());
  if (world_ > 1) {
    nccl_ = nccl;
    COHORT_RETURN_IF_ERROR(NcclStatus(*nccl_, nccl_->comm_init_rank(&comm_, world_, *id, rank_), "ncclCommInitRank"));
  }
  return CaptureGraphs();
}

void CudaEngine::Abort() {
  if (comm_ == nullptr || aborted_.exchange(true)) return;
  if (nccl_->comm_revoke != nullptr) {
    nccl_->comm_revoke(comm_, 0);
  } else {
    // Frees the communicator under a thread that may be about to use it; NCCLs since 2.28 revoke.
    nccl_->comm_abort(comm_);
    comm_freed_ = true;
  }
}

absl::Status CudaEngine::PlanAttention(int queries, int64_t max_context, bool uneven, const int32_t* positions,
                                       const int32_t* token_sequence, const int32_t* table_offsets, StepLayout& s) {
  const int heads = static_cast<int>(config_.num_heads);
  const int splits = kernels::MlaDecodeSplits(queries, heads, max_context, mla_resident_blocks_, kSplitPairs);
  const auto shape = [&](bool room) {
    return kernels::MlaDecodeShapeFor(queries, heads, splits, mla_resident_blocks_, kSplitPairs, room);
  };
  s.values_in_merge = queries <= kMergeValuesMaxTokens && splits > 1;
  // The launch with room for uneven cuts where the plan takes them (or a capture asks for it).
  s.attention = shape(attention_planner_.Choose(shape(true), positions, s.values_in_merge) || uneven);
  // The plan, placed to end where the tokens begin (PlanOffset).
  const int64_t offset = PlanOffset(s.attention);
  query_tables_.resize(queries);
  for (int q = 0; q < queries; ++q) query_tables_[q] = table_offsets[token_sequence[q]];
  auto* merges = reinterpret_cast<kernels::MlaMergeRow*>(staging_.data() + std::max<int64_t>(offset, 0));
  auto* work = reinterpret_cast<kernels::MlaWorkItem*>(merges + s.attention.merge_rows);
  if (offset < 0 || !attention_planner_.Write(s.attention, positions, query_tables_.data(), work, merges)) {
    return absl::InternalError(absl::StrCat("the attention's plan does not fit its launch (", s.attention.work_slots,
                                            " items, ", s.attention.merge_rows,
                                            " merge rows) or the room set aside for it"));
  }
  return absl::OkStatus();
}

// Orders the step's tokens (absorbed first), fills the staging buffer and returns the layout.
absl::StatusOr<StepLayout> CudaEngine::Plan(std::span<const SequenceStep> batch, const GraphKey* graph,
                                             const ShardStep* shard) {
  const int bucket = graph != nullptr ? graph->bucket : 0;
  StepLayout s;
  s.bucket = bucket;
  int32_t* tokens = staging_.data() + plan_ints_;
  int32_t* positions = tokens + max_tokens_;
  int32_t* token_sequence = positions + max_tokens_;
  int32_t* table_offsets = token_sequence + max_tokens_;
  int32_t* logits_rows = table_offsets + max_sequences_ + 1;
  int32_t* num_valid = logits_rows + max_sequences_;
  int32_t* gathered_logits_rows = num_valid + world_;
  int32_t* tables = gathered_logits_rows + (world_ > 1 ? max_sequences_ : 0);

  int64_t total_tokens = 0, table_entries = 0;
  for (const SequenceStep& seq : batch) {
    total_tokens += static_cast<int64_t>(seq.tokens.size());
    table_entries += CeilDiv(seq.start_position + static_cast<int64_t>(seq.tokens.size()), geometry_.block_size_tokens);
  }
  if (total_tokens > max_tokens_ || static_cast<int64_t>(batch.size()) > max_sequences_ ||
      table_entries + 1 > table_capacity_) {
    return absl::InvalidArgumentError(absl::StrCat(
        "a step of ", total_tokens, " tokens in ", batch.size(), " sequences exceeds what this engine was sized for (",
        max_tokens_, " tokens, ", max_sequences_, " sequences: --max-batch-tokens, --max-running)"));
  }

  // Absorbed attention: single tokens, and chunks whose context is too long to expand.
  auto absorbed = [&](const SequenceStep& seq) {
    return seq.tokens.size() == 1 || seq.start_position + static_cast<int64_t>(seq.tokens.size()) > expanded_context_;
  };
  std::vector<size_t>& order = order_;
  order.clear();
  for (size_t i = 0; i < batch.size(); ++i) if (absorbed(batch[i])) order.push_back(i);
  for (size_t i = 0; i < batch.size(); ++i) if (!absorbed(batch[i])) order.push_back(i);

  std::vector<int>& last_token = last_token_;
  last_token.resize(batch.size());
  int token = 0;
  int64_t used = 0, max_context = 0;
  for (size_t k = 0; k < order.size(); ++k) {
    const SequenceStep& seq = batch[order[k]];
    const int n = static_cast<int>(seq.tokens.size());
    const int64_t context = seq.start_position + n;
    const int64_t blocks = CeilDiv(context, geometry_.block_size_tokens);
    table_offsets[k] = static_cast<int32_t>(used);
    std::copy_n(seq.block_table.begin(), blocks, tables + used);
    if (absorbed(seq)) {
      s.absorbed_tokens += n;
      s.absorbed_run = std::max(s.absorbed_run, n);
      max_context = std::max(max_context, context);
    } else {
      // A new group when the chunk's context would overflow the expanded workspace.
      int64_t first_key = s.expanded.empty() ? 0 : CeilDiv(s.expanded.back().keys(), 8) * 8;
      if (s.expanded.empty() || first_key + context > expanded_context_) {
        s.expanded.emplace_back();
        first_key = 0;
      }
      ExpandedGroup& group = s.expanded.back();
      group.chunks.push_back({token, n, static_cast<int>(seq.start_position), static_cast<int>(first_key),
                              static_cast<int>(context)});
      group.table_offsets.push_back(static_cast<int>(used));
    }
    used += blocks;
    for (int i = 0; i < n; ++i, ++token) {
      tokens[token] = seq.tokens[i];
      positions[token] = static_cast<int32_t>(seq.start_position + i);
      token_sequence[token] = static_cast<int32_t>(k);
    }
    last_token[order[k]] = token - 1;
  }
  for (size_t i = 0; i < batch.size(); ++i) {
    if (batch[i].compute_logits) logits_rows[s.rows++] = last_token[i];
  }
  // Each GPU's tokens, which the MoE layers tell from padding rows (on one GPU, this step's); and
  // on GPU 0 of several, where every GPU's logits rows are among their gathered final rows.
  if (world_ == 1) {
    num_valid[0] = token;
  } else {
    for (int g = 0; g < world_; ++g) num_valid[g] = shard != nullptr ? shard->tokens[g] : 0;  // 0: capture
    const int64_t lm_rows = shard != nullptr ? static_cast<int64_t>(shard->logits_rows.size()) : 0;
    // A graph's LM head takes as many rows as every GPU's bucket could want, up to the batch limit.
    s.lm_rows = static_cast<int>(bucket > 0 ? std::min<int64_t>(world_ * bucket, max_sequences_) : lm_rows);
    if (rank_ != 0) s.lm_rows = 0;
    // ShardStep counts `rows` per GPU; a graph gathers its bucket's rows from each.
    const int per_gpu = bucket > 0 ? bucket : (shard != nullptr ? shard->rows : 0);
    for (int64_t r = 0; r < s.lm_rows; ++r) {
      const int32_t at = r < lm_rows ? shard->logits_rows[r] : 0;
      gathered_logits_rows[r] = r < lm_rows ? at / shard->rows * per_gpu + at % shard->rows : 0;
    }
  }
  s.num_tokens = s.batch_tokens = token;
  // Padding rows are token 0 at position 0 of a sequence whose only block is the scratch block.
  if (bucket > 0) {
    // As many as the graph's batch size; each is a decode row of its own sequence.
    tables[used] = static_cast<int32_t>(geometry_.num_blocks);
    for (int r = token; r < bucket; ++r) {
      tokens[r] = 0;
      positions[r] = 0;
      token_sequence[r] = r;
      table_offsets[r] = static_cast<int32_t>(used);
      logits_rows[r] = r;
    }
    ++used;
    s.num_tokens = s.absorbed_tokens = s.rows = bucket;
    s.absorbed_run = 1;
    COHORT_RETURN_IF_ERROR(
        PlanAttention(bucket, graph->max_context, graph->uneven, positions, token_sequence, table_offsets, s));
  } else {
    if (shard != nullptr && shard->rows > token) {
      // Up to the rows every GPU brings, after the expanded chunks: they attend over nothing (their
      // attention rows are zeroed in RunStep) and share one sequence past the batch's.
      const int padding_sequence = static_cast<int>(batch.size());
      table_offsets[padding_sequence] = static_cast<int32_t>(used);
      tables[used++] = static_cast<int32_t>(geometry_.num_blocks);
      for (int r = token; r < shard->rows; ++r) {
        tokens[r] = 0;
        positions[r] = 0;
        token_sequence[r] = padding_sequence;
      }
      s.num_tokens = shard->rows;
    }
    COHORT_RETURN_IF_ERROR(PlanAttention(s.absorbed_tokens, max_context, /*uneven=*/false, positions, token_sequence,
                                         table_offsets, s));
  }
  if (world_ == 1) s.lm_rows = s.rows;
  COHORT_RETURN_IF_ERROR(Upload(PlanOffset(s.attention), used));
  return s;
}

absl::Status CudaEngine::Upload(int64_t first, int64_t used_table_entries) {
  COHORT_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(ws_.inputs + first, staging_.data() + first,
                                              (staging_header_ + used_table_entries - first) * sizeof(int32_t),
                                              cudaMemcpyHostToDevice, stream_));
  return absl::OkStatus();
}

absl::Status CudaEngine::Attention(const DeviceLayer& l, int64_t index, const StepLayout& s) {
  const ModelConfig& c = config_;
  const int64_t T = s.num_tokens, H = c.hidden_size, heads = c.num_heads, qk = c.qk_head_dim();
  const int64_t nope = c.qk_nope_head_dim, v = c.v_head_dim, rank = c.kv_lora_rank;
  // One fp32 product for the queries (or their LoRA down-projection) and the latent: [T, q | kv],
  // and with a folded router its part from the layer's input: [T, q | kv | experts].
  const bool fold = RouterFolded(l, T);
  const int64_t q_width = QueryProjectionWidth(c), ld = ProjectedStride(l, T);
  COHORT_RETURN_IF_ERROR(Product(T, ld, H, {ws_.x, H}, {l.input_proj.data, H}, {ws_.projected, ld, 0, CUDA_R_32F}));
  kernels::QueryRopeParams queries{ws_.q, static_cast<int>(heads), static_cast<int>(qk)};
  if (c.q_lora_rank > 0) {
    COHORT_CUDA_RETURN_IF_ERROR(kernels::LaunchRmsNorm(ws_.projected, ld, l.q_a_norm, T, c.q_lora_rank,
                                                       kLatentNormEps, ws_.q_a_normed, c.q_lora_rank, stream_));
    COHORT_RETURN_IF_ERROR(Linear(l.q_b_proj, ws_.q_a_normed, T, ws_.q));  // rotated in place below
  } else {
    queries.source = ws_.projected;  // rounded to bf16 (and rotated) into ws_.q below
    queries.source_row_stride = ld;
  }

  // The absorbed queries: q_latent[t, h] = q_nope[t, h] . W_uk[h], W_uk[h] = kv_b_proj rows
  // [h (nope + v), + nope) as [nope, rank], stored transposed ([rank, nope]) in absorbed_keys. Up to
  // kernels::kMaxAbsorbRows tokens the cache-write launch forms them too; else a product after it.
  const int64_t Q = s.absorbed_tokens;
  kernels::QueryAbsorbParams absorb{l.absorbed_keys, ws_.q_latent, static_cast<int>(Q), static_cast<int>(rank)};
  if (!kernels::CanAbsorbQueries(queries, static_cast<int>(c.qk_rope_head_dim), absorb)) absorb = {};

  // This step's latents go into the cache first, so tokens of one sequence in this step see each
  // other (causally) through the cache like any earlier token; the same launch rotates the queries.
  bf16* cache = LayerCache(index);
  const kernels::CacheWriteParams where{ws_.positions, ws_.token_sequence, ws_.block_tables, ws_.table_offsets,
                                        static_cast<int>(geometry_.block_size_tokens)};
  COHORT_CUDA_RETURN_IF_ERROR(kernels::LaunchWriteKvCache(ws_.projected + q_width, ld, T, rank, l.kv_a_norm,
                                                          kLatentNormEps, RopeArgs(), where, cache, stream_, queries,
                                                          absorb));

  if (Q > 0) {
    const int64_t kv_b_head = (nope + v) * rank;
    if (absorb.absorbed_keys == nullptr) {
      COHORT_RETURN_IF_ERROR(Product(Q, rank, nope, {ws_.q, heads * qk, qk}, {l.absorbed_keys, nope, rank * nope},
                                     {ws_.q_latent, heads * rank, rank}, static_cast<int>(heads)));
    }
    kernels::MlaDecodeParams p;
    p.q_latent = ws_.q_latent;
    p.q_rope = ws_.q + nope;
    p.q_rope_row_stride = heads * qk;
    p.q_rope_head_stride = static_cast<int>(qk);
    p.cache = cache;
    p.block_tables = ws_.block_tables;
    p.block_size = static_cast<int>(geometry_.block_size_tokens);
    p.heads = static_cast<int>(heads);
    p.kv_lora_rank = static_cast<int>(rank);
    p.rope_dim = static_cast<int>(c.qk_rope_head_dim);
    p.softmax_scale = rope_.softmax_scale();
    p.shape = s.attention;
    const int64_t plan = PlanOffset(s.attention);
    p.merges = reinterpret_cast<const kernels::MlaMergeRow*>(ws_.inputs + plan);
    p.work = reinterpret_cast<const kernels::MlaWorkItem*>(p.merges + s.attention.merge_rows);
    p.step_tokens_bound = s.absorbed_run;
    p.out = ws_.o_latent;
    p.partial_out = ws_.split_partials;
    p.partial_lse = ws_.split_partials + kSplitPairs * heads * rank;
    // attn[t, h] = o_latent[t, h] . W_uv[h]^T, W_uv[h] = kv_b_proj rows [h (nope + v) + nope, + v):
    // for up to two tokens in the launch's merge of the context splits, else a product after it.
    const bool merge_values = s.values_in_merge;
    if (merge_values) {
      p.value_weights = l.kv_b_proj.data + nope * rank;
      p.value_head_stride = kv_b_head;
      p.v_head_dim = static_cast<int>(v);
      p.attn = ws_.attn;
    }
    COHORT_CUDA_RETURN_IF_ERROR(kernels::LaunchMlaDecode(p, stream_));
    if (!merge_values) {
      COHORT_RETURN_IF_ERROR(Product(Q, v, rank, {ws_.o_latent, heads * rank, rank},
                                     {l.kv_b_proj.data + nope * rank, rank, kv_b_head}, {ws_.attn, heads * v, v},
                                     static_cast<int>(heads)));
    }
  }
  for (const ExpandedGroup& group : s.expanded) COHORT_RETURN_IF_ERROR(ExpandedAttention(group, l, cache));
  if (!fold) return Linear(l.o_proj, ws_.attn, T, ws_.delta);
  if (RouterPartBeside(l, T)) {
    // The router's part over the attention [T, experts] in fp32 on the side stream, beside o_proj and
    // the post-attention norm; FeedForward joins it before the route.
    const DeviceMatrix& part = l.router_from_attention;
    COHORT_RETURN_IF_ERROR(ForkSide());
    COHORT_RETURN_IF_ERROR(Gemm(*cublas_api_, side_cublas_, T, part.rows, part.cols, {ws_.attn, part.cols},
                                {part.data, part.cols}, true, {ws_.router_logits, part.rows, 0, CUDA_R_32F}));
    COHORT_CUDA_RETURN_IF_ERROR(cudaEventRecord(side_join_, side_stream_));
    return Linear(l.o_proj, ws_.attn, T, ws_.delta);
  }
  // o_proj and the folded router's part from the attention in one product: [T, H] in bf16 into delta,
  // [T, experts] in fp32 after it (the rows follow o_proj's in the weights).
  kernels::SkinnyGemmParams p;
  p.x = ws_.attn;
  p.x_row_stride = l.o_proj.cols;
  p.w = l.o_proj.data;
  p.w_row_stride = l.o_proj.cols;
  p.y = ws_.delta;
  p.y_row_stride = H;
  p.y_tail = ws_.router_logits;
  p.y_tail_row_stride = l.router_from_attention.rows;
  p.tail_from = static_cast<int>(H);
  p.rows = static_cast<int>(T);
  p.n_out = static_cast<int>(H + l.router_from_attention.rows);
  p.k = static_cast<int>(l.o_proj.cols);
  return CudaStatus(kernels::LaunchSkinnyGemm(p, stream_), "LaunchSkinnyGemm");
}

// A group of prefill chunks: the keys and values of their whole contexts expanded from the latent,
// one context after another, then one flash attention launch over them (scores never leave the chip). The values
// are expanded transposed ([head][value dim][key]), the layout the attention's P . V product reads.
absl::Status CudaEngine::ExpandedAttention(const ExpandedGroup& group, const DeviceLayer& l, bf16* cache) {
  const ModelConfig& c = config_;
  const int64_t heads = c.num_heads, qk = c.qk_head_dim(), nope = c.qk_nope_head_dim, v = c.v_head_dim;
  const int64_t rank = c.kv_lora_rank, width = c.kv_cache_width(), kv_b_head = (nope + v) * rank;
  const int64_t keys = group.keys(), values_ld = ExpandedValuesLd();
  for (size_t i = 0; i < group.chunks.size(); ++i) {
    const kernels::FlashChunk& chunk = group.chunks[i];
    COHORT_CUDA_RETURN_IF_ERROR(kernels::LaunchGatherCache(
        cache, ws_.block_tables + group.table_offsets[i], static_cast<int>(geometry_.block_size_tokens),
        static_cast<int>(width), chunk.keys, ws_.gathered + int64_t{chunk.first_key} * width, stream_));
  }
  // keys[j, h] = latent[j] . W_uk[h]^T and values_t[h] = W_uv[h] . latent^T, W_uk[h] and W_uv[h] the
  // key and value rows of head h in kv_b_proj: one strided-batched product a head each.
  COHORT_RETURN_IF_ERROR(Gemm(*cublas_api_, cublas_, keys, nope, rank, {ws_.gathered, width, 0},
                              {l.kv_b_proj.data, rank, kv_b_head}, true, {ws_.expanded_keys, heads * nope, nope},
                              static_cast<int>(heads)));
  COHORT_RETURN_IF_ERROR(Gemm(*cublas_api_, cublas_, v, keys, rank, {l.kv_b_proj.data + nope * rank, rank, kv_b_head},
                              {ws_.gathered, width, 0}, true, {ws_.expanded_values_t, values_ld, v * values_ld},
                              static_cast<int>(heads)));
  kernels::FlashPrefillParams p;
  p.q = ws_.q;
  p.q_row_stride = heads * qk;
  p.q_head_stride = qk;
  p.k = ws_.expanded_keys;
  p.k_row_stride = heads * nope;
  p.k_head_stride = nope;
  p.k_rope = ws_.gathered + rank;
  p.k_rope_row_stride = width;
  p.v_t = ws_.expanded_values_t;
  p.v_t_head_stride = v * values_ld;
  p.v_t_row_stride = values_ld;
  p.out = ws_.attn;
  p.out_row_stride = heads * v;
  p.out_head_stride = v;
  p.chunks = group.chunks.data();
  p.num_chunks = static_cast<int>(group.chunks.size());
  p.heads = static_cast<int>(heads);
  p.nope = static_cast<int>(nope);
  p.rope = static_cast<int>(c.qk_rope_head_dim);
  p.v_dim = static_cast<int>(v);
  p.softmax_scale = rope_.softmax_scale();
  return CudaStatus(kernels::LaunchFlashPrefill(p, stream_), "LaunchFlashPrefill");
}

absl::Status CudaEngine::FeedForward(const DeviceLayer& l, const StepLayout& s) {
  const ModelConfig& c = config_;
  const int64_t T = s.num_tokens, H = c.hidden_size;
  if (!l.moe) {
    // down(silu(gate(x)) * up(x)) through the stacked [2I, H] gate_up matrix.
    COHORT_RETURN_IF_ERROR(Linear(l.mlp_gate_up, ws_.x, T, ws_.mlp_gate_up));
    COHORT_CUDA_RETURN_IF_ERROR(LaunchMoeSiluMul(ws_.mlp_gate_up, T, l.mlp_down.cols, nullptr, ws_.mlp_act, stream_));
    return Linear(l.mlp_down, ws_.mlp_act, T, ws_.delta);
  }

  // With several GPUs the MoE runs on every GPU's rows (world_ groups of T, each GPU's tokens then
  // its padding), E and S count this GPU's experts (shard_), and the router scores all experts.
  const bf16* x = ws_.x;
  int64_t rows = T;
  if (world_ > 1) {
    COHORT_RETURN_IF_ERROR(GatherRows(ws_.x, ws_.x_all, T));
    x = ws_.x_all;
    rows = world_ * T;
  }
  // The shared experts are experts E..E+S-1 of the weight arrays. They need no routing: steps of up
  // to kSharedApartMaxTokens rows with a router product, and of kSharedApartFoldedMinTokens to
  // kSharedApartFoldedMaxTokens with the router folded, run them beside it on a second stream, so
  // that their weight reads fill the routing's latency-bound launches. Not at one token (router
  // folded: the routing is one launch, and beside it they measured 0.9% slower at batch 1 than in the
  // grouped products, losing the SMs to the routed products' blocks waiting for the route), nor
  // below 8 tokens or past 48 (4 and 64 measured slower). Otherwise up to
  // kFoldSharedMaxTokens rows they join the routed ones in the grouped products (one row per token,
  // weight 1 in the combine): no extra launches, and they stream like any expert. Prefill-sized steps
  // run them on cuBLAS.
  const int32_t E = shard_.num_routed, k = static_cast<int32_t>(c.num_experts_per_tok);
  const int32_t shared = shard_.num_shared();
  const bool router_folded = RouterFolded(l, T);
  const bool apart = shared > 0 && (router_folded ? rows >= kSharedApartFoldedMinTokens &&
                                                        rows <= kSharedApartFoldedMaxTokens
                                                  : rows <= kSharedApartMaxTokens);
  const int32_t folded = !apart && rows <= kFoldSharedMaxTokens ? shared : 0;
  const int64_t inter = c.moe_intermediate_size;
  const int64_t all_experts = c.n_routed_experts;
  MoeRouterFold fold;
  if (router_folded) {
    // The parts Attention left: past the input projection's own columns, and o_proj's tail (or the
    // side stream's product, joined here, before the shared experts take the side stream).
    fold = {ws_.projected + InputProjectionWidth(c), ProjectedStride(l, T), ws_.router_logits, ws_.inv_rms_in,
            ws_.inv_rms_post};
    if (RouterPartBeside(l, T)) COHORT_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(stream_, side_join_, 0));
  }
  MoeCombineAdd add;
  if (apart) {  // forked before the router product, where there is one: they stream beside it
    COHORT_RETURN_IF_ERROR(SharedExpertsApart(l, x, rows));
    add = {ws_.shared_rows, shared};
  }
  if (!router_folded) {
    COHORT_RETURN_IF_ERROR(Product(rows, all_experts, H, {x, H}, {l.router.data, H},
                                   {ws_.router_logits, all_experts, 0, CUDA_R_32F}));
  }
  MoeRouting routing;
  COHORT_CUDA_RETURN_IF_ERROR(CarveMoeRouting(ws_.moe_workspace, moe_workspace_bytes_, rows, k, E, folded,
                                              MoeDefaultTileRows(rows, k, E, folded), &routing));
  routing.first_expert = shard_.first_routed;
  // Padding rows (past a graph's batch, or past a GPU's tokens) choose no expert.
  const int32_t* num_valid = world_ > 1 || s.bucket > 0 ? ws_.num_valid : nullptr;
  // At one token the route does the post-attention norm (RecordForward leaves it to it).
  MoeRouteNorm norm;
  if (NormInRoute(l, T)) {
    norm = {ws_.residual, ws_.delta, l.post_attention_norm, static_cast<int>(H), static_cast<float>(c.rms_norm_eps),
            ws_.x};
  }
  COHORT_CUDA_RETURN_IF_ERROR(LaunchMoeRoute(ws_.router_logits, l.router_bias, gate_params_, num_valid, ws_.topk_ids,
                                             ws_.topk_weights, routing, ws_.experts_used, stream_,
                                             /*valid_group_rows=*/world_ > 1 ? T : 0, fold, norm));
  COHORT_CUDA_RETURN_IF_ERROR(LaunchMoeGroupedGemm({x, /*gather_a=*/true, l.experts_gate_up, inter, H,
                                                    ws_.routed_act, /*silu_mul=*/true}, routing, stream_));
  // The route (or the align) is two launches back: the down product may read the routing, and request
  // its first weights, before it waits for the gate_up product.
  COHORT_CUDA_RETURN_IF_ERROR(LaunchMoeGroupedGemm({ws_.routed_act, /*gather_a=*/false, l.experts_down, H, inter,
                                                    ws_.routed_out, /*silu_mul=*/false, /*routing_ready=*/true},
                                                   routing, stream_));
  if (apart) {
    COHORT_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(stream_, side_join_, 0));
  } else if (folded < shared) {
    // [S][rows, 2I] = x . gate_up[E + s]^T in one batched product; then the S down products summed.
    const bf16* gate_up = l.experts_gate_up + E * 2 * inter * H;
    const bf16* down = l.experts_down + E * H * inter;
    COHORT_RETURN_IF_ERROR(Gemm(*cublas_api_, cublas_, rows, 2 * inter, H, {x, H, 0}, {gate_up, H, 2 * inter * H},
                                true, {ws_.mlp_gate_up, 2 * inter, rows * 2 * inter}, shared));
    COHORT_CUDA_RETURN_IF_ERROR(LaunchMoeSiluMul(ws_.mlp_gate_up, shared * rows, inter, nullptr, ws_.mlp_act, stream_));
    for (int32_t e = 0; e < shared; ++e) {
      COHORT_RETURN_IF_ERROR(Gemm(*cublas_api_, cublas_, rows, H, inter, {ws_.mlp_act + e * rows * inter, inter},
                                  {down + e * H * inter, inter}, true, {ws_.shared_out, H}, 1, 1.0f,
                                  e == 0 ? 0.0f : 1.0f));
    }
    add = {ws_.shared_out, 1};
  }
  if (world_ > 1) return ReduceScatterMoe(routing, add, T);
  pending_combine_ = PendingCombine{routing, add};
  return absl::OkStatus();
}

absl::Status CudaEngine::GatherRows(const bf16* rows, bf16* all, int64_t T) {
  const int64_t H = config_.hidden_size;
  if (aborted_) return absl::UnavailableError("the GPUs' NCCL group was revoked");
  if (options_.skip_collectives) {
    // Benchmarks of compute alone: this GPU's rows stand in for every GPU's.
    for (int g = 0; g < world_; ++g) {
      COHORT_CUDA_RETURN_IF_ERROR(
          cudaMemcpyAsync(all + g * T * H, rows, T * H * sizeof(bf16), cudaMemcpyDeviceToDevice, stream_));
    }
    return absl::OkStatus();
  }
  return NcclStatus(*nccl_, nccl_->all_gather(rows, all, T * H, ncclBfloat16, comm_, stream_), "ncclAllGather");
}

absl::Status CudaEngine::ReduceScatterMoe(const MoeRouting& routing, const MoeCombineAdd& add, int64_t T) {
  // In fp32, so that the sum is rounded to bf16 once, as one GPU's combine is.
  const int64_t H = config_.hidden_size;
  if (aborted_) return absl::UnavailableError("the GPUs' NCCL group was revoked");
  COHORT_CUDA_RETURN_IF_ERROR(LaunchMoeCombine(ws_.routed_out, ws_.topk_weights, routing, add, H, ws_.moe_all, stream_));
  if (options_.skip_collectives) {
    COHORT_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(ws_.moe_sum, ws_.moe_all + rank_ * T * H, T * H * sizeof(float),
                                                cudaMemcpyDeviceToDevice, stream_));
  } else {
    COHORT_RETURN_IF_ERROR(NcclStatus(
        *nccl_, nccl_->reduce_scatter(ws_.moe_all, ws_.moe_sum, T * H, ncclFloat32, ncclSum, comm_, stream_),
        "ncclReduceScatter"));
  }
  pending_combine_ = PendingCombine{routing, add, /*summed=*/true};
  return absl::OkStatus();
}

absl::Status CudaEngine::SharedExpertsApart(const DeviceLayer& l, const bf16* x, int64_t T) {
  const ModelConfig& c = config_;
  const int64_t H = c.hidden_size, inter = c.moe_intermediate_size;
  const int32_t E = shard_.num_routed, k = kSharedApartTopK;
  const int32_t shared = shard_.num_shared();
  COHORT_RETURN_IF_ERROR(ForkSide());
  // With every routed id -1 the routing holds the shared experts' rows only: row s*T + t is shared
  // expert s for token t, so the down product leaves the S matrices [T, H] one after another.
  // The align runs every step although its result depends on T alone: routings made once at
  // start-up (no align on this stream) measured 3% slower steps at batch 1-2 (H200, alternating in
  // one device call, 2.18-2.21 -> 2.25-2.27 ms). Likely the products then start at the fork and take
  // the SMs that the router product and the route need; not confirmed.
  MoeRouting routing;
  COHORT_CUDA_RETURN_IF_ERROR(CarveMoeRouting(ws_.shared_routing, shared_routing_bytes_, T, k, E, shared,
                                              MoeDefaultTileRows(T, k, E, shared), &routing));
  COHORT_CUDA_RETURN_IF_ERROR(LaunchMoeAlign(ws_.no_routed_ids, routing, nullptr, side_stream_));
  COHORT_CUDA_RETURN_IF_ERROR(LaunchMoeGroupedGemm({x, /*gather_a=*/true, l.experts_gate_up, inter, H,
                                                    ws_.shared_act, /*silu_mul=*/true}, routing, side_stream_));
  COHORT_CUDA_RETURN_IF_ERROR(LaunchMoeGroupedGemm({ws_.shared_act, /*gather_a=*/false, l.experts_down, H, inter,
                                                    ws_.shared_rows, /*silu_mul=*/false, /*routing_ready=*/true},
                                                   routing, side_stream_));
  COHORT_CUDA_RETURN_IF_ERROR(cudaEventRecord(side_join_, side_stream_));
  return absl::OkStatus();
}

absl::Status CudaEngine::NormalizeResidual(const bf16* weight, int64_t rows, bool first, float* inv_rms) {
  const float eps = static_cast<float>(config_.rms_norm_eps);
  if (pending_combine_.has_value()) {
    const PendingCombine moe = *pending_combine_;
    pending_combine_.reset();
    if (moe.summed) {
      return CudaStatus(kernels::LaunchAddRmsNorm(ws_.residual, ws_.moe_sum, weight, static_cast<int>(rows),
                                                  static_cast<int>(config_.hidden_size), eps, ws_.x, stream_, inv_rms),
                        "LaunchAddRmsNorm");
    }
    return CudaStatus(LaunchMoeCombineAddRmsNorm(ws_.routed_out, ws_.topk_weights, moe.routing, moe.add,
                                                 config_.hidden_size, ws_.residual, weight, eps, ws_.x, stream_,
                                                 inv_rms),
                      "LaunchMoeCombineAddRmsNorm");
  }
  return CudaStatus(kernels::LaunchAddRmsNorm(ws_.residual, first ? nullptr : ws_.delta, weight, static_cast<int>(rows),
                                              static_cast<int>(config_.hidden_size), eps, ws_.x, stream_, inv_rms),
                    "LaunchAddRmsNorm");
}

absl::Status CudaEngine::Product(int64_t m, int64_t n, int64_t k, const GemmOperand& x, const GemmOperand& w,
                                 const GemmOutput& y, int batch) {
  kernels::SkinnyGemmParams p;
  SetOperands(m, n, k, x, w, y, batch, p);
  p.y_fp32 = y.type == CUDA_R_32F;
  const bool bf16_in = x.type == CUDA_R_16BF && w.type == CUDA_R_16BF;
  if (m <= kSkinnyRows && bf16_in && kernels::SkinnyGemmSupports(p)) {
    return CudaStatus(kernels::LaunchSkinnyGemm(p, stream_), "LaunchSkinnyGemm");
  }
  if (batch > 1 && m <= kHeadProductMaxRows && bf16_in && y.type == CUDA_R_16BF) {
    kernels::HeadGemmParams head;
    SetOperands(m, n, k, x, w, y, batch, head);
    if (kernels::HeadGemmSupports(head)) return CudaStatus(kernels::LaunchHeadGemm(head, stream_), "LaunchHeadGemm");
  }
  return Gemm(*cublas_api_, cublas_, m, n, k, x, w, true, y, batch);
}

absl::Status CudaEngine::Linear(const DeviceMatrix& w, const bf16* x, int64_t rows, bf16* y) {
  return Product(rows, w.rows, w.cols, {x, w.cols}, {w.data, w.cols}, {y, w.rows});
}

absl::Status CudaEngine::RecordForward(const StepLayout& s) {
  const ModelConfig& c = config_;
  const int64_t T = s.num_tokens, H = c.hidden_size;
  pending_combine_.reset();
  COHORT_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(ws_.experts_used, 0, sizeof(int32_t), stream_));
  COHORT_CUDA_RETURN_IF_ERROR(kernels::LaunchEmbedding(weights_.embed_tokens.data, ws_.tokens, static_cast<int>(T),
                                                       static_cast<int>(H), ws_.residual, stream_));
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const DeviceLayer& l = weights_.layers[i];
    // The previous layer's feed-forward output joins the residual here. A folded router takes both
    // norms' scales (kernels::MoeRouterFold).
    const bool fold = RouterFolded(l, T);
    COHORT_RETURN_IF_ERROR(NormalizeResidual(l.input_norm, T, /*first=*/i == 0, fold ? ws_.inv_rms_in : nullptr));
    COHORT_RETURN_IF_ERROR(Attention(l, i, s));
    if (!NormInRoute(l, T)) {  // else FeedForward's route does it
      COHORT_RETURN_IF_ERROR(
          NormalizeResidual(l.post_attention_norm, T, /*first=*/false, fold ? ws_.inv_rms_post : nullptr));
    }
    COHORT_RETURN_IF_ERROR(FeedForward(l, s));
  }
  COHORT_RETURN_IF_ERROR(NormalizeResidual(weights_.norm, T, /*first=*/false));
  COHORT_CUDA_RETURN_IF_ERROR(
      kernels::LaunchGatherRows(ws_.x, ws_.logits_rows, s.rows, static_cast<int>(H), ws_.final_rows, stream_));
  if (world_ > 1) {
    // GPU 0 computes and samples every GPU's logits, so that only it needs the samplers: the GPUs'
    // final rows (T each: as many as any of them wants) go to it.
    COHORT_RETURN_IF_ERROR(GatherRows(ws_.final_rows, ws_.final_all, T));
    if (rank_ != 0) return absl::OkStatus();
    COHORT_CUDA_RETURN_IF_ERROR(kernels::LaunchGatherRows(ws_.final_all, ws_.gathered_logits_rows, s.lm_rows,
                                                          static_cast<int>(H), ws_.final_rows, stream_));
  }
  if (s.lm_rows == 0) return absl::OkStatus();  // every sequence continues its prompt
  return Product(s.lm_rows, c.vocab_size, H, {ws_.final_rows, H}, {weights_.lm_head.data, H},
                 {ws_.logits, c.vocab_size, 0, CUDA_R_32F});
}

// Captures the decode graph of `key` over padding-only inputs (every row a padding row of the
// scratch block). With `warm_up`, one eager pass first loads the kernel modules this batch size
// uses (cuBLAS picks its kernels by shape) and sets kernel attributes outside the capture.
absl::Status CudaEngine::CaptureGraph(const GraphKey& key, bool warm_up) {
  COHORT_ASSIGN_OR_RETURN(const StepLayout layout, Plan({}, &key));
  // The forward pass and, on one GPU, the sampling kernel over every row of the bucket.
  auto record = [&]() -> absl::Status {
    COHORT_RETURN_IF_ERROR(RecordForward(layout));
    if (!SamplesInGraph()) return absl::OkStatus();
    return sampler_->Record(ws_.logits, config_.vocab_size, layout.lm_rows, key.greedy, stream_);
  };
  if (warm_up) {
    if (SamplesInGraph()) {  // greedy parameters for the warm-up's sampling (each step uploads its own)
      COHORT_RETURN_IF_ERROR(sampler_->Prepare({}));
      COHORT_RETURN_IF_ERROR(sampler_->Upload(layout.lm_rows, stream_));
    }
    COHORT_RETURN_IF_ERROR(record());
    COHORT_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  }
  cudaGraph_t graph = nullptr;
  COHORT_CUDA_RETURN_IF_ERROR(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
  const absl::Status recorded = record();
  const cudaError_t ended = cudaStreamEndCapture(stream_, &graph);
  COHORT_RETURN_IF_ERROR(recorded);
  COHORT_CUDA_RETURN_IF_ERROR(ended);
  cudaGraphExec_t exec = nullptr;
  const cudaError_t instantiated = cudaGraphInstantiate(&exec, graph, 0);
  cudaGraphDestroy(graph);
  COHORT_CUDA_RETURN_IF_ERROR(instantiated);
  graphs_[key] = exec;
  return absl::OkStatus();
}

absl::Status CudaEngine::CaptureGraphs() {
  buckets_ = GraphBuckets(max_sequences_);
  const auto started = std::chrono::steady_clock::now();
  for (int bucket : buckets_) {
    for (const bool greedy : {true, false}) {
      if (!greedy && !SamplesInGraph()) break;
      // The unbounded class first: its context splits are the most, so its warm-up pass launches
      // every kernel the other classes use (the split merge included), and the general sampling
      // kernel of this batch size.
      for (auto it = std::rbegin(kGraphContexts); it != std::rend(kGraphContexts); ++it) {
        COHORT_RETURN_IF_ERROR(
            CaptureGraph({bucket, *it, /*uneven=*/false, greedy}, /*warm_up=*/it == std::rbegin(kGraphContexts)));
        // And with room for uneven attention plans, warmed up too (once a batch size: the general
        // sampling's graphs replay the same forward pass): its merge may be the first of its width.
        COHORT_RETURN_IF_ERROR(CaptureGraph({bucket, *it, /*uneven=*/true, greedy}, /*warm_up=*/greedy));
      }
    }
  }
  COHORT_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  spdlog::info("cuda: captured {} decode graphs in {:.1f} s: {} batch sizes up to {}, {} context classes, with and "
               "without room for uneven attention plans{}", graphs_.size(), seconds, buckets_.size(), buckets_.back(),
               std::size(kGraphContexts), SamplesInGraph() ? ", ending with greedy or general sampling" : "");
  return absl::OkStatus();
}

absl::StatusOr<bool> CudaEngine::RunStep(std::span<const SequenceStep> batch, const ShardStep* shard) {
  // A decode-only step replays a graph; under several GPUs, all of them do or none does, for the
  // rows they agreed on.
  const bool decode_only =
      shard != nullptr ? shard->decode_graph : std::all_of(batch.begin(), batch.end(), [](const SequenceStep& s) {
        return s.tokens.size() == 1 && s.compute_logits;
      });
  const int sequences = shard != nullptr ? shard->rows : static_cast<int>(batch.size());
  std::optional<GraphKey> key;
  if (decode_only) {
    int64_t max_context = 0;
    for (const SequenceStep& s : batch) max_context = std::max(max_context, s.start_position + 1);
    auto bucket = std::lower_bound(buckets_.begin(), buckets_.end(), sequences);
    for (int64_t limit : kGraphContexts) {
      if (bucket == buckets_.end() || (limit != 0 && max_context > limit)) continue;
      key = GraphKey{*bucket, limit, /*uneven=*/false, !SamplesInGraph() || sampler_->greedy_only()};
      break;
    }
  }
  COHORT_ASSIGN_OR_RETURN(const StepLayout layout, Plan(batch, key ? &*key : nullptr, shard));
  if (key) {
    // The plan says whether the step needs the graph with room for uneven cuts.
    key->uneven = layout.attention.uneven;
    if (SamplesInGraph()) COHORT_RETURN_IF_ERROR(sampler_->Upload(layout.lm_rows, stream_));
    COHORT_CUDA_RETURN_IF_ERROR(cudaGraphLaunch(graphs_.at(*key), stream_));
    return SamplesInGraph();
  } else {
    // Padding rows attend over nothing: their attention rows stay zero through every layer.
    const int64_t real = layout.batch_tokens;
    if (layout.num_tokens > real) {
      const int64_t width = config_.num_heads * config_.v_head_dim;
      COHORT_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(ws_.attn + real * width, 0,
                                                  (layout.num_tokens - real) * width * sizeof(bf16), stream_));
    }
    COHORT_RETURN_IF_ERROR(RecordForward(layout));
  }
  return false;
}

absl::Status CudaEngine::FinishStep() {
  COHORT_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(experts_used_host_.data(), ws_.experts_used, sizeof(int32_t),
                                              cudaMemcpyDeviceToHost, stream_));
  COHORT_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  stats_.routed_expert_reads = experts_used_host_[0];
  return absl::OkStatus();
}

absl::Status CudaEngine::ForwardOn(std::span<const SequenceStep> batch, const ShardStep* shard,
                                   std::span<float> logits) {
  COHORT_RETURN_IF_ERROR(UseDevice());
  COHORT_RETURN_IF_ERROR(ValidateBatch(config_, geometry_, batch, shard != nullptr ? kLogitsChecked : logits.size()));
  // A decode graph also samples, greedily over padding parameters; its tokens are not read.
  COHORT_RETURN_IF_ERROR(sampler_->Prepare({}));
  COHORT_RETURN_IF_ERROR(RunStep(batch, shard).status());
  // Several GPUs: GPU 0 returns every GPU's logits rows, the others none.
  const int64_t rows = shard != nullptr ? (rank_ == 0 ? static_cast<int64_t>(shard->logits_rows.size()) : 0)
                                        : std::count_if(batch.begin(), batch.end(),
                                                        [](const SequenceStep& s) { return s.compute_logits; });
  if (rows > 0) {
    COHORT_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(logits.data(), ws_.logits, rows * config_.vocab_size * sizeof(float),
                                                cudaMemcpyDeviceToHost, stream_));
  }
  return FinishStep();
}

absl::Status CudaEngine::SampleOn(std::span<const SequenceStep> batch, const ShardStep* shard,
                                  std::span<Sampler* const> samplers, std::span<SampledToken> tokens) {
  COHORT_CHECK(samplers.size() == tokens.size(), samplers.size(), " samplers for ", tokens.size(), " tokens");
  COHORT_RETURN_IF_ERROR(UseDevice());
  COHORT_RETURN_IF_ERROR(ValidateBatch(config_, geometry_, batch,
                                       shard != nullptr ? kLogitsChecked : samplers.size() * config_.vocab_size));
  // GPU 0 of several samples every GPU's sequences; the others sample none.
  COHORT_RETURN_IF_ERROR(sampler_->Prepare(samplers));
  COHORT_ASSIGN_OR_RETURN(const bool sampled, RunStep(batch, shard));
  if (!samplers.empty()) {
    COHORT_RETURN_IF_ERROR(sampled ? sampler_->Download(stream_)
                                   : sampler_->Launch(ws_.logits, config_.vocab_size, stream_));
  }
  COHORT_RETURN_IF_ERROR(FinishStep());
  return samplers.empty() ? absl::OkStatus() : sampler_->Finish(samplers, tokens);
}

absl::Status CudaEngine::ForwardShard(std::span<const SequenceStep> batch, const ShardStep& step,
                                      std::span<float> logits) {
  return ForwardOn(batch, &step, logits);
}

absl::Status CudaEngine::ForwardAndSampleShard(std::span<const SequenceStep> batch, const ShardStep& step,
                                               std::span<Sampler* const> samplers, std::span<SampledToken> tokens) {
  return SampleOn(batch, &step, samplers, tokens);
}

}  // namespace

absl::StatusOr<std::unique_ptr<ShardEngine>> ShardEngine::Prepare(ModelConfig config, const EngineOptions& options,
                                                                  int rank, int world, int device) {
  auto engine = std::make_unique<CudaEngine>(std::move(config), options, rank, world, device);
  COHORT_RETURN_IF_ERROR(engine->Initialize());
  return engine;
}

absl::StatusOr<ModelConfig> CudaModelConfig(const EngineOptions& options) {
  if (IsSyntheticModel(options.model_dir)) return SyntheticModelConfig(options.model_dir, options.num_layers);
  return LoadModelConfig(options.model_dir);
}

absl::StatusOr<std::string> NewNcclId() {
  COHORT_ASSIGN_OR_RETURN(const NcclApi* nccl, NcclApi::Load());
  ncclUniqueId id;
  COHORT_RETURN_IF_ERROR(NcclStatus(*nccl, nccl->get_unique_id(&id), "ncclGetUniqueId"));
  return std::string(id.internal, sizeof(id.internal));
}

absl::StatusOr<std::unique_ptr<Engine>> CreateCudaEngine(const EngineOptions& options) {
  COHORT_ASSIGN_OR_RETURN(ModelConfig config, CudaModelConfig(options));
  if (options.num_gpus != 1 || options.remote_ranks != nullptr) {
    return CreateExpertParallelEngine(std::move(config), options);
  }
  COHORT_ASSIGN_OR_RETURN(std::unique_ptr<ShardEngine> engine, ShardEngine::Prepare(std::move(config), options, 0, 1));
  COHORT_RETURN_IF_ERROR(engine->Start(nullptr, nullptr));
  return engine;
}

}  // namespace cohort::cuda
