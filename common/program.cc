#include "common/program.h"

#include <cstdio>

#include "common/logging.h"

namespace cohort {

int RunProgram(FlagSet& flags, int argc, const char* const* argv, const std::string& log_level,
               const std::function<absl::Status()>& body) {
  auto fail = [&](const absl::Status& status, int code) {
    // The message alone, as every error of ours names its cause; the code where it says nothing.
    const std::string text = status.message().empty() ? status.ToString() : std::string(status.message());
    std::fprintf(stderr, "%s: %s\n", flags.program().c_str(), text.c_str());
    return code;
  };
  if (absl::Status st = flags.Parse(argc, argv); !st.ok()) {
    if (FlagSet::IsHelp(st)) {
      std::fputs(flags.Usage().c_str(), stdout);
      return 0;
    }
    return fail(st, 2);
  }
  if (absl::Status st = InitLogging(log_level); !st.ok()) return fail(st, 2);
  if (absl::Status st = body(); !st.ok()) return fail(st, absl::IsInvalidArgument(st) ? 2 : 1);
  return 0;
}

}  // namespace cohort
