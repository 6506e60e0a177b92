#include "worker/model/cuda/device_sampler.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "kernels/cuda_check.h"

namespace cohort::cuda {
namespace {

bool UsesPenalties(const SamplingConfig& c) {
  return c.repetition_penalty != 1.0f || c.presence_penalty != 0.0f || c.frequency_penalty != 0.0f;
}

template <typename T>
absl::Status AllocatePinned(PinnedBuffer<T>& buffer, int64_t count, const char* what) {
  if (cudaError_t e = buffer.Allocate(std::max<int64_t>(count, 1)); e != cudaSuccess) {
    (void)cudaGetLastError();
    return absl::ResourceExhaustedError(absl::StrCat("DeviceSampler: pinned host memory for ", what, " (",
                                                     count * static_cast<int64_t>(sizeof(T)) >> 10,
                                                     " KiB) could not be allocated: ", cudaGetErrorString(e)));
  }
  return absl::OkStatus();
}

}  // namespace

SamplingRowParams RowParams(const SamplingConfig& c, double uniform) {
  SamplingRowParams p;
  p.uniform = uniform;
  p.temperature = c.temperature;
  p.top_k = c.top_k;
  p.top_p = c.top_p;
  p.min_p = c.min_p;
  p.repetition_penalty = c.repetition_penalty;
  p.presence_penalty = c.presence_penalty;
  p.frequency_penalty = c.frequency_penalty;
  p.top_logprobs = c.top_logprobs;
  return p;
}

absl::StatusOr<std::unique_ptr<DeviceSampler>> DeviceSampler::Create(int64_t vocab, int64_t max_rows) {
  if (vocab < 1 || vocab > kSamplingMaxVocab || max_rows < 1 || max_rows > kSamplingMaxRows) {
    return absl::InvalidArgumentError(absl::StrCat("DeviceSampler: vocabulary of ", vocab, " and ", max_rows,
                                                   " rows per step; device sampling supports 1..", kSamplingMaxVocab,
                                                   " and 1..", kSamplingMaxRows));
  }
  return Create(DeviceSamplerConfig{.vocab = static_cast<int32_t>(vocab), .max_rows = static_cast<int32_t>(max_rows)});
}

absl::StatusOr<std::unique_ptr<DeviceSampler>> DeviceSampler::Create(const DeviceSamplerConfig& config) {
  if (config.vocab < 1 || config.vocab > kSamplingMaxVocab || config.max_rows < 1 ||
      config.max_rows > kSamplingMaxRows || config.max_penalty_tokens < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "DeviceSampler: vocabulary of ", config.vocab, ", ", config.max_rows, " rows per step and ",
        config.max_penalty_tokens, " penalty tokens; device sampling supports 1..", kSamplingMaxVocab, ", 1..",
        kSamplingMaxRows, " and >= 0"));
  }
  std::unique_ptr<DeviceSampler> sampler(new DeviceSampler(config));
  DeviceArena plan;
  sampler->PlaceDeviceBuffers(plan);
  COHORT_ASSIGN_OR_RETURN(sampler->arena_, DeviceArena::Allocate(plan.bytes(), "device sampling buffers"));
  sampler->PlaceDeviceBuffers(sampler->arena_);
  COHORT_RETURN_IF_ERROR(AllocatePinned(sampler->host_params_, config.max_rows, "sampling parameters"));
  COHORT_RETURN_IF_ERROR(AllocatePinned(sampler->host_penalty_tokens_, config.max_penalty_tokens, "penalty tokens"));
  COHORT_RETURN_IF_ERROR(AllocatePinned(sampler->host_results_, config.max_rows, "sampled tokens"));
  COHORT_RETURN_IF_ERROR(
      AllocatePinned(sampler->host_top_, int64_t{config.max_rows} * kSamplingMaxTopLogprobs, "top logprobs"));
  sampler->prepared_.reserve(config.max_rows);
  return sampler;
}

void DeviceSampler::PlaceDeviceBuffers(DeviceArena& arena) {
  params_ = arena.Take<SamplingRowParams>(config_.max_rows);
  penalty_tokens_ = arena.Take<SamplingPenaltyToken>(std::max<int64_t>(config_.max_penalty_tokens, 1));
  results_ = arena.Take<SamplingRowResult>(config_.max_rows);
  top_ = arena.Take<SamplingTopLogprob>(int64_t{config_.max_rows} * kSamplingMaxTopLogprobs);
}

