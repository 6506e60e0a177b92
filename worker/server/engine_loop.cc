#include "worker/server/engine_loop.h"

#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "spdlog/spdlog.h"
#include "worker/sampling/sampler.h"
#include "worker/sampling/stop_strings.h"

namespace cohort {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// Reports at most this often while the state keeps changing (every step changes it).
constexpr auto kMinReportGap = std::chrono::milliseconds(10);

}  // namespace

struct EngineLoop::Live {
  std::shared_ptr<GenerationSink> sink;
  std::unique_ptr<Sampler> sampler;
  std::unique_ptr<IncrementalDecoder> decoder;  // when the model has a tokenizer
  std::unique_ptr<StopStringMatcher> stops;
  std::vector<int32_t> stop_token_ids;
  bool ignore_eos = false;
  int32_t top_logprobs = 0;
  Clock::time_point arrival = Clock::now();
  Clock::time_point first_token{};
  bool admitted = false;
};

EngineLoop::EngineLoop(std::unique_ptr<Engine> engine, const EngineLoopOptions& options, LoadPublisher& publisher,
                       WorkerMetrics* metrics)
    : engine_(std::move(engine)),
      options_(options),
      publisher_(publisher),
      metrics_(metrics),
      limits_{options.model_name, engine_->config().vocab_size, engine_->config().max_position_embeddings,
              options.tokenizer, std::nullopt},
      blocks_({.num_blocks = engine_->kv_geometry().num_blocks,
               .block_size = engine_->kv_geometry().block_size_tokens,
               .prefix_caching = options.prefix_caching,
               .num_pools = engine_->kv_geometry().num_pools}),
      scheduler_(options.scheduler, blocks_) {
  const ModelConfig& config = engine_->config();
  kv_value_bytes_ = engine_->kv_geometry().bytes_per_token / (config.num_layers * config.kv_cache_width());
  if (metrics_ != nullptr) {
    metrics_->kv_blocks_total.Set(static_cast<double>(blocks_.num_blocks()));
    metrics_->peak_memory_bandwidth.Set(options.peaks.memory_bandwidth_bytes_per_s);
    metrics_->peak_flops.Set(options.peaks.flops_per_s);
    metrics_->device_cost_per_hour.Set(options.device_cost_dollars_per_hour);
  }
  if (options.tokenizer != nullptr) {
    if (auto format = DetectChatFormat(options.tokenizer->chat_template()); format.ok()) limits_.chat_format = *format;
  }
}

EngineLoop::~EngineLoop() { Stop(); }

absl::Status EngineLoop::WarmUp() {
  std::vector<int32_t> table;
  if (!blocks_.Grow(table, 1)) return absl::ResourceExhaustedError("the KV cache has no block for the warm-up step");
  const int32_t token = static_cast<int32_t>(engine_->config().bos_token_id.value_or(0));
  SequenceStep step{{&token, 1}, 0, table, true};
  logits_.resize(engine_->config().vocab_size);
  absl::Status status = engine_->Forward({&step, 1}, logits_);
  blocks_.Release(table);
  if (!status.ok()) return absl::InternalError(absl::StrCat("warm-up forward pass failed: ", status.message()));
  for (float v : logits_) {
    if (!std::isfinite(v)) return absl::InternalError("warm-up forward pass produced non-finite logits");
  }
  return absl::OkStatus();
}

void EngineLoop::Start() {
  thread_ = std::thread([this] { Run(); });
}

