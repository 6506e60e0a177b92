#pragma once

namespace cohort::tools {

// Each returns the process exit code: 0 on success, 1 on a runtime error, 2 on bad usage.
int RunGenerate(int argc, char** argv);
int RunTokenize(int argc, char** argv);
int RunDetokenize(int argc, char** argv);

}  // namespace cohort::tools
