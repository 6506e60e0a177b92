// Assertions on absl::Status for tests.
#pragma once

#include <initializer_list>
#include <string>

#include "absl/status/status.h"
#include "gtest/gtest.h"

namespace cohort::testing {

// Succeeds when the status message contains every one of `parts`:
//   EXPECT_TRUE(MessageHas(status, {"config.json", "'hidden_size'"}));
inline ::testing::AssertionResult MessageHas(const absl::Status& status, std::initializer_list<std::string> parts) {
  const std::string message(status.message());
  for (const std::string& part : parts) {
    if (message.find(part) == std::string::npos) {
      return ::testing::AssertionFailure() << "\"" << message << "\" does not contain \"" << part << "\"";
    }
  }
  return ::testing::AssertionSuccess();
}

}  // namespace cohort::testing
