// The worker's engine loop when its engine fails for good. The real cause, a GPU of an
// expert-parallel group that dies or stops answering (worker/model/cuda/expert_parallel.h), cannot
// happen on a machine without GPUs, so FailingEngine stands in for it: the null engine
// (--device null) that, from a given step on, returns UNAVAILABLE as the expert-parallel engine
// does once its group is broken.
#include <atomic>
#include <chrono>
#include <memory>
#include <thread>

#include "absl/synchronization/mutex.h"
#include "gtest/gtest.h"
#include "tests/testing/paths.h"
#include "worker/model/engine.h"
#include "worker/server/engine_loop.h"
#include "worker/server/load_publisher.h"

namespace cohort {
namespace {

class FailingEngine final : public Engine {
 public:
  FailingEngine(std::unique_ptr<Engine> engine, int healthy_steps)
      : engine_(std::move(engine)), healthy_steps_(healthy_steps) {}
  const ModelConfig& config() const override { return engine_->config(); }
  const KvCacheGeometry& kv_geometry() const override { return engine_->kv_geometry(); }
  absl::Status Forward(std::span<const SequenceStep> batch, std::span<float> logits) override {
    if (steps_++ >= healthy_steps_) return absl::UnavailableError("GPU 1 did not finish within 1m");
    return engine_->Forward(batch, logits);
  }

 private:
  std::unique_ptr<Engine> engine_;
  const int healthy_steps_;
  int steps_ = 0;
};

// Records how a request ended.
class Recorder final : public GenerationSink {
 public:
  void OnChunk(cohort::v1::GenerateResponse chunk) override {
    absl::MutexLock lock(&mu_);
    chunks_ += 1;
  }
  void OnFinish(const absl::Status& status, cohort::v1::GenerateResponse) override {
    absl::MutexLock lock(&mu_);
    status_ = status;
    finished_ = true;
  }
  // The status it ended with; fails the test after 10 s without an end.
  absl::Status AwaitEnd() {
    absl::MutexLock lock(&mu_);
    if (!mu_.AwaitWithTimeout(absl::Condition(&finished_), absl::Seconds(10))) {
      ADD_FAILURE() << "the request did not end";
    }
    return status_;
  }
  int chunks() {
    absl::MutexLock lock(&mu_);
    return chunks_;
  }

 private:
  absl::Mutex mu_;
  bool finished_ = false;
  absl::Status status_;
  int chunks_ = 0;
};

GenerateSpec Spec(int64_t max_tokens) {
  GenerateSpec spec;
  spec.prompt = {1, 2, 3};
  spec.max_tokens = max_tokens;
  spec.ignore_eos = true;
  return spec;
}

// After the engine fails, every request in flight ends with UNAVAILABLE (clients and the router
// retry those elsewhere), a new request is refused with UNAVAILABLE, and the load reports the
// router reads say UNHEALTHY, so it sends the worker nothing more.
TEST(EngineLoopTest, AFailedEngineEndsEveryRequestAndMakesTheWorkerUnhealthy) {
  EngineOptions options;
  options.model_dir = testing::SourcePath("tests/fixtures/models/v3_plain");
  options.device = "null";
  auto null_engine = CreateEngine(options);
  ASSERT_TRUE(null_engine.ok()) << null_engine.status();
  // The warm-up step and three more succeed; the fifth fails.
  auto engine = std::make_unique<FailingEngine>(std::move(null_engine).value(), 4);
  LoadPublisher publisher;
  EngineLoopOptions loop_options;
  loop_options.scheduler = {.max_batch_tokens = 64, .max_running = 8};
  loop_options.model_name = "v3_plain";
  loop_options.report_interval_ms = 10;
  EngineLoop loop(std::move(engine), loop_options, publisher, /*metrics=*/nullptr);
  ASSERT_TRUE(loop.WarmUp().ok());
  loop.Start();

  auto first = std::make_shared<Recorder>(), second = std::make_shared<Recorder>();
  ASSERT_TRUE(loop.Submit(Spec(100), first).ok());
  ASSERT_TRUE(loop.Submit(Spec(100), second).ok());
  for (Recorder* r : {first.get(), second.get()}) {
    const absl::Status ended = r->AwaitEnd();
    EXPECT_TRUE(absl::IsUnavailable(ended)) << ended;
    EXPECT_NE(ended.message().find("GPU 1 did not finish"), std::string::npos) << ended;
    EXPECT_LT(r->chunks(), 100) << "ended by the failure, not by max_tokens";
  }
  EXPECT_TRUE(loop.unhealthy());

  const absl::StatusOr<uint64_t> refused = loop.Submit(Spec(4), std::make_shared<Recorder>());
  EXPECT_TRUE(absl::IsUnavailable(refused.status())) << refused.status();

  cohort::worker::v1::WorkerState state = cohort::worker::v1::WORKER_STATE_UNSPECIFIED;
  for (int i = 0; i < 200 && state != cohort::worker::v1::WORKER_STATE_UNHEALTHY; ++i) {
    uint64_t last_event = 0, version = 0;
    state = publisher.Next(0, &last_event, &version).state();
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(state, cohort::worker::v1::WORKER_STATE_UNHEALTHY);
  loop.Stop();
}

}  // namespace
}  // namespace cohort
