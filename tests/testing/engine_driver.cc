#include "tests/testing/engine_driver.h"

#include <algorithm>

#include "gtest/gtest.h"
#include "worker/kv/block_manager.h"

namespace cohort::testing {

int32_t Argmax(const std::vector<float>& row) {
  return static_cast<int32_t>(std::max_element(row.begin(), row.end()) - row.begin());
}

void Generate(Engine& engine, std::vector<Sequence>& seqs, int64_t chunk, const std::vector<int>& join_step) {
  const int64_t vocab = engine.config().vocab_size;
  const int64_t block_size = engine.kv_geometry().block_size_tokens;
  BlockManager blocks({.num_blocks = engine.kv_geometry().num_blocks,
                       .block_size = block_size,
                       .prefix_caching = false,
                       .num_pools = engine.kv_geometry().num_pools});
  for (int step = 0; !std::all_of(seqs.begin(), seqs.end(), [](const Sequence& s) { return s.done(); }); ++step) {
    std::vector<SequenceStep> batch;
    std::vector<Sequence*> in_batch;
    for (size_t i = 0; i < seqs.size(); ++i) {
      Sequence& s = seqs[i];
      if (s.done() || step < join_step[i]) continue;
      const int64_t n = std::min<int64_t>(chunk, static_cast<int64_t>(s.tokens.size()) - s.computed);
      ASSERT_TRUE(blocks.Grow(s.block_table, BlocksForTokens(s.computed + n, block_size)));
      batch.push_back({{s.tokens.data() + s.computed, static_cast<size_t>(n)}, s.computed, s.block_table,
                       s.computed + n == static_cast<int64_t>(s.tokens.size())});
      in_batch.push_back(&s);
    }
    std::vector<float> logits(batch.size() * vocab);
    const absl::Status status = engine.Forward(batch, logits);
    ASSERT_TRUE(status.ok()) << status;
    size_t row = 0;
    for (size_t b = 0; b < batch.size(); ++b) {
      Sequence& s = *in_batch[b];
      s.computed += static_cast<int64_t>(batch[b].tokens.size());
      if (!batch[b].compute_logits) continue;
      std::vector<float> r(logits.begin() + row * vocab, logits.begin() + (row + 1) * vocab);
      ++row;
      s.run.generated.push_back(Argmax(r));
      s.run.logits.push_back(std::move(r));
      s.tokens.push_back(s.forced ? (*s.forced)[s.run.generated.size() - 1] : s.run.generated.back());
      if (s.done()) blocks.Release(s.block_table);
    }
  }
}

std::vector<Sequence> SequencesFor(const Fixture& f, bool teacher_forced) {
  std::vector<Sequence> seqs;
  for (const auto& c : f.cases) {
    Sequence s;
    s.tokens = c.prompt;
    s.prompt_len = c.prompt.size();
    s.to_generate = c.generated.size();
    if (teacher_forced) s.forced = c.generated;
    seqs.push_back(std::move(s));
  }
  return seqs;
}

}  // namespace cohort::testing
