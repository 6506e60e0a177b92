#include "router/http/generation_queue.h"

namespace cohort {

void GenerationQueue::OnResponse(const cohort::v1::GenerateResponse& response) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    pending_.push_back(response);
  }
  changed_.notify_one();
}

void GenerationQueue::OnDone(const grpc::Status& status) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    done_ = status;
  }
  changed_.notify_one();
}

GenerationQueue::Batch GenerationQueue::Wait(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  changed_.wait_for(lock, timeout, [this] { return !pending_.empty() || (done_ && !done_taken_); });
  Batch batch;
  batch.responses.swap(pending_);
  if (done_ && !done_taken_) {
    batch.done = done_;
    done_taken_ = true;
  }
  return batch;
}

}  // namespace cohort
