// A generation request as the scheduler sees it.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <vector>

namespace cohort {

// In chronological order. Preemption sends a running request back to kWaiting (its KV is dropped
// and recomputed later; tokens already produced are kept and never sent twice).
enum class RequestState { kWaiting, kRunning, kFinished };

enum class RequestPriority { kInteractive, kBatch };  // batch requests fill spare capacity

struct Request {
  using Clock = std::chrono::steady_clock;

  uint64_t id = 0;
  RequestPriority priority = RequestPriority::kInteractive;
  std::vector<int32_t> tokens;  // the prompt, then every generated token
  int64_t prompt_len = 0;
  int64_t max_tokens = 0;       // tokens to generate at most

  // Scheduling state, owned by the Scheduler.
  RequestState state = RequestState::kWaiting;
  int64_t computed = 0;                // leading tokens whose KV entries are in block_table
  std::vector<int32_t> block_table;
  std::vector<uint64_t> block_hashes;  // chained hashes of the full blocks of computed tokens
  int64_t cached_blocks = 0;           // block_table[0, cached_blocks) are in the prefix cache
  int64_t cached_prompt_tokens = 0;    // prompt tokens served from the prefix cache at first admission
  bool admitted_before = false;
  int64_t preemptions = 0;
  uint64_t admission_order = 0;        // larger = admitted more recently
  uint64_t scheduled_in_step = 0;      // last step that scheduled it

  Clock::time_point arrival_time = Clock::now();

  int64_t num_generated() const { return static_cast<int64_t>(tokens.size()) - prompt_len; }
  // Known tokens whose KV entries are not computed yet: a prompt's unprefilled part, or the
  // newest sampled token of a decoding request.
  int64_t uncomputed() const { return static_cast<int64_t>(tokens.size()) - computed; }
};

}  // namespace cohort
