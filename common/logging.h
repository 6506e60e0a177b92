// Logging for binaries (spdlog). Library code does not log errors: it returns absl::Status.
#pragma once

#include <string>

#include "absl/status/status.h"
#include "spdlog/spdlog.h"

namespace cohort {

// Sets the process-wide level from a name: trace, debug, info, warn, error, off.
absl::Status InitLogging(const std::string& level);

}  // namespace cohort