absl::Status DeviceSampler::Prepare(std::span<Sampler* const> samplers) {
  stage_ = Stage::kIdle;
  if (samplers.size() > static_cast<size_t>(config_.max_rows)) {
    return absl::InvalidArgumentError(absl::StrCat("DeviceSampler: ", samplers.size(),
                                                   " sequences to sample in one step, made for at most ",
                                                   config_.max_rows));
  }
  int64_t history = 0;
  for (const Sampler* s : samplers) {
    const SamplingConfig& c = s->config();
    if (c.top_logprobs < 0 || c.top_logprobs > kSamplingMaxTopLogprobs) {
      return absl::InvalidArgumentError(absl::StrCat("DeviceSampler: top_logprobs ", c.top_logprobs, " outside 0..",
                                                     kSamplingMaxTopLogprobs));
    }
    if (UsesPenalties(c)) history += static_cast<int64_t>(s->history_tokens().size());
  }
  if (history > config_.max_penalty_tokens) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "DeviceSampler: this step's sequences with repetition, presence or frequency penalties bring ", history,
        " distinct history tokens, more than the ", config_.max_penalty_tokens,
        " it was made for: raise DeviceSamplerConfig::max_penalty_tokens or run fewer such sequences per step"));
  }

  const int32_t vocab = config_.vocab;
  rows_ = static_cast<int32_t>(samplers.size());
  penalty_count_ = 0;
  top_count_ = 0;
  greedy_only_ = true;
  for (int32_t i = 0; i < rows_; ++i) {
    Sampler& sampler = *samplers[i];
    const SamplingConfig& c = sampler.config();
    SamplingRowParams& p = host_params_[i];
    p = RowParams(c, sampler.BeginDeviceSample(vocab));
    p.top_offset = top_count_;
    top_count_ += std::min(c.top_logprobs, vocab);
    p.penalty_begin = static_cast<int32_t>(penalty_count_);
    if (UsesPenalties(c)) {
      // Without a repetition penalty only generated tokens change.
      const bool all = c.repetition_penalty != 1.0f;
      const std::span<const int32_t> tokens = sampler.history_tokens(), counts = sampler.history_counts();
      for (size_t j = 0; j < tokens.size(); ++j) {
        const int32_t t = tokens[j], count = counts[j];
        if (all || count > 0) host_penalty_tokens_[penalty_count_++] = SamplingPenaltyToken{t, count, 1};
      }
    }
    p.penalty_end = static_cast<int32_t>(penalty_count_);
    greedy_only_ = greedy_only_ && c.temperature == 0.0f && c.top_logprobs == 0;
  }
  prepared_.assign(samplers.begin(), samplers.end());
  stage_ = Stage::kPrepared;
  return absl::OkStatus();
}

absl::Status DeviceSampler::Launch(const float* logits, int64_t row_stride, cudaStream_t stream) {
  if (stage_ != Stage::kPrepared) {
    return absl::FailedPreconditionError("DeviceSampler::Launch without a Prepare for this step");
  }
  COHORT_RETURN_IF_ERROR(CheckLogits(logits, row_stride, rows_));
  COHORT_RETURN_IF_ERROR(Upload(rows_, stream));
  COHORT_RETURN_IF_ERROR(Record(logits, row_stride, rows_, greedy_only_, stream));
  return Download(stream);
}

absl::Status DeviceSampler::CheckLogits(const float* logits, int64_t row_stride, int32_t rows) const {
  if (rows > 0 && (logits == nullptr || row_stride < config_.vocab)) {
    return absl::InvalidArgumentError(absl::StrCat("DeviceSampler: logits rows ", row_stride,
                                                   " floats apart for a vocabulary of ", config_.vocab));
  }
  return absl::OkStatus();
}

