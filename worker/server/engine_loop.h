// The worker's engine thread: the only thread that touches the scheduler, the block manager and
// the engine. Each iteration takes in new and cancelled requests, schedules a step, runs it,
// samples, and sends tokens to each request's sink.
//
// The engine thread never calls into gRPC itself: the sinks' calls and the load reports of an
// iteration go, in one hand-over, to a sender thread (SerialExecutor), which makes them in order
// while the next step runs. Made on the engine thread, they held it about 15 us a stream after every
// step: 1.0 ms beside a 9.7 ms step at 64 streams (H200, DeepSeek-V2-Lite shapes); moved off it,
// `cohort bench serve` gave 7-9% more tokens/s at 64 streams and 22-26% more at 256.
//
// Thread-safety: Submit, Cancel, Drain and the accessors may be called from any thread (gRPC
// reactors); everything else runs on the engine thread. The inbox mutex `mu_` guards only the
// hand-over between the two; no lock is held while a step runs or while a sink is called.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "cohort/v1/inference.pb.h"
#include "common/serial_executor.h"
#include "worker/kv/block_manager.h"
#include "worker/model/engine.h"
#include "worker/model/step_cost.h"
#include "worker/scheduler/scheduler.h"
#include "worker/server/generate_request.h"
#include "worker/server/load_publisher.h"
#include "worker/server/metrics.h"

namespace cohort {

// Where a request's output goes. Called on the loop's sender thread, one call at a time, in the
// order the engine thread made them (a request's chunks in order, then its finish); implementations
// must not block, or they hold up every other stream.
class GenerationSink {
 public:
  virtual ~GenerationSink() = default;
  virtual void OnChunk(cohort::v1::GenerateResponse chunk) = 0;
  // The last call for a request: `final` (finish reason and usage) when status is OK, else the error.
  virtual void OnFinish(const absl::Status& status, cohort::v1::GenerateResponse final) = 0;
};

struct EngineLoopOptions {
  SchedulerOptions scheduler;
  bool prefix_caching = true;
  int64_t max_queue = 1024;  // waiting requests beyond this are refused with RESOURCE_EXHAUSTED
  std::string worker_id;
  std::string model_name;
  int64_t report_interval_ms = 100;
  // Detokenizes streamed tokens (chunk text, stop strings); may be null. Outlives the loop.
  const Tokenizer* tokenizer = nullptr;
  // For the batching-economics metrics (metrics.h): the peak rates of the devices the engine runs
  // on, and what they cost per hour together. A zero peak leaves its utilization unobserved.
  DevicePeaks peaks = kH200Peaks;
  double device_cost_dollars_per_hour = 3.0;
};

class EngineLoop {
 public:
  // `metrics` may be null.
  EngineLoop(std::unique_ptr<Engine> engine, const EngineLoopOptions& options, LoadPublisher& publisher,
             WorkerMetrics* metrics);
  ~EngineLoop();

  // The name load reports carry; call before Start.
  void set_worker_id(std::string id) { options_.worker_id = std::move(id); }
  // Runs one real forward pass of one token; the worker is ready only after it succeeds.
  absl::Status WarmUp();
  void Start();

  // Queues a request and returns its id. UNAVAILABLE when draining or unhealthy, RESOURCE_EXHAUSTED
  // when the queue is full, INVALID_ARGUMENT when it could never fit in the KV cache.
  absl::StatusOr<uint64_t> Submit(GenerateSpec spec, std::shared_ptr<GenerationSink> sink);
  // The request leaves the batch, its blocks are freed and its sink finishes with CANCELLED, all
  // within one step. Unknown ids are ignored.
  void Cancel(uint64_t id);
  // Refuses new requests from now on; running and queued ones finish.
  void Drain();
  bool draining() const { return draining_.load(); }
  // The engine said it can take no more steps (Engine returned UNAVAILABLE: a GPU of its group
  // failed). Every request then ends with UNAVAILABLE, so that clients retry elsewhere, new ones are
  // refused, and load reports say UNHEALTHY; the worker should report itself not ready.
  bool unhealthy() const { return unhealthy_.load(); }
  // No request queued or running.
  bool idle() const { return live_requests_.load() == 0; }
  // Ends the thread; requests still there finish with UNAVAILABLE, and every sink has had its last
  // call when Stop returns.
  void Stop();

  const ModelLimits& limits() const { return limits_; }
  const ModelConfig& model_config() const { return engine_->config(); }

 private:
  struct Live;  // a request's sink, sampler and timings
  struct Pending {
    uint64_t id;
    GenerateSpec spec;
    std::shared_ptr<GenerationSink> sink;
  };

  void Run();
  void TakeInbox();
  void Step();
  void Finish(uint64_t id, const absl::Status& status, cohort::v1::FinishReason reason);
  void PublishLoad(int64_t step_time_us);
  // Queues a call into gRPC (a sink's, a load report's) for the sender thread; FlushOutbox hands the
  // queue over, once an iteration.
  void Send(SerialExecutor::Task call) { outbox_.push_back(std::move(call)); }
  void FlushOutbox();
  // The economics metrics of the step just run; `batch` must still point at its tokens.
  void ObserveStepCost(std::span<const SequenceStep> batch, double step_seconds);

  std::unique_ptr<Engine> engine_;
  EngineLoopOptions options_;
  LoadPublisher& publisher_;
  WorkerMetrics* metrics_;
  ModelLimits limits_;
  BlockManager blocks_;
  Scheduler scheduler_;
  std::unordered_map<uint64_t, std::unique_ptr<Live>> live_;  // engine thread only
  std::vector<float> logits_;  // the warm-up step's
  int64_t kv_value_bytes_ = 0;  // bytes per cached value, from the engine's KV geometry

  std::mutex mu_;
  std::condition_variable wake_;
  std::vector<Pending> inbox_;       // guarded by mu_
  std::vector<uint64_t> cancels_;    // guarded by mu_
  bool stop_ = false;                // guarded by mu_
  uint64_t next_id_ = 1;             // guarded by mu_

  std::atomic<bool> draining_{false};
  std::atomic<bool> unhealthy_{false};
  std::atomic<int64_t> live_requests_{0};   // queued in the inbox or known to the scheduler
  std::atomic<int64_t> waiting_requests_{0};
  std::thread thread_;
  std::vector<SerialExecutor::Task> outbox_;  // engine thread only
  SerialExecutor sender_;
  std::chrono::steady_clock::time_point last_report_{};
  bool load_changed_ = true;
  int64_t last_step_us_ = 0;
  int64_t last_step_tokens_ = 0;
  uint64_t reported_queries_ = 0;  // prefix-cache counters already added to the metrics
  uint64_t reported_hits_ = 0;
};

}  // namespace cohort
