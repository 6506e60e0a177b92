// The expert (MoE) hot path of the CUDA backend: expert choice, rows grouped by expert, the grouped
// expert GEMMs, SiLU-and-mul and the weighted combine. bf16 activations and weights, fp32 math.
//
// One MoE layer of T tokens, k routed experts per token out of E, S shared experts, hidden H, expert
// intermediate I. The shared experts are experts E .. E+S-1 of the weight arrays (a shared MLP of
// intermediate S*I is the sum of S experts of intermediate I), and every token has one row for each:
//
//   MoeRouting r;   // once per batch shape; the buffers live in a workspace allocated at start-up
//   CarveMoeRouting(ws, ws_bytes, T, k, E, S, MoeDefaultTileRows(T, k, E, S), &r);  // R = T*(k+S) rows
//   LaunchMoeRoute(logits, bias, gate, num_valid, topk_ids, topk_weights, r, experts_used_counter, s);
//                  // = LaunchMoeGate (topk_ids, topk_weights [T, k]) + LaunchMoeAlign
//   LaunchMoeGroupedGemm({hidden, /*gather_a=*/true, w_gate_up, I, H, act, /*silu_mul=*/true}, r, s);
//                        // act [R, I] = silu(gate) * up
//   LaunchMoeGroupedGemm({act, /*gather_a=*/false, w_down, H, I, y2}, r, s);               // [R, H]
//   LaunchMoeCombine(y2, topk_weights, r, /*add=*/{}, H, out, s);                          // [T, H]
//                        // or LaunchMoeCombineAddRmsNorm: the combine inside the next RMSNorm
//
// Every launch can be captured in a CUDA graph: no allocation, no host synchronisation, and grid sizes
// that depend only on host shapes (T, k, E, S, N, K, tile rows). How many rows each expert received is
// read on the device; blocks past the real work return at once. Launchers return cudaErrorInvalidValue
// for shapes or pointers outside their contract, and the launch error otherwise. Pointers are device
// pointers; bf16 matrices are row-major and 16-byte aligned.
//
// Every kernel is launched with programmatic dependent launch (kernels/pdl.cuh): it may start while
// the previous kernel of the stream finishes, and waits for it before it reads or writes anything.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace cohort {

inline constexpr int32_t kMoeMaxExperts = 256;  // routed experts E
inline constexpr int32_t kMoeMaxTopK = 8;
inline constexpr int32_t kMoeMaxGroups = 8;
inline constexpr int32_t kMoeMaxShared = 8;  // shared experts S, on top of the E routed ones

// ---------------------------------------------------------------------------------------------------
// Gate: router logits -> top-k experts and combine weights, with exactly the semantics of the CPU
// reference TopkRouter (worker/model/routing.h):
//   kGreedy:             top-k of the scores.
//   kGroupLimitedGreedy: keep the topk_group groups (of E / n_group consecutive experts) with the
//                        highest max score, then top-k.
//   kNoAuxTc:            choice = score + correction_bias; keep the topk_group groups with the highest
//                        sum of their two best choices, then top-k by choice.
// Groups apply only when method != kGreedy and topk_group < n_group. Weights are the unbiased scores
// of the chosen experts, divided by (their sum + 1e-20) when norm_topk_prob, times
// routed_scaling_factor. Experts come out in descending order of the value they were chosen by; equal
// values go to the lower expert index, as on the CPU.
enum class MoeScoring : int32_t { kSoftmax = 0, kSigmoid = 1 };
enum class MoeTopkMethod : int32_t { kGreedy = 0, kGroupLimitedGreedy = 1, kNoAuxTc = 2 };

struct MoeGateParams {
  int32_t num_experts = 0;  // 1..kMoeMaxExperts, a multiple of n_group
  int32_t top_k = 0;        // 1..min(kMoeMaxTopK, num_experts)
  int32_t n_group = 1;      // 1..kMoeMaxGroups; with kNoAuxTc groups hold at least 2 experts
  int32_t topk_group = 1;   // 1..n_group
  MoeScoring scoring = MoeScoring::kSoftmax;
  MoeTopkMethod method = MoeTopkMethod::kGreedy;
  bool norm_topk_prob = false;
  float routed_scaling_factor = 1.0f;
};

