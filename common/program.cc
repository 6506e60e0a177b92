#include "common/program.h"

#include <cstdio>

#include "common/logging.h"

namespace cohort {

int RunProgram(FlagSet& flags, int argc, const char* const* argv, const std::string& log_level,
               const std::function<absl::Status()>& body) {
  auto fail = [&](const absl::Status& status, int code) {
    std::fprintf(stderr, "%s: %s\n", flags.program().c_str(), std::string(status.message()).c_str());
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
