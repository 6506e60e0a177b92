#include "router/policy/policy.h"

#include <algorithm>
#include <limits>
#include <optional>

#include "absl/strings/str_cat.h"

namespace cohort {

double LoadCost(const Candidate& c) {
  const double occupancy =
      c.total_kv_blocks == 0 ? 1.0 : 1.0 - static_cast<double>(c.free_kv_blocks) / c.total_kv_blocks;
  return c.running + 2.0 * (c.waiting + c.dispatched_since_report) +
         static_cast<double>(c.tokens_in_flight) / std::max<uint32_t>(c.max_batch_tokens, 1) +
         4.0 * occupancy * occupancy;
}

size_t RoundRobinPolicy::Choose(std::span<const Candidate> candidates, std::mt19937_64&) {
  return next_.fetch_add(1) % candidates.size();
}

size_t LeastLoadedPolicy::Choose(std::span<const Candidate> candidates, std::mt19937_64&) {
  size_t best = 0;
  for (size_t i = 1; i < candidates.size(); ++i) {
    if (LoadCost(candidates[i]) < LoadCost(candidates[best])) best = i;
  }
  return best;
}

size_t PrefixAffinityPolicy::Choose(std::span<const Candidate> candidates, std::mt19937_64& rng) {
  double min_cost = std::numeric_limits<double>::infinity();
  for (const Candidate& c : candidates) min_cost = std::min(min_cost, LoadCost(c));

  // The longest cached prefix among workers that are not hotspots; ties to the cheaper one.
  const double bound = hotspot_factor_ * min_cost + hotspot_slack_;
  std::optional<size_t> affinity;
  for (size_t i = 0; i < candidates.size(); ++i) {
    const Candidate& c = candidates[i];
    if (c.cached_prefix_blocks == 0 || LoadCost(c) > bound) continue;
    if (!affinity || c.cached_prefix_blocks > candidates[*affinity].cached_prefix_blocks ||
        (c.cached_prefix_blocks == candidates[*affinity].cached_prefix_blocks &&
         LoadCost(c) < LoadCost(candidates[*affinity]))) {
      affinity = i;
    }
  }
  if (affinity) return *affinity;

  if (candidates.size() == 1) return 0;
  std::uniform_int_distribution<size_t> pick(0, candidates.size() - 1);
  const size_t a = pick(rng);
  size_t b = pick(rng);
  while (b == a) b = pick(rng);
  return LoadCost(candidates[b]) < LoadCost(candidates[a]) ? b : a;
}

absl::StatusOr<std::unique_ptr<RoutingPolicy>> MakePolicy(const std::string& name) {
  if (name == "round_robin") return std::make_unique<RoundRobinPolicy>();
  if (name == "least_loaded") return std::make_unique<LeastLoadedPolicy>();
  if (name == "prefix_affinity") return std::make_unique<PrefixAffinityPolicy>();
  return absl::InvalidArgumentError(
      absl::StrCat("--policy: '", name, "' is not one of prefix_affinity, least_loaded, round_robin"));
}

}  // namespace cohort