// router_logits fp32 [T, E]; correction_bias fp32 [E] or nullptr (added to the choice only).
// Writes topk_ids int32 [T, k] and topk_weights fp32 [T, k]. One warp per token.
cudaError_t LaunchMoeGate(const float* router_logits, const float* correction_bias, int64_t num_tokens,
                          const MoeGateParams& params, int32_t* topk_ids, float* topk_weights,
                          cudaStream_t stream);

// ---------------------------------------------------------------------------------------------------
// Routing of one batch: the T*k (token, slot) pairs and the T*S (token, shared expert) pairs become
// rows of a permuted activation matrix, grouped by expert in ascending expert order (routed experts
// 0..E-1, then shared experts E..E+S-1) and, within an expert, in ascending (token, slot) order
// (deterministic: no result depends on the order of atomics). Shared expert s holds one row per token:
// token t at offsets[E] + s*T + t. The grouped GEMM walks the rows in tiles of `tile_rows` rows that
// never straddle two experts.
struct MoeRouting {
  // Host shape of the batch the buffers describe.
  int64_t num_tokens = 0;   // T
  int32_t top_k = 0;        // k
  int32_t num_experts = 0;  // E routed experts
  int32_t num_shared = 0;   // S shared experts, 0..kMoeMaxShared
  int32_t tile_rows = 0;    // 16, 64 or 128: the grouped GEMM's BM, fixed by the align that fills the tiles
  // Expert parallelism: the routed ids this routing takes are [first_expert, first_expert + E), the
  // experts this GPU holds, which become its experts 0..E-1; other ids get no row. 0 on one GPU.
  int32_t first_expert = 0;

  // Device buffers, caller-owned (CarveMoeRouting), written by LaunchMoeAlign.
  int32_t* expert_offsets = nullptr;  // [E + S + 1]: rows of expert e are [offsets[e], offsets[e + 1]);
                                      // offsets[E] = routed rows in use (T*k unless some ids were outside
                                      // [0, E)), offsets[E + s] = offsets[E] + s*T, offsets[E + S] = rows
                                      // in use
  int32_t* row_token = nullptr;       // [T*(k+S)]: the token each row comes from (rows < offsets[E + S])
  int32_t* slot_row = nullptr;        // [T*k]: the row of routed pair (token t, slot j) at t*k + j; -1
                                      // when its id was outside [0, E) (an expert another rank owns)
  int32_t* tile_expert = nullptr;     // [max_tiles]: expert of GEMM tile i (0..E+S-1); -1 for i >= num_tiles
  int32_t* tile_row = nullptr;        // [max_tiles]: first row of tile i (tile i covers
                                      // [tile_row[i], min(tile_row[i] + tile_rows, offsets[e + 1])))
  int32_t* num_tiles = nullptr;       // [1]: tiles in use
  int32_t* item_counters = nullptr;   // [2]: the grouped GEMM's work queue for tiles of 64 and 128 rows
                                      // (the next item, the blocks done). The align zeroes them and each
                                      // launch leaves them zero, so launches on one routing must not
                                      // overlap (a stream orders them; a programmatic dependent takes
                                      // items only after its wait)
  int32_t* chunk_counts = nullptr;    // the align's scratch where it takes several blocks (more than 2048
                                      // pairs): each block's rows per routed expert; null otherwise

  int64_t num_pairs() const { return num_tokens * top_k; }                 // routed (token, slot) pairs
  int64_t num_rows() const { return num_tokens * (top_k + num_shared); }  // rows of y1, act and y2
  int64_t max_tiles() const;
};

// Tiles the grouped GEMM may need for num_rows rows over num_experts experts (routed + shared): every
// expert can leave one partial tile.
int64_t MoeMaxTiles(int64_t num_rows, int32_t num_experts, int32_t tile_rows);

// The tile rows (BM) that serve a batch of T tokens best: 16 while experts get few rows each (decode:
// the GEMM streams weights, and each tile of an expert streams them again; with shared experts, which
// take every token, up to 96 tokens), then 64 and 128 as the rows per expert that gets any grow (T*k
// routed rows over min(T*k, E) experts, T rows for each of the S shared ones; prefill: tensor cores).
// The same value must reach the align and both GEMMs of a layer (it travels in MoeRouting).
int32_t MoeDefaultTileRows(int64_t num_tokens, int32_t top_k, int32_t num_experts, int32_t num_shared);

