// Samples a batch of requests' next tokens where the logits are, on the GPU, with the semantics of
// Sampler::Sample (kernels/sampling.h). Only token ids, their logprobs and the requested top
// logprobs come back to the host.
//
// Every buffer is allocated once by Create: device parameters and outputs, and pinned host
// staging, so a step allocates nothing and its kernel can be captured in a CUDA graph (its pointers
// never change). One step:
//
//   COHORT_ASSIGN_OR_RETURN(auto sampler, DeviceSampler::Create({.vocab = vocab, .max_rows = 256}));
//   COHORT_RETURN_IF_ERROR(sampler->Prepare(samplers));            // draws each row's uniform
//   COHORT_RETURN_IF_ERROR(sampler->Launch(logits, vocab, stream));  // async on `stream`
//   COHORT_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
//   COHORT_RETURN_IF_ERROR(sampler->Finish(samplers, tokens));      // records each token
//
// A step whose kernel a graph holds (Record, at capture) replaces Launch with Upload before the
// graph and Download after it.
//
// Not thread-safe; one step at a time (Prepare, Launch or Upload and Download, Finish, in that order).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/sampling.h"
#include "worker/model/cuda/device_memory.h"
#include "worker/sampling/sampler.h"

namespace cohort::cuda {

// One row's kernel parameters from a request's validated settings and the uniform number its
// Sampler drew; top_offset and the penalty range are the caller's to fill.
SamplingRowParams RowParams(const SamplingConfig& config, double uniform);

struct DeviceSamplerConfig {
  int32_t vocab = 0;     // 1..kSamplingMaxVocab
  int32_t max_rows = 0;  // 1..kSamplingMaxRows: the most sequences sampled in one step
  // The most distinct history tokens that the rows using penalties (repetition, presence or
  // frequency) bring to one step, summed over those rows; 12 bytes of device memory and 12 of
  // pinned host memory each.
  int64_t max_penalty_tokens = int64_t{1} << 20;
};

class DeviceSampler {
 public:
  // InvalidArgument for sizes outside the limits; ResourceExhausted with the numbers when an
  // allocation fails. Allocates on the current device.
  static absl::StatusOr<std::unique_ptr<DeviceSampler>> Create(const DeviceSamplerConfig& config);
  // The same with the default penalty capacity.
  static absl::StatusOr<std::unique_ptr<DeviceSampler>> Create(int64_t vocab, int64_t max_rows);

  ~DeviceSampler() = default;
  DeviceSampler(const DeviceSampler&) = delete;
  DeviceSampler& operator=(const DeviceSampler&) = delete;

  // Starts a step: fills the pinned parameters, one row per sampler in order, calling
  // BeginDeviceSample once per sampler. InvalidArgument for more than max_rows samplers;
  // ResourceExhausted when their penalty history exceeds max_penalty_tokens. On an error no
  // sampler was touched.
  absl::Status Prepare(std::span<Sampler* const> samplers);

  // Enqueues on `stream`: the parameter upload, the sampling kernel over `logits` (one row of
  // `vocab` floats per sampler, `row_stride` floats apart, on the device) and the download of the
  // results into pinned memory. Allocates nothing and never waits.
  absl::Status Launch(const float* logits, int64_t row_stride, cudaStream_t stream);

  // Launch in three parts, for a step whose sampling kernel a CUDA graph holds.
  // Upload enqueues the parameters of `rows` rows, at least the prepared ones: rows past them (a
  // graph's padding rows) are greedy, without penalties or top logprobs, and their results are never
  // read. Record enqueues the kernel alone over `rows` rows of `logits`, with Upload's parameters
  // of those rows: greedy_only as greedy_only() tells for a step, and for a graph fixed when it is
  // captured. It checks nothing of a step, so a capture may call it with or without a step
  // prepared. Download enqueues the results' copy to pinned memory; Finish follows as after Launch.
  absl::Status Upload(int32_t rows, cudaStream_t stream);
  absl::Status Record(const float* logits, int64_t row_stride, int32_t rows, bool greedy_only,
                      cudaStream_t stream) const;
  absl::Status Download(cudaStream_t stream);
  // Whether every prepared row is greedy (temperature 0) without top logprobs, penalties or not.
  bool greedy_only() const { return greedy_only_; }

  // After the caller synchronized the stream: fills `out` (one per sampler, the same samplers as
  // Prepare) and records each token with EndDeviceSample. Internal, with no sampler touched, when
  // the device returned a token outside the vocabulary.
  absl::Status Finish(std::span<Sampler* const> samplers, std::span<SampledToken> out);

  const DeviceSamplerConfig& config() const { return config_; }

 private:
  enum class Stage { kIdle, kPrepared, kUploaded, kLaunched };

  explicit DeviceSampler(const DeviceSamplerConfig& config) : config_(config) {}
  // InvalidArgument unless `rows` rows of logits can be read `row_stride` floats apart.
  absl::Status CheckLogits(const float* logits, int64_t row_stride, int32_t rows) const;
  // Takes every device buffer from `arena` (a dry run counts the bytes).
  void PlaceDeviceBuffers(DeviceArena& arena);

  DeviceSamplerConfig config_;
  DeviceArena arena_;
  SamplingRowParams* params_ = nullptr;  // device, max_rows
  SamplingPenaltyToken* penalty_tokens_ = nullptr;  // device, max_penalty_tokens
  SamplingRowResult* results_ = nullptr;  // device, max_rows
  SamplingTopLogprob* top_ = nullptr;     // device, max_rows * kSamplingMaxTopLogprobs
  PinnedBuffer<SamplingRowParams> host_params_;
  PinnedBuffer<SamplingPenaltyToken> host_penalty_tokens_;
  PinnedBuffer<SamplingRowResult> host_results_;
  PinnedBuffer<SamplingTopLogprob> host_top_;

  // This step.
  Stage stage_ = Stage::kIdle;
  std::vector<Sampler*> prepared_;  // for Finish to check it gets the same samplers
  int32_t rows_ = 0;
  int64_t penalty_count_ = 0;
  int32_t top_count_ = 0;
  bool greedy_only_ = false;
};

}  // namespace cohort::cuda
