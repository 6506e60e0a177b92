// Runs a real program to completion and captures what it printed.
#pragma once

#include <string>
#include <vector>

namespace cohort::testing {

struct ProcessResult {
  int exit_code = -1;  // -1 when killed by a signal or the timeout
  std::string out;
  std::string err;
};

// Runs `argv` (argv[0] is the program path) with stdin closed; kills it after `timeout_s`.
ProcessResult RunProcess(const std::vector<std::string>& argv, int timeout_s = 60);

}  // namespace cohort::testing
