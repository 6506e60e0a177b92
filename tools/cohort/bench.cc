// `cohort bench <mode>`: benchmarks. Each mode is a program of its own with its own flags.
#include <cstdio>
#include <string_view>

#include "tools/cohort/commands.h"

namespace cohort::tools {
namespace {

constexpr const char* kBenchUsage =
    "usage: cohort bench <mode> [flags]\n"
    "\n"
    "modes:\n"
    "  serve        load generator for a running router or worker: latency and throughput under load\n"
    "\n"
    "Run `cohort bench <mode> --help` for the mode's flags.\n";

}  // namespace

int RunBench(int argc, char** argv) {
  if (argc < 2 || std::string_view(argv[1]) == "--help" || std::string_view(argv[1]) == "-h") {
    std::fputs(kBenchUsage, argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  const std::string_view mode = argv[1];
  if (mode == "serve") return RunBenchServe(argc - 1, argv + 1);
  if (mode == "step") return RunBenchStep(argc - 1, argv + 1);
  std::fprintf(stderr, "cohort bench: unknown mode '%s'\n\n%s", argv[1], kBenchUsage);
  return 2;
}

}  // namespace cohort::tools
