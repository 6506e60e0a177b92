#include "tests/testing/fixtures.h"

#include <cstring>

#include "common/status.h"
#include "nlohmann/json.hpp"
#include "tests/testing/paths.h"
#include "tests/testing/safetensors_writer.h"

namespace cohort::testing {

std::vector<std::string> FixtureNames() {
  return {"v3_qlora_yarn", "v3_plain", "v2_lite_like", "v2_group_limited", "demo"};
}

const float* Fixture::LogitsRow(size_t case_index, size_t step) const {
  size_t row = step;
  for (size_t c = 0; c < case_index; ++c) row += cases[c].generated.size();
  return logits.data() + row * vocab_size;
}

Fixture LoadFixture(const std::string& name) {
  const std::string expected = SourcePath("tests/fixtures/expected/" + name);
  auto meta = nlohmann::json::parse(ReadFile(expected + ".json"));
  Fixture f;
  f.name = name;
  f.model_dir = SourcePath("tests/fixtures/" + meta["model"].get<std::string>());
  f.vocab_size = meta["vocab_size"].get<int64_t>();
  size_t rows = 0;
  for (const auto& c : meta["cases"]) {
    f.cases.push_back({c["prompt_ids"].get<std::vector<int32_t>>(), c["generated_ids"].get<std::vector<int32_t>>()});
    rows += f.cases.back().generated.size();
  }
  const std::string raw = ReadFile(SourcePath("tests/fixtures/expected/" + meta["logits"]["file"].get<std::string>()));
  COHORT_CHECK(raw.size() == rows * f.vocab_size * sizeof(float), name, ": logits file has ", raw.size(), " bytes");
  f.logits.resize(rows * f.vocab_size);
  std::memcpy(f.logits.data(), raw.data(), raw.size());
  return f;
}

}  // namespace cohort::testing
