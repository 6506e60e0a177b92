// Continuous batching over a paged KV cache, as a pure function of its state: no threads, no
// clocks, no engine. The engine loop calls Schedule(), runs the plan, samples, then OnStepDone().
//
// One rule, no phases: every step each scheduled request's computed tokens catch up with its known
// tokens as far as the per-step token budget allows. A decode is a catch-up of one token, a
// prefill a catch-up of many, split over steps when the budget is smaller than the prompt.
//
// Each step:
//  1. Running requests, fewest uncomputed tokens first (so decodes are never starved by a long
//     prefill), then oldest: each gets min(uncomputed, budget left) tokens and the blocks they need.
//     When blocks run out, the newest running request of the same KV pool not yet scheduled this
//     step is preempted (batch priority before interactive): its blocks are released and it waits
//     to be recomputed. Requests of other pools are left alone, as their blocks are of no use here;
//     with none left to preempt, the request preempts itself.
//  2. If nothing was preempted, waiting requests are admitted in order (interactive first; batch
//     only when no interactive request waits) while the budget, --max-running and free blocks
//     allow. A request first takes the cached blocks matching the start of its prompt.
//
// Static batching (BatchingPolicy::kStatic, `cohort-worker --scheduler static`) is the baseline
// that continuous batching is measured against: step 2 runs only when nothing is running, and then
// forms the batch from every waiting request that fits (up to --max-running, each with KV blocks
// for its whole prompt plus max_tokens, so the batch is never preempted). Nothing joins until the
// last member finishes; members beyond the first step's token budget are admitted without tokens
// and prefill in the next steps, by rule 1. With several KV pools the blocks are counted over the
// whole cache, not per pool, so a member whose pool fills up can still be preempted.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <unordered_map>
#include <vector>

#include "absl/status/status.h"
#include "worker/kv/block_manager.h"
#include "worker/scheduler/request.h"

namespace cohort {

enum class BatchingPolicy { kContinuous, kStatic };

struct SchedulerOptions {
  int64_t max_batch_tokens = 2048;  // tokens computed per step, all requests together
  int64_t max_running = 256;        // requests in the running batch
  BatchingPolicy batching = BatchingPolicy::kContinuous;
};

struct ScheduledChunk {
  Request* request;
  int64_t num_tokens;   // tokens [computed, computed + num_tokens) are computed this step
  bool compute_logits;  // the chunk reaches the request's last known token: sample after it
};

struct StepPlan {
  uint64_t step = 0;
  std::vector<ScheduledChunk> chunks;
  std::vector<Request*> preempted;
  int64_t num_tokens = 0;
  bool empty() const { return chunks.empty(); }
};

class Scheduler {
 public:
  Scheduler(const SchedulerOptions& options, BlockManager& blocks);

  // Queues a request. InvalidArgument when it could never run: its prompt plus max_tokens need
  // more KV blocks than one pool has (the whole cache, with one pool).
  absl::Status Add(std::unique_ptr<Request> request);
  StepPlan Schedule();
  // After the engine ran `plan`: advances each request's computed tokens and enters its newly full
  // blocks in the prefix cache. Sampled tokens are appended by the caller before the next Schedule().
  void OnStepDone(const StepPlan& plan);
  // Takes a request out (finished or cancelled) and releases its blocks; nullptr if unknown.
  std::unique_ptr<Request> Remove(uint64_t id);

  Request* Find(uint64_t id) const;
  const std::vector<Request*>& running() const { return running_; }
  size_t num_running() const { return running_.size(); }
  size_t num_waiting() const { return waiting_interactive_.size() + waiting_batch_.size(); }
  // Known tokens not yet computed, over all requests (prefill left plus pending decodes).
  int64_t tokens_in_flight() const;
  uint64_t num_preemptions() const { return num_preemptions_; }
  // Block tables of every request, for BlockManager::CheckConsistency.
  std::vector<std::span<const int32_t>> BlockTables() const;

 private:
  std::deque<Request*>& QueueOf(const Request& r) {
    return r.priority == RequestPriority::kBatch ? waiting_batch_ : waiting_interactive_;
  }
  // The request to preempt so that a request growing in `pool` gets blocks; nullptr if none.
  Request* PickVictim(uint64_t step, int64_t pool) const;
  void Preempt(Request* victim);
  // Tries to admit the front of `queue`; false when it does not fit this step. With no budget left
  // it joins the running batch without a chunk this step.
  bool Admit(std::deque<Request*>& queue, StepPlan& plan, int64_t& budget);
  void FormStaticBatch(StepPlan& plan, int64_t& budget);

  SchedulerOptions options_;
  BlockManager& blocks_;
  std::unordered_map<uint64_t, std::unique_ptr<Request>> requests_;
  std::vector<Request*> running_;  // in admission order
  std::deque<Request*> waiting_interactive_;
  std::deque<Request*> waiting_batch_;
  uint64_t step_ = 0;
  uint64_t admissions_ = 0;
  uint64_t num_preemptions_ = 0;
};

}  // namespace cohort
