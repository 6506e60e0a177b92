// The workers a router knows, and what it knows about them: each one's latest load report and the
// block hashes in its prefix cache, learned from the worker's StreamLoad stream. All of it is soft
// state, rebuilt from the streams after a restart.
//
// Workers come from a static list and/or a DNS name re-resolved every few seconds (a Kubernetes
// headless Service). One thread per worker keeps its stream open, reconnecting with backoff; while
// the stream is down the worker is unavailable. A worker whose calls keep failing is ejected for a
// while (outlier ejection).
//
// Thread-safe: every public method may be called from any thread.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <span>
#include <string>
#include <thread>
#include <unordered_set>
#include <vector>

#include "cohort/worker/v1/worker.grpc.pb.h"
#include "router/policy/policy.h"

namespace cohort {

struct WorkerPoolOptions {
  std::vector<std::string> addresses;  // host:port
  std::string dns_target;              // name:port, re-resolved every dns_interval
  std::chrono::milliseconds dns_interval{3000};
  // Test resolver: a hosts-format file ("ip name...") consulted instead of the system resolver.
  std::string hosts_file;
  int eject_after_failures = 3;        // consecutive failed calls
  std::chrono::milliseconds ejection{10000};
};

// One worker as a routing decision sees it.
struct WorkerChoice {
  std::string address;
  std::shared_ptr<cohort::worker::v1::Worker::Stub> stub;
  Candidate load;
  uint32_t block_size = 16;
};

struct WorkerStatus {  // for metrics and logs
  std::string address;
  std::string model;
  bool connected = false;
  bool ready = false;
  bool ejected = false;
  cohort::worker::v1::LoadReport report;
};

class WorkerPool {
 public:
  explicit WorkerPool(WorkerPoolOptions options);
  ~WorkerPool();

  void Start();
  void Stop();

  // Workers that can take a request for `model` now (stream up, READY, not ejected), minus
  // `exclude`, each with how many leading blocks of `prompt` it holds in its prefix cache.
  std::vector<WorkerChoice> Candidates(const std::string& model, std::span<const int32_t> prompt,
                                       const std::set<std::string>& exclude) const;
  // Models that at least one connected worker serves.
  std::set<std::string> Models() const;
  std::vector<WorkerStatus> Statuses() const;

  // This router's own count of requests sent to a worker that its load report may not show yet:
  // up on dispatch, down when the call ends, reset by every new report.
  void OnDispatched(const std::string& address);
  void OnCallEnded(const std::string& address);
  void OnCallSucceeded(const std::string& address);
  // Returns true when this failure ejected the worker.
  bool OnCallFailed(const std::string& address);

  // Blocks until the pool's state changes or `deadline` passes.
  void WaitForChange(std::chrono::steady_clock::time_point deadline) const;

 private:
  struct Member;
  void AddMember(const std::string& address);  // requires mu_
  void Subscribe(Member* m);
  void Discover();
  void Changed();

  WorkerPoolOptions options_;
  mutable std::mutex mu_;
  mutable std::condition_variable changed_;
  uint64_t generation_ = 0;  // bumped on every change, for WaitForChange
  std::map<std::string, std::shared_ptr<Member>> members_;
  std::atomic<bool> stopping_{false};
  std::thread discovery_;
};

// Resolves "name:port" to "ip:port" strings, through `hosts_file` when given.
std::vector<std::string> ResolveTarget(const std::string& target, const std::string& hosts_file);

}  // namespace cohort
