// A server-streaming reactor whose messages come from other threads: they are queued and written
// one at a time, then the stream finishes with the status given last. Subclasses add OnCancel
// handling and whatever feeds the queue.
//
// Locking: `mu_` guards the queue and the flags only, and is never held while calling into gRPC
// (a reaction may run inline). Messages pushed after the stream finished are dropped.
#pragma once

#include <grpcpp/grpcpp.h>

#include <deque>
#include <memory>
#include <mutex>
#include <optional>

namespace cohort {

template <typename Response>
class QueuedWriteReactor : public grpc::ServerWriteReactor<Response> {
 public:
  // Queues `message` (if any); with `status`, ends the stream once everything queued is written.
  void Push(std::optional<Response> message, const grpc::Status* status) {
    const Response* start = nullptr;
    bool finish = false;
    grpc::Status finish_status;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (finished_) return;
      if (message) queue_.push_back(std::move(*message));  // deque: queued items never move
      if (status != nullptr) final_status_ = *status;
      if (writing_) return;
      if (!queue_.empty()) {
        writing_ = true;
        start = &queue_.front();
      } else if (final_status_) {
        finished_ = true;
        finish = true;
        finish_status = *final_status_;
      }
    }
    if (start != nullptr) this->StartWrite(start);
    if (finish) this->Finish(finish_status);
  }

  // Ends the stream now, dropping what is queued (cancellation, a request refused up front).
  void FinishNow(const grpc::Status& status) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (finished_) return;
      finished_ = true;
    }
    this->Finish(status);
  }

  void OnWriteDone(bool ok) override {
    const Response* next = nullptr;
    bool finish = false;
    grpc::Status status;
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.pop_front();
      if (!ok) return;  // the stream broke; OnCancel follows
      if (!queue_.empty()) {
        next = &queue_.front();
      } else {
        writing_ = false;
        finish = final_status_.has_value() && !finished_;
        if (finish) {
          finished_ = true;
          status = *final_status_;
        }
      }
    }
    if (next != nullptr) this->StartWrite(next);
    if (finish) this->Finish(status);
  }

  // Keeps the reactor alive until gRPC is done with it (OnDone), however long others hold it.
  void Retain(std::shared_ptr<QueuedWriteReactor> self) {
    std::lock_guard<std::mutex> lock(mu_);
    self_ = std::move(self);
  }
  void OnDone() override {
    std::shared_ptr<QueuedWriteReactor> self;
    std::lock_guard<std::mutex> lock(mu_);
    self.swap(self_);  // released after the lock, possibly destroying *this last
  }

 private:
  std::mutex mu_;
  std::shared_ptr<QueuedWriteReactor> self_;
  std::deque<Response> queue_;
  std::optional<grpc::Status> final_status_;
  bool writing_ = false;
  bool finished_ = false;
};

}  // namespace cohort
