// Routing policies: small functors over a snapshot of the candidate workers, so tests check their
// choices on tables of snapshots without threads or sockets.
//
//   round_robin     each candidate in turn
//   least_loaded    the lowest cost
//   prefix_affinity (default) the candidate holding the longest cached prefix of the prompt, unless
//                   its cost exceeds `hotspot_factor` x the lowest cost + `hotspot_slack` (the slack
//                   absorbs load reports that lag a few requests behind); otherwise
//                   the cheaper of two random candidates (power of two choices), so that many
//                   router replicas with the same view do not all pick the same worker.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <random>
#include <span>
#include <string>

#include "absl/status/statusor.h"

namespace cohort {

// What a policy knows about one worker that can serve the request.
struct Candidate {
  uint32_t running = 0;
  uint32_t waiting = 0;
  uint64_t tokens_in_flight = 0;   // known tokens not yet computed (prefill backlog + pending decodes)
  uint32_t max_batch_tokens = 1;
  uint32_t free_kv_blocks = 0;
  uint32_t total_kv_blocks = 1;
  uint32_t dispatched_since_report = 0;  // sent by this router, maybe not in the report yet
  int64_t cached_prefix_blocks = 0;      // leading blocks of this prompt the worker holds
};

// Expected wait for new work on a worker, in "steps": queued requests count double (they wait for
// a slot and then run), prefill backlog counts in units of the step budget, and a nearly full KV
// cache adds up to 4 (it is about to preempt).
double LoadCost(const Candidate& c);

class RoutingPolicy {
 public:
  virtual ~RoutingPolicy() = default;
  // Index into `candidates` (never empty) of the chosen worker.
  virtual size_t Choose(std::span<const Candidate> candidates, std::mt19937_64& rng) = 0;
};

class RoundRobinPolicy final : public RoutingPolicy {
 public:
  size_t Choose(std::span<const Candidate> candidates, std::mt19937_64& rng) override;

 private:
  std::atomic<uint64_t> next_{0};
};

class LeastLoadedPolicy final : public RoutingPolicy {
 public:
  size_t Choose(std::span<const Candidate> candidates, std::mt19937_64& rng) override;
};

class PrefixAffinityPolicy final : public RoutingPolicy {
 public:
  explicit PrefixAffinityPolicy(double hotspot_factor = 1.5, double hotspot_slack = 4.0)
      : hotspot_factor_(hotspot_factor), hotspot_slack_(hotspot_slack) {}
  size_t Choose(std::span<const Candidate> candidates, std::mt19937_64& rng) override;

 private:
  double hotspot_factor_;
  double hotspot_slack_;
};

// "round_robin", "least_loaded" or "prefix_affinity"; InvalidArgument naming the flag otherwise.
absl::StatusOr<std::unique_ptr<RoutingPolicy>> MakePolicy(const std::string& name);

}  // namespace cohort
