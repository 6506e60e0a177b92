// Drives an Engine by hand the way the worker's loop would, for engine tests: sequences join at
// given steps, prefill advances in chunks, prefilling and decoding sequences share steps.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include "tests/testing/fixtures.h"
#include "worker/model/engine.h"

namespace cohort::testing {

struct Run {
  std::vector<int32_t> generated;
  std::vector<std::vector<float>> logits;  // one row per generated token
};

// One sequence being generated inside a hand-driven batch loop.
struct Sequence {
  std::vector<int32_t> tokens;
  size_t prompt_len = 0;
  int64_t computed = 0;
  std::vector<int32_t> block_table;
  size_t to_generate = 0;
  // When set, these tokens are fed back instead of the argmax (teacher forcing), so every step's
  // logits can be compared with a reference even where the argmax would differ.
  std::optional<std::vector<int32_t>> forced;
  Run run;
  bool done() const { return run.generated.size() == to_generate; }
};

// Runs `seqs` to completion on `engine`. Sequence i joins the batch at step join_step[i]; prefill
// advances by at most `chunk` tokens per step. Fails the current test on an engine error.
void Generate(Engine& engine, std::vector<Sequence>& seqs, int64_t chunk, const std::vector<int>& join_step);

// One Sequence per fixture case; with `teacher_forced`, fed the reference's tokens.
std::vector<Sequence> SequencesFor(const Fixture& fixture, bool teacher_forced = false);

int32_t Argmax(const std::vector<float>& row);

}  // namespace cohort::testing