absl::Status DeviceSampler::Upload(int32_t rows, cudaStream_t stream) {
  if (stage_ != Stage::kPrepared) {
    return absl::FailedPreconditionError("DeviceSampler: parameters uploaded without a Prepare for this step");
  }
  if (rows < rows_ || rows > config_.max_rows) {
    return absl::InvalidArgumentError(absl::StrCat("DeviceSampler: parameters of ", rows, " rows for ", rows_,
                                                   " prepared ones, made for at most ", config_.max_rows));
  }
  SamplingRowParams padding;
  padding.temperature = 0.0f;
  std::fill(host_params_.data() + rows_, host_params_.data() + rows, padding);
  if (rows > 0) {
    COHORT_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(params_, host_params_.data(), sizeof(SamplingRowParams) * rows,
                                                cudaMemcpyHostToDevice, stream));
  }
  if (penalty_count_ > 0) {
    COHORT_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(penalty_tokens_, host_penalty_tokens_.data(),
                                                sizeof(SamplingPenaltyToken) * penalty_count_,
                                                cudaMemcpyHostToDevice, stream));
  }
  stage_ = Stage::kUploaded;
  return absl::OkStatus();
}

absl::Status DeviceSampler::Record(const float* logits, int64_t row_stride, int32_t rows, bool greedy_only,
                                   cudaStream_t stream) const {
  if (rows < 0 || rows > config_.max_rows) {
    return absl::InvalidArgumentError(
        absl::StrCat("DeviceSampler: a launch of ", rows, " rows, made for at most ", config_.max_rows));
  }
  COHORT_RETURN_IF_ERROR(CheckLogits(logits, row_stride, rows));
  if (rows == 0) return absl::OkStatus();
  SamplingArgs args;
  args.logits = logits;
  args.row_stride = row_stride;
  args.rows = rows;
  args.vocab = config_.vocab;
  args.greedy_only = greedy_only;
  args.params = params_;
  args.penalty_tokens = penalty_tokens_;
  args.results = results_;
  args.top = top_;
  COHORT_CUDA_RETURN_IF_ERROR(LaunchSampling(args, stream));
  return absl::OkStatus();
}

absl::Status DeviceSampler::Download(cudaStream_t stream) {
  if (stage_ != Stage::kUploaded) {
    return absl::FailedPreconditionError("DeviceSampler: results downloaded without an Upload for this step");
  }
  if (rows_ > 0) {
    COHORT_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(host_results_.data(), results_, sizeof(SamplingRowResult) * rows_,
                                                cudaMemcpyDeviceToHost, stream));
  }
  if (top_count_ > 0) {
    COHORT_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(host_top_.data(), top_, sizeof(SamplingTopLogprob) * top_count_,
                                                cudaMemcpyDeviceToHost, stream));
  }
  stage_ = Stage::kLaunched;
  return absl::OkStatus();
}

absl::Status DeviceSampler::Finish(std::span<Sampler* const> samplers, std::span<SampledToken> out) {
  if (stage_ != Stage::kLaunched) {
    return absl::FailedPreconditionError("DeviceSampler::Finish without a Launch or Download for this step");
  }
  if (samplers.size() != prepared_.size() || out.size() != prepared_.size() ||
      !std::equal(samplers.begin(), samplers.end(), prepared_.begin())) {
    return absl::InvalidArgumentError(absl::StrCat("DeviceSampler::Finish with ", samplers.size(), " samplers and ",
                                                   out.size(), " outputs, not the ", prepared_.size(),
                                                   " samplers of Prepare"));
  }
  for (int32_t i = 0; i < rows_; ++i) {
    const int32_t token = host_results_[i].token;
    if (token < 0 || token >= config_.vocab) {
      return absl::InternalError(absl::StrCat("DeviceSampler: the device chose token ", token, " for row ", i,
                                              " of a vocabulary of ", config_.vocab));
    }
  }
  stage_ = Stage::kIdle;
  for (int32_t i = 0; i < rows_; ++i) {
    const SamplingRowParams& p = host_params_[i];
    SampledToken& t = out[i];
    t.token = host_results_[i].token;
    t.logprob = host_results_[i].logprob;
    t.top.clear();
    const int32_t n = std::min(p.top_logprobs, config_.vocab);
    for (int32_t j = 0; j < n; ++j) t.top.emplace_back(host_top_[p.top_offset + j].token, host_top_[p.top_offset + j].logprob);
    samplers[i]->EndDeviceSample(t.token);
  }
  return absl::OkStatus();
}

}  // namespace cohort::cuda
