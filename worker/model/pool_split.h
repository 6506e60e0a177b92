// A step's batch split by KV pool. Under data-parallel attention each pool of KV blocks lives on
// one GPU, which runs the sequences whose blocks are in it (worker/model/cuda/expert_parallel.h);
// the GPUs then meet in collectives that need every GPU to bring the same number of rows.
//
//   PoolSplit split(geometry.num_pools);
//   split.Split(batch, geometry);            // a batch ValidateBatch accepted
//   gpu[p].Step(split.part(p), split.rows(), ...);
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "worker/model/engine.h"

namespace cohort {

class PoolSplit {
 public:
  explicit PoolSplit(int64_t num_pools);

  // Splits `batch`; the parts point into it (the tokens) and into this object (the block tables),
  // and stay valid until the next Split.
  void Split(std::span<const SequenceStep> batch, const KvCacheGeometry& geometry);

  // Pool p's sequences in batch order, their block ids counted from the pool's first block.
  std::span<const SequenceStep> part(int64_t pool) const { return parts_[pool].batch; }
  // Whether every sequence decodes one token and wants its logits (a step for decode graphs).
  bool decode_only() const { return decode_only_; }
  // The rows every pool brings to the collectives: the most sequences of any pool in a decode-only
  // step, else the most tokens.
  int rows() const { return rows_; }
  // Each pool's tokens (its rows past them are padding).
  std::span<const int32_t> tokens() const { return tokens_; }
  // For each sequence that wants logits, in batch order: pool * rows() + its index among its pool's
  // sequences that want logits (where its row is among every pool's rows gathered in pool order).
  std::span<const int32_t> logits_rows() const { return logits_rows_; }

 private:
  struct Part {
    std::vector<std::vector<int32_t>> tables;  // the first tables_used are this step's; the rest kept
    size_t tables_used = 0;
    std::vector<SequenceStep> batch;
  };
  std::vector<Part> parts_;
  std::vector<int64_t> pool_of_;  // Split's pool of each sequence of the batch
  std::vector<int32_t> tokens_;
  std::vector<int32_t> logits_rows_;
  std::vector<int32_t> logits_in_pool_;  // Split's count per pool
  bool decode_only_ = true;
  int rows_ = 0;
};

}  // namespace cohort