absl::StatusOr<uint64_t> EngineLoop::Submit(GenerateSpec spec, std::shared_ptr<GenerationSink> sink) {
  auto reject = [&](absl::Status status) {
    if (metrics_ != nullptr) metrics_->requests_rejected.Increment();
    return status;
  };
  if (draining_.load()) return reject(absl::UnavailableError("this worker is draining and takes no new requests"));
  if (unhealthy_.load()) {
    return reject(absl::UnavailableError("this worker's engine failed and takes no new requests: retry elsewhere"));
  }
  const int64_t total = static_cast<int64_t>(spec.prompt.size()) + spec.max_tokens;
  // A request's blocks all come from one pool (one per GPU).
  if (BlocksForTokens(total, blocks_.block_size()) > blocks_.pool_size()) {
    return reject(absl::InvalidArgumentError(
        absl::StrCat("the prompt (", spec.prompt.size(), " tokens) plus max_tokens (", spec.max_tokens, ") needs ",
                     total, " tokens of KV cache; this worker holds ", blocks_.DescribeRequestCapacity(),
                     ": lower stopping.max_tokens")));
  }
  std::lock_guard<std::mutex> lock(mu_);
  const int64_t queued = waiting_requests_.load() + static_cast<int64_t>(inbox_.size());
  if (queued >= options_.max_queue) {
    return reject(absl::ResourceExhaustedError(
        absl::StrCat("the worker's queue is full (", queued, " requests waiting, --max-queue ", options_.max_queue, ")")));
  }
  const uint64_t id = next_id_++;
  inbox_.push_back({id, std::move(spec), std::move(sink)});
  ++live_requests_;
  wake_.notify_one();
  return id;
}

void EngineLoop::Cancel(uint64_t id) {
  std::lock_guard<std::mutex> lock(mu_);
  cancels_.push_back(id);
  wake_.notify_one();
}

void EngineLoop::Drain() { draining_.store(true); }

void EngineLoop::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
    wake_.notify_one();
  }
  if (thread_.joinable()) thread_.join();
  sender_.Stop();  // every request's end is written before Stop returns
}

void EngineLoop::TakeInbox() {
  std::vector<Pending> pending;
  std::vector<uint64_t> cancels;
  {
    std::lock_guard<std::mutex> lock(mu_);
    pending.swap(inbox_);
    cancels.swap(cancels_);
  }
  for (Pending& p : pending) {
    auto request = std::make_unique<Request>();
    request->id = p.id;
    request->tokens = p.spec.prompt;
    request->prompt_len = static_cast<int64_t>(p.spec.prompt.size());
    request->max_tokens = p.spec.max_tokens;
    request->priority = p.spec.priority;
    auto live = std::make_unique<Live>();
    live->sink = std::move(p.sink);
    live->sampler = std::make_unique<Sampler>(p.spec.sampling, /*fallback_seed=*/p.id * 0x9e3779b97f4a7c15ull,
                                              p.spec.prompt);
    live->stop_token_ids = std::move(p.spec.stop_token_ids);
    if (options_.tokenizer != nullptr) {
      live->decoder = std::make_unique<IncrementalDecoder>(*options_.tokenizer, /*skip_special_tokens=*/true);
      live->stops = std::make_unique<StopStringMatcher>(std::move(p.spec.stop_strings));
    }
    live->ignore_eos = p.spec.ignore_eos;
    live->top_logprobs = p.spec.sampling.top_logprobs;
    if (absl::Status st = scheduler_.Add(std::move(request)); !st.ok()) {
      Send([sink = std::move(live->sink), st] { sink->OnFinish(st, {}); });
      --live_requests_;
      continue;
    }
    if (metrics_ != nullptr) metrics_->prompt_tokens.Increment(static_cast<double>(p.spec.prompt.size()));
    live_.emplace(p.id, std::move(live));
    load_changed_ = true;
  }
  for (uint64_t id : cancels) {
    if (live_.count(id) != 0) Finish(id, absl::CancelledError("the client cancelled the request"), {});
  }
}

