// A small typed command-line parser: each program or subcommand declares its flags with help text,
// and gets `--help` and one-line errors for free.
//
//   FlagSet flags("cohort generate", "Generates tokens from a checkpoint on one device.");
//   std::string model;
//   int max_tokens = 16;
//   flags.Add("model", &model, "checkpoint folder (config.json + safetensors)", /*required=*/true);
//   flags.Add("max-tokens", &max_tokens, "tokens to generate");
//   if (auto st = flags.Parse(argc, argv); !st.ok()) ...  // kHelp: print flags.Usage()
//
// Accepted forms: --name=value, --name value, and --name / --no-name for booleans.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace cohort {

class FlagSet {
 public:
  FlagSet(std::string program, std::string description);

  void Add(const std::string& name, std::string* value, const std::string& help, bool required = false);
  void Add(const std::string& name, int* value, const std::string& help, bool required = false);
  void Add(const std::string& name, int64_t* value, const std::string& help, bool required = false);
  void Add(const std::string& name, double* value, const std::string& help, bool required = false);
  void Add(const std::string& name, bool* value, const std::string& help);

  // Parses argv[1..argc). Returns a Cancelled status when --help was given (print Usage() and exit
  // 0), InvalidArgument naming the flag otherwise.
  absl::Status Parse(int argc, const char* const* argv);
  bool IsSet(const std::string& name) const;
  // Positional arguments left after the flags.
  const std::vector<std::string>& positional() const { return positional_; }
  std::string Usage() const;
  const std::string& program() const { return program_; }

  static bool IsHelp(const absl::Status& status) { return absl::IsCancelled(status); }

 private:
  struct Flag {
    std::string name;
    std::string help;
    std::string default_text;
    std::string type;
    bool required = false;
    bool is_bool = false;
    bool set = false;
    std::function<absl::Status(const std::string&)> assign;
  };
  Flag* Find(const std::string& name);
  void AddFlag(Flag flag);

  std::string program_;
  std::string description_;
  std::vector<Flag> flags_;
  std::vector<std::string> positional_;
};

}  // namespace cohort
