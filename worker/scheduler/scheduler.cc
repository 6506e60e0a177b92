#include "worker/scheduler/scheduler.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/block_hash.h"
#include "common/status.h"

namespace cohort {

Scheduler::Scheduler(const SchedulerOptions& options, BlockManager& blocks) : options_(options), blocks_(blocks) {
  COHORT_CHECK(options.max_batch_tokens > 0 && options.max_running > 0, "budget ", options.max_batch_tokens,
               " running ", options.max_running);
}

absl::Status Scheduler::Add(std::unique_ptr<Request> request) {
  const int64_t total = request->prompt_len + request->max_tokens;
  const int64_t blocks_needed = BlocksForTokens(total, blocks_.block_size());
  // A request's blocks all come from one pool, so one pool is the most it can ever have.
  if (blocks_needed > blocks_.pool_size()) {
    return absl::InvalidArgumentError(absl::StrCat("the prompt (", request->prompt_len, " tokens) plus max_tokens (",
                                                   request->max_tokens, ") needs ", total,
                                                   " tokens of KV cache; this worker holds ",
                                                   blocks_.DescribeRequestCapacity()));
  }
  COHORT_CHECK(requests_.count(request->id) == 0, "duplicate request id ", request->id);
  request->state = RequestState::kWaiting;
  Request* r = request.get();
  requests_.emplace(r->id, std::move(request));
  QueueOf(*r).push_back(r);
  return absl::OkStatus();
}

Request* Scheduler::Find(uint64_t id) const {
  auto it = requests_.find(id);
  return it == requests_.end() ? nullptr : it->second.get();
}

Request* Scheduler::PickVictim(uint64_t step, int64_t pool) const {
  for (RequestPriority priority : {RequestPriority::kBatch, RequestPriority::kInteractive}) {
    for (auto it = running_.rbegin(); it != running_.rend(); ++it) {
      const Request& r = **it;
      // Blocks of another pool are no use to the request that needs room. A request holding no
      // blocks (admitted without tokens) stays a candidate, as it is with one pool.
      const bool in_pool = r.block_table.empty() || blocks_.PoolOf(r.block_table[0]) == pool;
      if (r.priority == priority && r.scheduled_in_step != step && in_pool) return *it;
    }
  }
  return nullptr;
}

void Scheduler::Preempt(Request* victim) {
  blocks_.Release(victim->block_table);
  victim->computed = 0;
  victim->cached_blocks = 0;
  victim->state = RequestState::kWaiting;
  ++victim->preemptions;
  ++num_preemptions_;
  running_.erase(std::find(running_.begin(), running_.end(), victim));
  QueueOf(*victim).push_front(victim);  // first in line to be recomputed
}

bool Scheduler::Admit(std::deque<Request*>& queue, StepPlan& plan, int64_t& budget) {
  Request* r = queue.front();
  const int64_t block_size = blocks_.block_size();
  // Reuse cached blocks of the known tokens, leaving at least one token to compute for the logits.
  ExtendBlockHashes({r->tokens.data(), r->tokens.size()}, block_size, r->block_hashes);
  const int64_t max_cached = (static_cast<int64_t>(r->tokens.size()) - 1) / block_size;
  const int64_t matched = blocks_.AcquirePrefix(r->block_hashes, max_cached, r->block_table);
  r->computed = matched * block_size;
  r->cached_blocks = matched;

  const int64_t n = std::min(r->uncomputed(), budget);
  if (!blocks_.Grow(r->block_table, BlocksForTokens(r->computed + n, block_size))) {
    blocks_.Release(r->block_table);
    r->computed = r->cached_blocks = 0;
    return false;
  }
  if (!r->admitted_before) {
    r->cached_prompt_tokens = std::min(r->computed, r->prompt_len);
    r->admitted_before = true;
  }
  queue.pop_front();
  r->state = RequestState::kRunning;
  r->admission_order = ++admissions_;
  running_.push_back(r);
  if (n == 0) return true;
  r->scheduled_in_step = plan.step;
  plan.chunks.push_back({r, n, r->computed + n == static_cast<int64_t>(r->tokens.size())});
  plan.num_tokens += n;
  budget -= n;
  return true;
}

void Scheduler::FormStaticBatch(StepPlan& plan, int64_t& budget) {
  // Nothing is running, so nothing holds blocks: the batch may promise all the available ones.
  const int64_t available = blocks_.num_available();
  int64_t promised = 0;
  for (auto* queue : {&waiting_interactive_, &waiting_batch_}) {
    while (!queue->empty() && static_cast<int64_t>(running_.size()) < options_.max_running) {
      const Request& r = *queue->front();
      const int64_t whole = BlocksForTokens(r.prompt_len + r.max_tokens, blocks_.block_size());
      if (promised + whole > available) return;
      if (!Admit(*queue, plan, budget)) return;
      promised += whole;
    }
  }
}

StepPlan Scheduler::Schedule() {
  StepPlan plan;
  plan.step = ++step_;
  int64_t budget = options_.max_batch_tokens;
  const int64_t block_size = blocks_.block_size();

  std::vector<Request*> order = running_;
  std::sort(order.begin(), order.end(), [](const Request* a, const Request* b) {
    if (a->uncomputed() != b->uncomputed()) return a->uncomputed() < b->uncomputed();
    return a->admission_order < b->admission_order;
  });
  for (Request* r : order) {
    if (budget == 0) break;
    if (r->state != RequestState::kRunning) continue;  // preempted earlier in this step
    const int64_t n = std::min(r->uncomputed(), budget);
    const int64_t blocks_needed = BlocksForTokens(r->computed + n, block_size);
    bool preempted_self = false;
    while (!blocks_.Grow(r->block_table, blocks_needed)) {
      Request* victim = PickVictim(plan.step, blocks_.PoolForGrowth(r->block_table));
      COHORT_CHECK(victim != nullptr, "no request to preempt");
      Preempt(victim);
      plan.preempted.push_back(victim);
      if (victim == r) {
        preempted_self = true;
        break;
      }
    }
    if (preempted_self) continue;
    r->scheduled_in_step = plan.step;
    plan.chunks.push_back({r, n, r->computed + n == static_cast<int64_t>(r->tokens.size())});
    plan.num_tokens += n;
    budget -= n;
  }

  // New work joins only in steps where the running batch fit without preemption; under static
  // batching, only once the whole batch has finished.
  if (options_.batching == BatchingPolicy::kStatic) {
    if (running_.empty()) FormStaticBatch(plan, budget);
  } else if (plan.preempted.empty()) {
    for (auto* queue : {&waiting_interactive_, &waiting_batch_}) {
      while (!queue->empty() && budget > 0 && static_cast<int64_t>(running_.size()) < options_.max_running) {
        if (!Admit(*queue, plan, budget)) break;
      }
      if (!waiting_interactive_.empty()) break;  // batch requests wait while interactive ones do
    }
  }
  return plan;
}

void Scheduler::OnStepDone(const StepPlan& plan) {
  const int64_t block_size = blocks_.block_size();
  for (const ScheduledChunk& chunk : plan.chunks) {
    Request* r = chunk.request;
    r->computed += chunk.num_tokens;
    const int64_t full_blocks = r->computed / block_size;
    if (full_blocks > r->cached_blocks) {
      ExtendBlockHashes({r->tokens.data(), static_cast<size_t>(r->computed)}, block_size, r->block_hashes);
      blocks_.CacheBlocks(r->block_table, r->block_hashes, r->cached_blocks, full_blocks);
      r->cached_blocks = full_blocks;
    }
  }
}

std::unique_ptr<Request> Scheduler::Remove(uint64_t id) {
  auto it = requests_.find(id);
  if (it == requests_.end()) return nullptr;
  std::unique_ptr<Request> r = std::move(it->second);
  requests_.erase(it);
  if (r->state == RequestState::kRunning) {
    running_.erase(std::find(running_.begin(), running_.end(), r.get()));
  } else if (r->state == RequestState::kWaiting) {
    auto& queue = QueueOf(*r);
    queue.erase(std::find(queue.begin(), queue.end(), r.get()));
  }
  blocks_.Release(r->block_table);
  r->state = RequestState::kFinished;
  return r;
}

int64_t Scheduler::tokens_in_flight() const {
  int64_t total = 0;
  for (const auto& [id, r] : requests_) total += r->uncomputed();
  return total;
}

std::vector<std::span<const int32_t>> Scheduler::BlockTables() const {
  std::vector<std::span<const int32_t>> tables;
  for (const auto& [id, r] : requests_) tables.emplace_back(r->block_table);
  return tables;
}

}  // namespace cohort
