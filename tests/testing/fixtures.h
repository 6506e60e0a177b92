// The committed fixture checkpoints and what transformers computed for them
// (tests/fixtures/make_fixtures.py).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace cohort::testing {

struct FixtureCase {
  std::vector<int32_t> prompt;
  std::vector<int32_t> generated;  // greedy, float32, no early stop at EOS
};

struct Fixture {
  std::string name;
  std::string model_dir;
  int64_t vocab_size = 0;
  std::vector<FixtureCase> cases;
  // Logits that chose each generated token: cases in order, one row of vocab_size per token.
  std::vector<float> logits;

  const float* LogitsRow(size_t case_index, size_t step) const;
};

// Names of every committed fixture.
std::vector<std::string> FixtureNames();
Fixture LoadFixture(const std::string& name);

}  // namespace cohort::testing
