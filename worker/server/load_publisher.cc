#include "worker/server/load_publisher.h"

namespace cohort {

using cohort::worker::v1::LoadReport;
using ProtoEvent = cohort::worker::v1::PrefixCacheEvent;

LoadPublisher::LoadPublisher(size_t max_retained_events) : max_retained_(max_retained_events) {}

void LoadPublisher::Publish(const LoadReport& state, const std::vector<PrefixCacheEvent>& events) {
  std::vector<std::function<void()>> to_notify;
  {
    std::lock_guard<std::mutex> lock(mu_);
    state_ = state;
    state_.clear_prefix_cache_events();
    ++version_;
    for (const PrefixCacheEvent& e : events) {
      events_.push_back(e);
      last_event_id_ = e.id;
      if (e.kind == PrefixCacheEvent::Kind::kAdded) {
        cached_hashes_.insert(e.block_hash);
      } else {
        cached_hashes_.erase(e.block_hash);
      }
    }
    while (events_.size() > max_retained_) events_.pop_front();
    for (const auto& [token, listener] : listeners_) to_notify.push_back(listener);
  }
  for (const auto& listener : to_notify) listener();
}

LoadReport LoadPublisher::Next(uint64_t after_event_id, uint64_t* last_event_id, uint64_t* version) const {
  std::lock_guard<std::mutex> lock(mu_);
  LoadReport report = state_;
  *version = version_;
  *last_event_id = last_event_id_;
  if (after_event_id >= last_event_id_) return report;

  const bool retained = after_event_id > 0 && !events_.empty() && events_.front().id <= after_event_id + 1;
  if (retained) {
    // Events are consecutive, so the first one to send sits at a known offset.
    for (size_t i = after_event_id + 1 - events_.front().id; i < events_.size(); ++i) {
      const PrefixCacheEvent& e = events_[i];
      ProtoEvent* out = report.add_prefix_cache_events();
      out->set_event_id(e.id);
      out->set_kind(e.kind == PrefixCacheEvent::Kind::kAdded ? ProtoEvent::KIND_ADDED : ProtoEvent::KIND_EVICTED);
      out->add_block_hashes(e.block_hash);
    }
    return report;
  }
  ProtoEvent* cleared = report.add_prefix_cache_events();
  cleared->set_event_id(last_event_id_);
  cleared->set_kind(ProtoEvent::KIND_CLEARED);
  if (!cached_hashes_.empty()) {
    ProtoEvent* added = report.add_prefix_cache_events();
    added->set_event_id(last_event_id_);
    added->set_kind(ProtoEvent::KIND_ADDED);
    for (uint64_t h : cached_hashes_) added->add_block_hashes(h);
  }
  return report;
}

uint64_t LoadPublisher::version() const {
  std::lock_guard<std::mutex> lock(mu_);
  return version_;
}

int LoadPublisher::Subscribe(std::function<void()> listener) {
  std::lock_guard<std::mutex> lock(mu_);
  listeners_.emplace(next_token_, std::move(listener));
  return next_token_++;
}

void LoadPublisher::Unsubscribe(int token) {
  std::lock_guard<std::mutex> lock(mu_);
  listeners_.erase(token);
}

}  // namespace cohort
