// Where tests find the source tree (fixtures) and the built binaries, and scratch directories
// that clean up after themselves.
#pragma once

#include <string>

namespace cohort::testing {

std::string SourcePath(const std::string& relative);  // e.g. "tests/fixtures/models/v3_plain"
std::string BinaryPath(const std::string& name);      // e.g. "cohort" -> build/bin/cohort

// A fresh directory under $TMPDIR, removed with everything in it when the object goes away.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string Join(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

}  // namespace cohort::testing