// Bytes of a routing workspace that serves up to max_tokens tokens at any tile rows.
int64_t MoeRoutingWorkspaceBytes(int64_t max_tokens, int32_t top_k, int32_t num_experts, int32_t num_shared);

// Lays the routing buffers of a T-token batch out in `workspace` (16-byte aligned, at least
// MoeRoutingWorkspaceBytes(T, k, E, S) bytes). Host only; launches nothing.
cudaError_t CarveMoeRouting(void* workspace, int64_t workspace_bytes, int64_t num_tokens, int32_t top_k,
                            int32_t num_experts, int32_t num_shared, int32_t tile_rows, MoeRouting* routing);

// topk_ids int32 [T, k] (from the gate, or any ids; ids outside [first_expert, first_expert + E) get no
// row, the others are taken as expert id - first_expert) -> every buffer of
// `routing`, the shared experts' rows included. Adds to *experts_used (nullable, int32) the number of
// routed experts that received at least one row: the routed weight reads of the step (shared experts
// are always read and not counted). One block of 1024 threads; more than 2048 pairs take two launches
// of a block per 2048 pairs (the rows are the same).
cudaError_t LaunchMoeAlign(const int32_t* topk_ids, const MoeRouting& routing, int32_t* experts_used,
                           cudaStream_t stream);

// Gate then align in one call: the same results as LaunchMoeGate followed by LaunchMoeAlign (whose
// contracts hold), in one launch of one block for batches of up to kMoeFusedRouteTokens tokens (the
// decode steps where each launch's latency shows), two launches above. Up to kMoeWarpRouteTokens
// tokens that block is a warp a token and one warp aligns, with no block barrier in the align (H200,
// cohort bench step against the 1024-thread align: batch 1-4 steps 1.0-1.5% faster). gate.top_k must equal
// routing's, and the routing's experts must lie within the gate's (first_expert + E <= gate.num_experts;
// equal on one GPU); the batch is routing.num_tokens tokens. num_valid (device int32,
// nullable): tokens at or past *num_valid are padding (a captured graph's rows beyond the batch) and
// get ids -1 and weights 0, so they receive no routed row and read no expert. With valid_group_rows
// > 0 the tokens come in groups of that many (the rows of several GPUs gathered one after another,
// each GPU's tokens then its padding) and num_valid holds one count per group.
//
// With a fold (MoeRouterFold::from_attention not null) the logits are not read from router_logits
// (which may be null) but formed from the parts of the router's product that the attention's two
// projections computed: for token t and expert e,
//   logit[t, e] = fma(from_input[t, e], 1 / inv_rms_in[t], from_attention[t, e]) * inv_rms_post[t]
// (each step rounded as written), where from_input = (W_router . diag(g_post / g_in)) . x_in (the input projection's extra rows, over
// the normalised layer input x_in = bf16(h * inv_rms_in * g_in)), from_attention = (W_router .
// diag(g_post) . W_o) . attn (o_proj's extra rows), and inv_rms_in, inv_rms_post the two norms'
// rsqrt(mean(residual^2) + eps). That is W_router . (g_post * (h + o_proj(attn)) * inv_rms_post), the
// router's product of the post-attention norm's output, up to bf16 rounding in other places
// (DeviceLayer::router_folded, worker/model/cuda/device_weights.h). from_input has row stride
// input_stride (>= E), the rest are dense.
struct MoeRouterFold {
  const float* from_input = nullptr;
  int64_t input_stride = 0;
  const float* from_attention = nullptr;
  const float* inv_rms_in = nullptr;
  const float* inv_rms_post = nullptr;
};
// With a norm (MoeRouteNorm::residual not null; a fold, one token, no valid_group_rows), the route
// first does the post-attention norm of the token, exactly as kernels::LaunchAddRmsNorm(residual,
// delta, weight, 1, dim, eps, out) would (the same values, bit for bit: kernels/rms_norm.cuh):
//   residual += delta;  out = bf16(residual * inv_rms * weight),  inv_rms = rsqrt(mean(residual^2) + eps)
// and routes with that inv_rms as the fold's inv_rms_post (not read then; it may be null): a launch
// fewer between o_proj and the expert products of a one-token step (H200, cohort bench step: batch 1
// 2.6-2.7% faster). The residual and the fold's from_input and inv_rms_in are read before the route waits
// for the kernel before it (kernels/pdl.cuh): they must have been written two or more launches back;
// delta and from_attention (o_proj's) may come from the kernel right before.
struct MoeRouteNorm {
  float* residual = nullptr;              // [dim] fp32, updated in place
  const __nv_bfloat16* delta = nullptr;   // [dim]
  const __nv_bfloat16* weight = nullptr;  // [dim]
  int dim = 0;                            // <= kMoeRouteNormMaxDim
  float eps = 0.0f;
  __nv_bfloat16* out = nullptr;           // [dim]
};
inline constexpr int kMoeRouteNormMaxDim = 8192;
inline constexpr int64_t kMoeFusedRouteTokens = 32;
inline constexpr int64_t kMoeWarpRouteTokens = 4;
cudaError_t LaunchMoeRoute(const float* router_logits, const float* correction_bias, const MoeGateParams& gate,
                           const int32_t* num_valid, int32_t* topk_ids, float* topk_weights, const MoeRouting& routing,
                           int32_t* experts_used, cudaStream_t stream, int64_t valid_group_rows = 0,
                           const MoeRouterFold& fold = {}, const MoeRouteNorm& norm = {});

