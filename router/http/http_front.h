// The OpenAI-compatible HTTP front of cohort-router, on cpp-httplib:
//
//   POST /v1/completions       prompt as token ids; streamed as server-sent events with "stream": true
//   POST /v1/chat/completions  validated, then 501 until the workers load a tokenizer
//   GET  /v1/models            the models the workers serve
//   GET  /health               200 while the process runs
//   GET  /ready                200 while at least one worker can take requests, else 503
//
// Generation goes through the same Dispatcher as the gRPC front. Each open request holds one of
// the server's threads, which waits on the request's queue (gRPC threads only append to it) and
// cancels the generation when the client hangs up.
//
// Locking: a request's state belongs to the thread serving its connection; GenerationQueue is all
// it shares with gRPC threads, and mu_ below guards only the drain. Shutdown may be called from any thread.
//
//   COHORT_ASSIGN_OR_RETURN(std::unique_ptr<HttpFront> http, HttpFront::Create(dispatcher, {.port = 0}));
//   ... http->port() ...
//   http->Shutdown(deadline);
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "router/server/dispatcher.h"

namespace httplib {
class Server;
struct Request;
struct Response;
}  // namespace httplib

namespace cohort {

struct CompletionRequest;

struct HttpFrontOptions {
  std::string host = "0.0.0.0";
  int port = 8080;                              // 0: any free port
  size_t max_body_bytes = 8 << 20;              // larger bodies get 413
  int threads = 256;                            // connections served at once; each open request holds one
  std::chrono::milliseconds hangup_check{100};  // how often a waiting request checks for a gone client
};

class HttpFront {
 public:
  // Listens and serves on a thread of its own; an error when the port cannot be bound.
  static absl::StatusOr<std::unique_ptr<HttpFront>> Create(Dispatcher& dispatcher, const HttpFrontOptions& options);
  ~HttpFront();  // Shutdown(now) if not done

  int port() const { return port_; }

  // Refuses new generations (503, and /ready turns 503), waits until `deadline` for open ones,
  // cancels those left and stops serving. Later calls return at once.
  void Shutdown(std::chrono::system_clock::time_point deadline);

 private:
  struct Generation;
  class InFlight;

  HttpFront(Dispatcher& dispatcher, const HttpFrontOptions& options);
  void Route();

  void Models(httplib::Response& res);
  void Ready(httplib::Response& res);
  void Completions(const httplib::Request& req, httplib::Response& res);
  void ChatCompletions(const httplib::Request& req, httplib::Response& res);
  void Generate(const httplib::Request& req, httplib::Response& res, CompletionRequest request);

  Dispatcher& dispatcher_;
  const HttpFrontOptions options_;
  const int64_t started_;  // Unix seconds, the models' "created"
  std::unique_ptr<httplib::Server> server_;
  std::thread listener_;
  int port_ = -1;

  std::atomic<bool> stopping_{false};  // waiting requests cancel and return
  std::mutex mu_;                      // guards the three below
  std::condition_variable idle_;
  bool draining_ = false;
  bool shut_down_ = false;
  int in_flight_ = 0;
};

}  // namespace cohort
