// Fan-out of the worker's load reports to every StreamLoad subscriber (the routers).
//
// The engine loop publishes its state and new prefix-cache events; each subscriber pulls the
// newest state plus the events it has not seen yet whenever it is ready to write, so a slow
// subscriber skips intermediate states but never misses an event. A subscriber too far behind
// (its events were dropped from the bounded log) gets a snapshot instead: a CLEARED event followed
// by every cached block hash as ADDED, with the current event id.
//
// Thread-safe: Publish from the engine thread, Next/Subscribe from gRPC reactors.
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <unordered_set>
#include <vector>

#include "cohort/worker/v1/worker.pb.h"
#include "worker/kv/block_manager.h"

namespace cohort {

class LoadPublisher {
 public:
  explicit LoadPublisher(size_t max_retained_events = 1 << 16);

  // `state` carries everything but the events.
  void Publish(const cohort::worker::v1::LoadReport& state, const std::vector<PrefixCacheEvent>& events);

  // The message for a subscriber that has seen events up to `after_event_id`; sets the id of the
  // last event it then has seen, and the version of the state it carries.
  cohort::worker::v1::LoadReport Next(uint64_t after_event_id, uint64_t* last_event_id, uint64_t* version) const;
  uint64_t version() const;

  // `listener` runs (outside the publisher's lock) after every Publish.
  int Subscribe(std::function<void()> listener);
  void Unsubscribe(int token);

 private:
  mutable std::mutex mu_;
  size_t max_retained_;
  cohort::worker::v1::LoadReport state_;
  uint64_t version_ = 0;
  std::deque<PrefixCacheEvent> events_;       // the most recent ones, ids increasing by one
  uint64_t last_event_id_ = 0;
  std::unordered_set<uint64_t> cached_hashes_;  // current content of the prefix cache
  std::map<int, std::function<void()>> listeners_;
  int next_token_ = 0;
};

}  // namespace cohort
