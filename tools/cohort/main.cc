// `cohort`: the command-line tool. Subcommands are small programs over the same libraries the
// worker uses.
#include <cstdio>
#include <cstring>
#include <string_view>

#include "tools/cohort/commands.h"

namespace {

constexpr const char* kUsage =
    "usage: cohort <command> [flags]\n"
    "\n"
    "commands:\n"
    "  generate     generate tokens from a checkpoint folder on one device\n"
    "  tokenize     text to token ids with a tokenizer.json (JSON lines on stdin)\n"
    "  detokenize   token ids to text with a tokenizer.json (JSON lines on stdin)\n"
    "  bench        benchmarks: `cohort bench serve` drives a running router or worker with load\n"
    "\n"
    "Run `cohort <command> --help` for the command's flags.\n";

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || std::string_view(argv[1]) == "--help" || std::string_view(argv[1]) == "-h") {
    std::fputs(kUsage, argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  const std::string_view command = argv[1];
  if (command == "generate") return cohort::tools::RunGenerate(argc - 1, argv + 1);
  if (command == "tokenize") return cohort::tools::RunTokenize(argc - 1, argv + 1);
  if (command == "detokenize") return cohort::tools::RunDetokenize(argc - 1, argv + 1);
  if (command == "bench") return cohort::tools::RunBench(argc - 1, argv + 1);
  std::fprintf(stderr, "cohort: unknown command '%s'\n\n%s", argv[1], kUsage);
  return 2;
}