void EngineLoop::Finish(uint64_t id, const absl::Status& status, cohort::v1::FinishReason reason) {
  std::unique_ptr<Request> request = scheduler_.Remove(id);
  auto it = live_.find(id);
  if (request == nullptr || it == live_.end()) return;
  std::unique_ptr<Live> live = std::move(it->second);
  live_.erase(it);
  --live_requests_;
  load_changed_ = true;

  const auto now = Clock::now();
  const int64_t generated = request->num_generated();
  if (metrics_ != nullptr) {
    metrics_->requests_finished.Increment();
    metrics_->e2e_latency.Observe(Seconds(now - live->arrival));
    if (generated > 1) metrics_->time_per_output_token.Observe(Seconds(now - live->first_token) / (generated - 1));
  }
  cohort::v1::GenerateResponse final;
  if (status.ok()) {
    auto* f = final.mutable_final();
    if (live->decoder != nullptr) {
      // Text still held back: an unfinished character at the end, or a tail that could have begun
      // a stop string but did not (nothing, when a stop string ended the request).
      StopStringMatcher::Result rest = live->stops->Push(live->decoder->Flush());
      f->set_text(rest.text + (rest.stopped ? std::string() : live->stops->Flush()));
    }
    f->set_finish_reason(reason);
    f->mutable_usage()->set_prompt_tokens(static_cast<uint32_t>(request->prompt_len));
    f->mutable_usage()->set_completion_tokens(static_cast<uint32_t>(generated));
    f->mutable_usage()->set_cached_prompt_tokens(static_cast<uint32_t>(request->cached_prompt_tokens));
  }
  Send([sink = std::move(live->sink), status, final = std::move(final)]() mutable {
    sink->OnFinish(status, std::move(final));
  });
}

void EngineLoop::Step() {
  StepPlan plan = scheduler_.Schedule();
  if (plan.empty()) return;
  std::vector<SequenceStep> batch;
  batch.reserve(plan.chunks.size());
  std::vector<Sampler*> samplers;
  for (const ScheduledChunk& c : plan.chunks) {
    Request* r = c.request;
    batch.push_back({{r->tokens.data() + r->computed, static_cast<size_t>(c.num_tokens)}, r->computed, r->block_table,
                     c.compute_logits});
    if (c.compute_logits) samplers.push_back(live_.at(r->id)->sampler.get());
  }
  const int64_t rows = static_cast<int64_t>(samplers.size());
  std::vector<SampledToken> sampled_tokens(rows);
  const auto start = Clock::now();
  absl::Status status = engine_->ForwardAndSample(batch, samplers, sampled_tokens);
  const auto end = Clock::now();
  if (absl::IsUnavailable(status)) {
    // The engine can take no more steps: nothing here can finish, so every request ends now.
    spdlog::critical("engine failed, the worker is unhealthy: {}", std::string(status.message()));
    unhealthy_ = true;
    load_changed_ = true;
    std::vector<uint64_t> ids;
    for (const auto& [id, live] : live_) ids.push_back(id);
    for (uint64_t id : ids) {
      Finish(id, absl::UnavailableError(absl::StrCat("the worker's engine failed (", status.message(),
                                                     "): retry elsewhere")),
             {});
    }
    return;
  }
  if (!status.ok()) {
    spdlog::error("engine step failed: {}", std::string(status.message()));
    for (const ScheduledChunk& c : plan.chunks) {
      Finish(c.request->id, absl::InternalError(absl::StrCat("engine step failed: ", status.message())), {});
    }
    return;
  }
  // Before any request grows or finishes: `batch` points into their tokens.
  if (metrics_ != nullptr) ObserveStepCost(batch, Seconds(end - start));
  scheduler_.OnStepDone(plan);

  const int64_t max_context = engine_->config().max_position_embeddings;
  const auto eos = engine_->config().eos_token_id;
  std::vector<std::pair<uint64_t, cohort::v1::FinishReason>> finished;
  int64_t row = 0;
  for (const ScheduledChunk& c : plan.chunks) {
    Request* r = c.request;
    Live& live = *live_.at(r->id);
    if (!live.admitted) {
      live.admitted = true;
      if (metrics_ != nullptr) metrics_->queue_time.Observe(Seconds(start - live.arrival));
    }
    if (!c.compute_logits) continue;
    const SampledToken& sampled = sampled_tokens[row++];
    r->tokens.push_back(sampled.token);
    if (r->num_generated() == 1) {
      live.first_token = end;
      if (metrics_ != nullptr) metrics_->time_to_first_token.Observe(Seconds(end - live.arrival));
    }

    cohort::v1::GenerateResponse response;
    auto* chunk = response.mutable_chunk();
    chunk->add_token_ids(static_cast<uint32_t>(sampled.token));
    bool stop_string = false;
    if (live.decoder != nullptr) {
      StopStringMatcher::Result text = live.stops->Push(live.decoder->Push(sampled.token));
      chunk->set_text(std::move(text.text));
      stop_string = text.stopped;
    }
    if (live.top_logprobs > 0) {
      auto* lp = chunk->add_logprobs();
      lp->set_token_id(static_cast<uint32_t>(sampled.token));
      lp->set_logprob(sampled.logprob);
      for (const auto& [token, logprob] : sampled.top) {
        auto* top = lp->add_top();
        top->set_token_id(static_cast<uint32_t>(token));
        top->set_logprob(logprob);
      }
    }
    Send([sink = live.sink, response = std::move(response)]() mutable { sink->OnChunk(std::move(response)); });

    const bool stop_token = stop_string || (!live.ignore_eos && eos && sampled.token == *eos) ||
                            std::find(live.stop_token_ids.begin(), live.stop_token_ids.end(), sampled.token) !=
                                live.stop_token_ids.end();
    if (stop_token) {
      finished.emplace_back(r->id, cohort::v1::FINISH_REASON_STOP);
    } else if (r->num_generated() >= r->max_tokens || static_cast<int64_t>(r->tokens.size()) >= max_context) {
      finished.emplace_back(r->id, cohort::v1::FINISH_REASON_LENGTH);
    }
  }
  for (const auto& [id, reason] : finished) Finish(id, absl::OkStatus(), reason);

  if (metrics_ != nullptr) {
    metrics_->step_time.Observe(Seconds(end - start));
    metrics_->batch_tokens.Observe(static_cast<double>(plan.num_tokens));
    metrics_->generated_tokens.Increment(static_cast<double>(rows));
    if (!plan.preempted.empty()) metrics_->preemptions.Increment(static_cast<double>(plan.preempted.size()));
  }
  load_changed_ = true;
  last_step_tokens_ = plan.num_tokens;
  PublishLoad(std::chrono::duration_cast<std::chrono::microseconds>(end - start).count());
}

