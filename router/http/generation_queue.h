// Hands one generation's responses from the Dispatcher (gRPC threads) to the HTTP handler thread
// that writes them out. The observer side only appends under a short lock and notifies, so gRPC
// threads never wait on an HTTP client; the handler side blocks in Wait.
//
// Thread-safe: OnResponse/OnDone from gRPC threads, Wait from one HTTP thread.
#pragma once

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <optional>
#include <vector>

#include "router/server/dispatcher.h"

namespace cohort {

class GenerationQueue final : public GenerationObserver {
 public:
  struct Batch {
    std::vector<cohort::v1::GenerateResponse> responses;  // in order
    std::optional<grpc::Status> done;                     // set once, after the last response
  };

  void OnResponse(const cohort::v1::GenerateResponse& response) override;
  void OnDone(const grpc::Status& status) override;

  // Waits up to `timeout` for responses or the end, then takes everything pending. An empty batch
  // means nothing arrived in time.
  Batch Wait(std::chrono::milliseconds timeout);

 private:
  std::mutex mu_;
  std::condition_variable changed_;
  std::vector<cohort::v1::GenerateResponse> pending_;
  std::optional<grpc::Status> done_;
  bool done_taken_ = false;
};

}  // namespace cohort
