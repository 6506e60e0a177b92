#include "common/flags.h"

#include <optional>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace cohort {
namespace {

absl::Status BadValue(const std::string& name, const std::string& value, const char* type) {
  return absl::InvalidArgumentError(absl::StrCat("--", name, ": '", value, "' is not ", type));
}

}  // namespace

FlagSet::FlagSet(std::string program, std::string description)
    : program_(std::move(program)), description_(std::move(description)) {}

void FlagSet::AddFlag(Flag flag) { flags_.push_back(std::move(flag)); }

void FlagSet::Add(const std::string& name, std::string* value, const std::string& help, bool required) {
  AddFlag({name, help, value->empty() ? "" : absl::StrCat("\"", *value, "\""), "string", required, false,
           false, [value](const std::string& v) {
             *value = v;
             return absl::OkStatus();
           }});
}

void FlagSet::Add(const std::string& name, int* value, const std::string& help, bool required) {
  AddFlag({name, help, absl::StrCat(*value), "int", required, false, false,
           [value, name](const std::string& v) {
             if (!absl::SimpleAtoi(v, value)) return BadValue(name, v, "an integer");
             return absl::OkStatus();
           }});
}

void FlagSet::Add(const std::string& name, int64_t* value, const std::string& help, bool required) {
  AddFlag({name, help, absl::StrCat(*value), "int", required, false, false,
           [value, name](const std::string& v) {
             if (!absl::SimpleAtoi(v, value)) return BadValue(name, v, "an integer");
             return absl::OkStatus();
           }});
}

void FlagSet::Add(const std::string& name, double* value, const std::string& help, bool required) {
  AddFlag({name, help, absl::StrCat(*value), "number", required, false, false,
           [value, name](const std::string& v) {
             if (!absl::SimpleAtod(v, value)) return BadValue(name, v, "a number");
             return absl::OkStatus();
           }});
}

void FlagSet::Add(const std::string& name, bool* value, const std::string& help) {
  AddFlag({name, help, *value ? "true" : "false", "bool", false, true, false,
           [value, name](const std::string& v) {
             if (!absl::SimpleAtob(v, value)) return BadValue(name, v, "true or false");
             return absl::OkStatus();
           }});
}

FlagSet::Flag* FlagSet::Find(const std::string& name) {
  for (auto& f : flags_) {
    if (f.name == name) return &f;
  }
  return nullptr;
}

bool FlagSet::IsSet(const std::string& name) const {
  for (const auto& f : flags_) {
    if (f.name == name) return f.set;
  }
  return false;
}

absl::Status FlagSet::Parse(int argc, const char* const* argv) {
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") return absl::CancelledError("help");
    if (arg == "--") {
      for (++i; i < argc; ++i) positional_.emplace_back(argv[i]);
      break;
    }
    if (arg.rfind("--", 0) != 0) {
      positional_.push_back(arg);
      continue;
    }
    std::string name = arg.substr(2);
    std::optional<std::string> value;
    if (auto eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
    }
    Flag* flag = Find(name);
    if (flag == nullptr && !value && name.rfind("no-", 0) == 0) {
      Flag* negated = Find(name.substr(3));
      if (negated != nullptr && negated->is_bool) {
        negated->set = true;
        if (auto st = negated->assign("false"); !st.ok()) return st;
        continue;
      }
    }
    if (flag == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("unknown flag --", name, " (see ", program_, " --help)"));
    }
    if (!value) {
      if (flag->is_bool) {
        value = "true";
      } else if (i + 1 < argc) {
        value = argv[++i];
      } else {
        return absl::InvalidArgumentError(absl::StrCat("--", name, " needs a value"));
      }
    }
    if (auto st = flag->assign(*value); !st.ok()) return st;
    flag->set = true;
  }
  for (const auto& f : flags_) {
    if (f.required && !f.set) {
      return absl::InvalidArgumentError(absl::StrCat("--", f.name, " is required (see ", program_, " --help)"));
    }
  }
  return absl::OkStatus();
}

std::string FlagSet::Usage() const {
  std::string out = absl::StrCat("usage: ", program_, " [flags]\n\n", description_, "\n\nflags:\n");
  for (const auto& f : flags_) {
    std::string left = absl::StrCat("  --", f.name, f.is_bool ? "" : absl::StrCat(" ", f.type));
    std::string right = f.help;
    if (f.required) {
      right += " (required)";
    } else if (!f.default_text.empty()) {
      absl::StrAppend(&right, " (default ", f.default_text, ")");
    }
    absl::StrAppendFormat(&out, "%-28s %s\n", left, right);
  }
  return out;
}

}  // namespace cohort
