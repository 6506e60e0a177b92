#include "tests/testing/paths.h"

#include <cstdlib>
#include <filesystem>

#include "common/status.h"

namespace cohort::testing {

std::string SourcePath(const std::string& relative) { return std::string(COHORT_SOURCE_DIR) + "/" + relative; }
std::string BinaryPath(const std::string& name) { return std::string(COHORT_BINARY_DIR) + "/" + name; }

TempDir::TempDir() {
  const char* tmp = std::getenv("TMPDIR");
  std::string pattern = std::string(tmp != nullptr ? tmp : "/tmp") + "/cohort_test_XXXXXX";
  COHORT_CHECK(mkdtemp(pattern.data()) != nullptr, "mkdtemp ", pattern);
  path_ = pattern;
}

TempDir::~TempDir() {
  std::error_code ignored;
  std::filesystem::remove_all(path_, ignored);
}

}  // namespace cohort::testing
