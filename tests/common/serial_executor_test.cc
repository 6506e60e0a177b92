// SerialExecutor: posted tasks run off the posting thread, one at a time, in the order they were
// posted, and none is lost at Stop or after it.
#include "common/serial_executor.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

namespace cohort {
namespace {

// Four threads post 500 numbered tasks each, in batches of up to 7: every task runs once, each
// thread's in its order, none on a posting thread, and never two at once.
TEST(SerialExecutorTest, RunsEveryPostersTasksInOrderOneAtATime) {
  constexpr int kPosters = 4, kTasks = 500;
  std::vector<std::vector<int>> seen(kPosters);  // written by the executor's thread only
  std::atomic<int> running{0};
  std::atomic<bool> overlapped{false}, on_poster{false};
  std::vector<std::thread::id> posters(kPosters);
  std::mutex posters_mu;
  {
    SerialExecutor executor;
    std::vector<std::thread> threads;
    for (int p = 0; p < kPosters; ++p) {
      threads.emplace_back([&, p] {
        {
          std::lock_guard<std::mutex> lock(posters_mu);
          posters[p] = std::this_thread::get_id();
        }
        std::vector<SerialExecutor::Task> batch;
        for (int i = 0; i < kTasks; ++i) {
          batch.push_back([&, p, i] {
            if (running.fetch_add(1) != 0) overlapped = true;
            {
              std::lock_guard<std::mutex> lock(posters_mu);
              for (const std::thread::id& id : posters) on_poster = on_poster || id == std::this_thread::get_id();
            }
            seen[p].push_back(i);
            running.fetch_sub(1);
          });
          if (batch.size() == static_cast<size_t>(1 + i % 7)) executor.Post(std::exchange(batch, {}));
        }
        executor.Post(std::move(batch));
      });
    }
    for (std::thread& t : threads) t.join();
  }  // the destructor runs what is still queued
  for (int p = 0; p < kPosters; ++p) {
    ASSERT_EQ(seen[p].size(), static_cast<size_t>(kTasks)) << "poster " << p;
    for (int i = 0; i < kTasks; ++i) ASSERT_EQ(seen[p][i], i) << "poster " << p;
  }
  EXPECT_FALSE(overlapped) << "two tasks ran at once";
  EXPECT_FALSE(on_poster) << "a task ran on the thread that posted it";
}

// Stop returns only after the tasks posted before it ran, however slow; tasks posted after it run
// on the caller before Post returns.
TEST(SerialExecutorTest, StopRunsWhatIsQueuedAndLaterTasksRunInline) {
  SerialExecutor executor;
  std::atomic<int> ran{0};
  std::vector<SerialExecutor::Task> tasks;
  tasks.push_back([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    ++ran;
  });
  for (int i = 0; i < 99; ++i) tasks.push_back([&] { ++ran; });
  executor.Post(std::move(tasks));
  executor.Stop();
  EXPECT_EQ(ran.load(), 100);

  std::thread::id ran_on;
  executor.Post({[&] { ran_on = std::this_thread::get_id(); }});
  EXPECT_EQ(ran_on, std::this_thread::get_id());
  executor.Stop();  // again: nothing left to do
}

}  // namespace
}  // namespace cohort