// The two folded routers of a layer (start-up work, not a step's): the router [E, H], the input and
// post-attention norms' weights g_in, g_post [H] (g_in without a zero) and o_proj [H, A] give
//   from_input_weights[e, j] = bf16(router[e, j] * g_post[j] / g_in[j])                  [E, H]
//   from_attention_weights[e, a] = bf16(sum_j router[e, j] * g_post[j] * o_proj[j, a])   [E, A]
// each summed in fp32 and rounded once. H <= 8192.
cudaError_t LaunchFoldRouter(const __nv_bfloat16* router, const __nv_bfloat16* g_in, const __nv_bfloat16* g_post,
                             const __nv_bfloat16* o_proj, int64_t experts, int64_t hidden, int64_t width,
                             __nv_bfloat16* from_input_weights, __nv_bfloat16* from_attention_weights,
                             cudaStream_t stream);

// ---------------------------------------------------------------------------------------------------
// Grouped GEMM: for each expert e (routed and shared) and each of its rows r,
//   y[r, :] = a[gather_a ? row_token[r] : r, :] . weights[e]^T       (fp32 accumulate, bf16 out)
// weights [E + S, out_features, in_features] as PyTorch Linear stores [out, in] per expert (the gate
// and up projections of an expert stacked as rows [0, I) and [I, 2I) of one [2I, H] matrix).
// out_features and in_features are multiples of 8 (any such size; partial tiles are masked).
// y [T*(k+S), out_features]: rows >= offsets[E + S] are left untouched.
//
// Tensor cores and a persistent grid (SMs x resident blocks) that walks (tile, column block) items
// and keeps a multi-stage shared-memory pipeline full across item boundaries, so a decode step
// streams each used expert's weights from HBM once per M-tile at close to copy bandwidth. Tiles of
// 16 rows: mma.sync m16n8k16 fed by cp.async; of 64 and 128 rows: wgmma in two warpgroups fed by a
// third through TMA (the weights, and activations in row order) and cp.async (gathered rows).
//
// With silu_mul, each expert's weights are its gate and up projections stacked, [2 * out, in] (rows
// [0, out) gate, [out, 2 * out) up), and the product ends in SiLU-and-mul:
//   y[r, i] = silu(a_r . gate_i) * (a_r . up_i)        (fp32 from the accumulators, one bf16 rounding)
// so the gate_up product of an expert MLP writes its activation [rows, I] directly.
struct MoeGemmArgs {
  const __nv_bfloat16* a = nullptr;        // [T, in] when gather_a, else [T*(k+S), in] in row order
  bool gather_a = false;
  const __nv_bfloat16* weights = nullptr;  // [E + S, out, in]; [E + S, 2 * out, in] with silu_mul
  int64_t out_features = 0;                // N
  int64_t in_features = 0;                 // K
  __nv_bfloat16* y = nullptr;              // [T*(k+S), out]
  bool silu_mul = false;
  // For products without gather_a or silu_mul (the down products): the routing was written two or
  // more launches back on this stream, so it is complete when this product starts (kernels/pdl.cuh),
  // and the product looks up its first tile and requests its first weights before it waits for the
  // previous kernel (whose output, `a`, it reads after the wait). True for a down product launched
  // right after its gate_up product. Other products ignore it.
  bool routing_ready = false;
};
cudaError_t LaunchMoeGroupedGemm(const MoeGemmArgs& args, const MoeRouting& routing, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------------
// act[r, i] = silu(gate_up[r, i]) * gate_up[r, I + i] in fp32, stored bf16, for r < rows_in_use where
// rows_in_use = min(rows, *num_rows) when num_rows (device int32, e.g. routing.expert_offsets + E + S)
// is given, else rows. gate_up [rows, 2I], act [rows, I]; I a multiple of 8. Rows past the count are
// left untouched. The grid is fixed by `rows`.
cudaError_t LaunchMoeSiluMul(const __nv_bfloat16* gate_up, int64_t rows, int64_t intermediate,
                             const int32_t* num_rows, __nv_bfloat16* act, cudaStream_t stream);

// Matrices a combine adds with weight 1: `count` of them, [T, H] each, one after another from `rows`
// (the shared experts' outputs when they ran apart from the routed experts: one already summed, or
// one per shared expert). None when count is 0.
struct MoeCombineAdd {
  const __nv_bfloat16* rows = nullptr;
  int32_t count = 0;
};

// out[t, :] = sum_j topk_weights[t, j] * expert_out[slot_row[t*k + j], :]
//           + sum_s expert_out[offsets[E] + s*T + t, :] + sum_a add.rows[a*T + t, :]
// in fp32, in this order, stored bf16: the routed experts weighted, the shared ones with weight 1;
// slots whose row is -1 are skipped. expert_out [T*(k+S), H] (rows of `routing`), topk_weights fp32
// [T, k], out [T, H]; H a multiple of 8. `out` may alias add.rows.
cudaError_t LaunchMoeCombine(const __nv_bfloat16* expert_out, const float* topk_weights,
                             const MoeRouting& routing, const MoeCombineAdd& add, int64_t hidden,
                             __nv_bfloat16* out, cudaStream_t stream);
// The same sum left in fp32, unrounded (`out` must not alias add.rows): under expert parallelism
// each GPU's share of the combine, summed across GPUs before it is rounded to bf16 once
// (kernels::LaunchAddRmsNorm with an fp32 delta), as one GPU would round it.
cudaError_t LaunchMoeCombine(const __nv_bfloat16* expert_out, const float* topk_weights,
                             const MoeRouting& routing, const MoeCombineAdd& add, int64_t hidden, float* out,
                             cudaStream_t stream);

// The combine folded into the RMSNorm that follows the MoE block (the next layer's input norm, or the
// model's final norm), saving a launch and a round trip of the combined rows:
//   delta[t] = bf16(the combine above, without `out`);  residual[t] += delta[t];
//   out[t] = bf16(residual[t] * rsqrt(mean(residual[t]^2) + eps) * norm_weight)
// residual fp32 [T, H] (updated in place), norm_weight bf16 [H], out bf16 [T, H]; H a multiple of 8
// and at most 8192. One block per token. The routing, topk_weights and residual are read before the
// launch waits for the kernel before it (kernels/pdl.cuh): their writers must be at least two
// launches back on the stream, as in a MoE block (route, gate_up and down products, then this).
// When `inv_rms` is not null it receives each token's rsqrt(mean(residual^2) + eps), fp32 [T].
cudaError_t LaunchMoeCombineAddRmsNorm(const __nv_bfloat16* expert_out, const float* topk_weights,
                                       const MoeRouting& routing, const MoeCombineAdd& add, int64_t hidden,
                                       float* residual, const __nv_bfloat16* norm_weight, float eps,
                                       __nv_bfloat16* out, cudaStream_t stream, float* inv_rms = nullptr);

}  // namespace cohort
