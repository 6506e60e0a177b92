#include "tests/testing/paths.h"

#include <cstdlib>
#include <filesystem>

#include "common/status.h"

namespace cohort::testing {

namespace {

// The build's directories, unless the environment moves them (scripts/gpu_tests.sh runs the tests
// on another machine, from a copy of the tree and bundled binaries).
std::string Dir(const char* env, const char* built_in) {
  const char* moved = std::getenv(env);
  return moved != nullptr && *moved != '\0' ? moved : built_in;
}

}  // namespace

std::string SourcePath(const std::string& relative) { return Dir("COHORT_SOURCE_DIR", COHORT_SOURCE_DIR) + "/" + relative; }
std::string BinaryPath(const std::string& name) { return Dir("COHORT_BINARY_DIR", COHORT_BINARY_DIR) + "/" + name; }

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