void EngineLoop::ObserveStepCost(std::span<const SequenceStep> batch, double step_seconds) {
  const StepCost cost = EstimateStepCost(engine_->config(), batch, engine_->last_step_stats().routed_expert_reads,
                                         engine_->weight_value_bytes(), kv_value_bytes_);
  metrics_->step_weight_read_bytes.Observe(static_cast<double>(cost.weight_bytes));
  metrics_->step_kv_read_bytes.Observe(static_cast<double>(cost.kv_read_bytes));
  metrics_->step_kv_write_bytes.Observe(static_cast<double>(cost.kv_write_bytes));
  metrics_->step_flops.Observe(cost.flops);
  if (step_seconds > 0 && options_.peaks.memory_bandwidth_bytes_per_s > 0) {
    metrics_->memory_bandwidth_utilization.Observe(static_cast<double>(cost.memory_bytes()) / step_seconds /
                                                   options_.peaks.memory_bandwidth_bytes_per_s);
  }
  if (step_seconds > 0 && options_.peaks.flops_per_s > 0) {
    metrics_->flops_utilization.Observe(cost.flops / step_seconds / options_.peaks.flops_per_s);
  }
  metrics_->step_cost_dollars.Increment(step_seconds * options_.device_cost_dollars_per_hour / 3600.0);
}

