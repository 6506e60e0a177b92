#include "common/serial_executor.h"

#include <utility>

namespace cohort {

SerialExecutor::SerialExecutor() : thread_([this] { Run(); }) {}

SerialExecutor::~SerialExecutor() { Stop(); }

void SerialExecutor::Post(std::vector<Task> tasks) {
  if (tasks.empty()) return;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!stop_) {
      if (queue_.empty()) {
        queue_ = std::move(tasks);
      } else {
        for (Task& task : tasks) queue_.push_back(std::move(task));
      }
      wake_.notify_one();
      return;
    }
  }
  for (Task& task : tasks) task();
}

void SerialExecutor::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
    wake_.notify_one();
  }
  if (thread_.joinable()) thread_.join();
}

void SerialExecutor::Run() {
  std::vector<Task> batch;
  while (true) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      wake_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopped, and everything posted has run
      batch.swap(queue_);
    }
    for (Task& task : batch) task();
    batch.clear();
  }
}

}  // namespace cohort
