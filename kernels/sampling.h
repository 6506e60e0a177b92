// Token sampling on the device: one launch picks the next token of every row of a logits matrix
// with exactly the semantics of the CPU Sampler (worker/sampling/sampler.h): penalties over the
// row's history, greedy argmax (ties to the lowest id), or top-k, softmax weights relative to the
// best candidate at the temperature, min-p, top-p and one inverse-CDF draw in token-id order with
// the uniform number the host drew; plus the log-softmax of the raw logits at the chosen token and
// the requested top logprobs. The logits are never modified.
//
// A batch of few rows works row by row in clusters of up to 8 blocks (sm_90 thread block clusters),
// each holding a slice of the row in shared memory, so a batch of one row still spreads over
// several SMs. A batch whose clusters would take more than two waves of the device (rows times
// ceil(vocab / 40960) above twice its SM count) gets one block per row instead, which streams its
// row from global memory. The two give the same results, up to the order of double sums (near-ties only).
// The launch needs no workspace and allocates nothing; parameters, penalty tokens and outputs live
// in caller-owned device memory, so a launch can be captured in a CUDA graph. It is launched with
// programmatic dependent launch (kernels/pdl.cuh): its blocks may start while the kernel before it
// (the LM head) still runs, and read the logits only after it has ended.
//
//   std::vector<SamplingRowParams> params = ...;          // uniform from Sampler::BeginDeviceSample
//   copy params (and penalty tokens) to the device, then
//   SamplingArgs args{.logits = logits, .row_stride = vocab, .rows = rows, .vocab = vocab, ...};
//   COHORT_CUDA_RETURN_IF_ERROR(LaunchSampling(args, stream));
//   copy args.results (rows) and args.top (the sum of the rows' top counts) back.
//
// worker/model/cuda/device_sampler.h does all of this for a batch of Samplers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace cohort {

inline constexpr int32_t kSamplingMaxRows = 1024;
inline constexpr int32_t kSamplingMaxVocab = 262144;
inline constexpr int32_t kSamplingMaxTopLogprobs = 20;

// One row's settings (a validated SamplingConfig) and what the host drew for it.
struct SamplingRowParams {
  double uniform = 0.0;  // in [0, 1): Sampler::BeginDeviceSample's number; unused when temperature is 0
  float temperature = 1.0f;  // 0: greedy
  int32_t top_k = 0;         // 0: off
  float top_p = 1.0f;
  float min_p = 0.0f;
  float repetition_penalty = 1.0f;
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  int32_t top_logprobs = 0;  // 0..kSamplingMaxTopLogprobs; min(top_logprobs, vocab) entries are written
  int32_t top_offset = 0;    // where this row's top entries start in SamplingArgs::top
  // This row's tokens in SamplingArgs::penalty_tokens; an empty range means no penalties.
  int32_t penalty_begin = 0;
  int32_t penalty_end = 0;
};

// One distinct token of a row's history (Sampler::history_tokens, generated_count). Within a row
// the tokens are distinct and inside the vocabulary, in any order.
struct SamplingPenaltyToken {
  int32_t token = 0;
  int32_t generated_count = 0;  // presence and frequency penalties apply when > 0
  int32_t in_history = 1;       // the repetition penalty applies when nonzero (prompt or generated)
};

struct SamplingRowResult {
  int32_t token = 0;
  float logprob = 0.0f;  // log-softmax of the raw logits at `token`
};

struct SamplingTopLogprob {
  int32_t token = 0;
  float logprob = 0.0f;
};

struct SamplingArgs {
  const float* logits = nullptr;  // [rows, row_stride], the first `vocab` values of each row used
  int64_t row_stride = 0;         // >= vocab, in floats
  int32_t rows = 0;               // 0..kSamplingMaxRows
  int32_t vocab = 0;              // 1..kSamplingMaxVocab
  // Every row has temperature 0 and no top logprobs: a streaming kernel that keeps nothing in
  // shared memory does the whole batch. Only an optimisation; false is always correct.
  bool greedy_only = false;
  const SamplingRowParams* params = nullptr;  // [rows]
  // What the rows' penalty ranges index; may be null when no row has penalties.
  const SamplingPenaltyToken* penalty_tokens = nullptr;
  SamplingRowResult* results = nullptr;  // [rows]
  SamplingTopLogprob* top = nullptr;     // per row, min(top_logprobs, vocab) entries from top_offset, best first
};

// cudaErrorInvalidValue for sizes outside the limits above or missing pointers; otherwise the
// launch's status. Nothing is allocated and nothing waits. Call it with the device that holds the
// buffers current (it reads the device's SM count to choose between the two and size the clusters).
cudaError_t LaunchSampling(const SamplingArgs& args, cudaStream_t stream);

}  // namespace cohort
