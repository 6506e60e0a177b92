#pragma once

namespace cohort::tools {

// Each returns the process exit code: 0 on success, 1 on a runtime error, 2 on bad usage.
int RunGenerate(int argc, char** argv);
int RunTokenize(int argc, char** argv);
int RunDetokenize(int argc, char** argv);
// `cohort bench <mode>`: argv[0] is "bench", argv[1] the mode.
int RunBench(int argc, char** argv);
int RunBenchServe(int argc, char** argv);
int RunBenchStep(int argc, char** argv);

}  // namespace cohort::tools
