#include "worker/server/load_publisher.h"

#include <set>

#include "gtest/gtest.h"

namespace cohort {
namespace {

using cohort::worker::v1::LoadReport;
using ProtoEvent = cohort::worker::v1::PrefixCacheEvent;

LoadReport State(uint32_t running) {
  LoadReport r;
  r.set_running_requests(running);
  return r;
}

PrefixCacheEvent Added(uint64_t id, uint64_t hash) { return {id, PrefixCacheEvent::Kind::kAdded, hash}; }
PrefixCacheEvent Evicted(uint64_t id, uint64_t hash) { return {id, PrefixCacheEvent::Kind::kEvicted, hash}; }

TEST(LoadPublisherTest, SubscriberGetsTheLatestStateAndOnlyUnseenEvents) {
  LoadPublisher publisher;
  publisher.Publish(State(1), {Added(1, 11), Added(2, 22)});
  publisher.Publish(State(2), {Evicted(3, 11)});
  uint64_t last = 0, version = 0;
  LoadReport report = publisher.Next(/*after_event_id=*/2, &last, &version);
  EXPECT_EQ(report.running_requests(), 2u);
  ASSERT_EQ(report.prefix_cache_events_size(), 1);
  EXPECT_EQ(report.prefix_cache_events(0).event_id(), 3u);
  EXPECT_EQ(report.prefix_cache_events(0).kind(), ProtoEvent::KIND_EVICTED);
  EXPECT_EQ(last, 3u);
  EXPECT_EQ(version, 2u);
  EXPECT_EQ(publisher.Next(3, &last, &version).prefix_cache_events_size(), 0);
}

TEST(LoadPublisherTest, NewOrLaggingSubscriberGetsASnapshotOfTheCache) {
  LoadPublisher publisher(/*max_retained_events=*/2);
  publisher.Publish(State(0), {Added(1, 11), Added(2, 22), Added(3, 33), Evicted(4, 22)});
  for (uint64_t after : {uint64_t{0}, uint64_t{1}}) {  // new; and behind the 2 retained events
    uint64_t last = 0, version = 0;
    LoadReport report = publisher.Next(after, &last, &version);
    ASSERT_GE(report.prefix_cache_events_size(), 2) << after;
    EXPECT_EQ(report.prefix_cache_events(0).kind(), ProtoEvent::KIND_CLEARED);
    EXPECT_EQ(report.prefix_cache_events(1).kind(), ProtoEvent::KIND_ADDED);
    std::set<uint64_t> hashes(report.prefix_cache_events(1).block_hashes().begin(),
                              report.prefix_cache_events(1).block_hashes().end());
    EXPECT_EQ(hashes, (std::set<uint64_t>{11, 33}));
    EXPECT_EQ(last, 4u);
  }
  // A subscriber within the retained window gets the plain events.
  uint64_t last = 0, version = 0;
  EXPECT_EQ(publisher.Next(2, &last, &version).prefix_cache_events(0).kind(), ProtoEvent::KIND_ADDED);
}

TEST(LoadPublisherTest, ListenersRunOnPublishUntilUnsubscribed) {
  LoadPublisher publisher;
  int calls = 0;
  int token = publisher.Subscribe([&] { ++calls; });
  publisher.Publish(State(0), {});
  publisher.Publish(State(0), {});
  publisher.Unsubscribe(token);
  publisher.Publish(State(0), {});
  EXPECT_EQ(calls, 2);
}

}  // namespace
}  // namespace cohort
