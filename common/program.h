// The shape every Cohort command line shares, in one place:
//
//   int main(int argc, char** argv) {
//     FlagSet flags("cohort-worker", "...");
//     ... flags.Add(...)
//     return RunProgram(flags, argc, argv, log_level, [&] { return Serve(f); });
//   }
#pragma once

#include <functional>
#include <string>

#include "absl/status/status.h"
#include "common/flags.h"

namespace cohort {

// Parses the flags (--help prints the usage and returns 0; a bad flag prints one line and returns
// 2), sets the log level from `log_level` (a flag's variable, read after parsing), then runs `body`.
// A failed body prints one line "<program>: <message>" and returns 2 for InvalidArgument, else 1.
int RunProgram(FlagSet& flags, int argc, const char* const* argv, const std::string& log_level,
               const std::function<absl::Status()>& body);

}  // namespace cohort
