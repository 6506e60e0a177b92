// A thread of its own that runs posted tasks one at a time, in the order they were posted.
//
// The worker's engine thread hands it every call into gRPC (a stream's next message, its end, a load
// report), so that writing a step's outputs overlaps the next step instead of delaying it
// (worker/server/engine_loop.h).
//
// Thread-safety: Post and Stop may be called from any thread, but not from a task (Stop would wait
// for itself).
#pragma once

#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace cohort {

class SerialExecutor {
 public:
  using Task = std::function<void()>;

  SerialExecutor();
  ~SerialExecutor();  // Stop()
  SerialExecutor(const SerialExecutor&) = delete;
  SerialExecutor& operator=(const SerialExecutor&) = delete;

  // Queues `tasks` to run after every task posted before them, in their order. After Stop they run
  // on the calling thread instead, before Post returns: nothing posted is dropped.
  void Post(std::vector<Task> tasks);
  // Runs every task already posted, then ends the thread. Idempotent.
  void Stop();

 private:
  void Run();

  std::mutex mu_;
  std::condition_variable wake_;
  std::vector<Task> queue_;  // guarded by mu_
  bool stop_ = false;        // guarded by mu_
  std::thread thread_;
};

}  // namespace cohort