void EngineLoop::PublishLoad(int64_t step_time_us) {
  const auto now = Clock::now();
  if (step_time_us >= 0) last_step_us_ = step_time_us;
  const bool due = now - last_report_ >= std::chrono::milliseconds(options_.report_interval_ms);
  if (!due && !(load_changed_ && now - last_report_ >= kMinReportGap)) return;
  last_report_ = now;
  load_changed_ = false;

  cohort::worker::v1::LoadReport report;
  report.set_worker_id(options_.worker_id);
  report.set_model(options_.model_name);
  report.set_state(unhealthy_.load() ? cohort::worker::v1::WORKER_STATE_UNHEALTHY
                   : draining_.load() ? cohort::worker::v1::WORKER_STATE_DRAINING
                                      : cohort::worker::v1::WORKER_STATE_READY);
  report.set_running_requests(static_cast<uint32_t>(scheduler_.num_running()));
  report.set_waiting_requests(static_cast<uint32_t>(scheduler_.num_waiting()));
  report.set_tokens_in_flight(static_cast<uint64_t>(scheduler_.tokens_in_flight()));
  report.set_free_kv_blocks(static_cast<uint32_t>(blocks_.num_available()));
  report.set_total_kv_blocks(static_cast<uint32_t>(blocks_.num_blocks()));
  report.set_kv_block_size_tokens(static_cast<uint32_t>(blocks_.block_size()));
  report.set_max_batch_tokens(static_cast<uint32_t>(options_.scheduler.max_batch_tokens));
  report.set_unix_time_ms(std::chrono::duration_cast<std::chrono::milliseconds>(
                              std::chrono::system_clock::now().time_since_epoch())
                              .count());
  report.set_last_step_us(static_cast<uint32_t>(last_step_us_));
  report.set_last_step_tokens(static_cast<uint32_t>(last_step_tokens_));
  Send([&publisher = publisher_, report = std::move(report), events = blocks_.TakeEvents()] {
    publisher.Publish(report, events);
  });

  if (metrics_ != nullptr) {
    metrics_->requests_running.Set(static_cast<double>(scheduler_.num_running()));
    metrics_->requests_waiting.Set(static_cast<double>(scheduler_.num_waiting()));
    metrics_->kv_blocks_used.Set(static_cast<double>(blocks_.num_held()));
    metrics_->prefix_cache_queries.Increment(static_cast<double>(blocks_.prefix_queries() - reported_queries_));
    metrics_->prefix_cache_hits.Increment(static_cast<double>(blocks_.prefix_hit_blocks() - reported_hits_));
    reported_queries_ = blocks_.prefix_queries();
    reported_hits_ = blocks_.prefix_hit_blocks();
  }
}

void EngineLoop::Run() {
  while (true) {
    TakeInbox();
    waiting_requests_.store(static_cast<int64_t>(scheduler_.num_waiting()));
    if (scheduler_.num_running() + scheduler_.num_waiting() > 0) {
      Step();
      FlushOutbox();
      waiting_requests_.store(static_cast<int64_t>(scheduler_.num_waiting()));
      std::lock_guard<std::mutex> lock(mu_);
      if (stop_) break;
      continue;
    }
    PublishLoad(-1);
    FlushOutbox();
    // Idle: sleep until new work, the next periodic report, or (when a change is still unreported
    // because of the rate limit) the moment it may be reported.
    auto wait = std::chrono::milliseconds(options_.report_interval_ms);
    if (load_changed_) {
      wait = std::min(wait, std::chrono::duration_cast<std::chrono::milliseconds>(
                                kMinReportGap - (Clock::now() - last_report_)) + std::chrono::milliseconds(1));
    }
    std::unique_lock<std::mutex> lock(mu_);
    if (stop_) break;
    wake_.wait_for(lock, wait, [&] { return stop_ || !inbox_.empty() || !cancels_.empty(); });
    if (stop_) break;
  }
  // Whatever is left when the loop stops (after a drain that timed out, or on an error).
  TakeInbox();
  std::vector<uint64_t> ids;
  for (const auto& [id, live] : live_) ids.push_back(id);
  for (uint64_t id : ids) Finish(id, absl::UnavailableError("the worker is shutting down"), {});
  FlushOutbox();
}

void EngineLoop::FlushOutbox() {
  if (!outbox_.empty()) sender_.Post(std::exchange(outbox_, {}));
}

}  // namespace cohort
