// `cohort tokenize` and `cohort detokenize`: a tokenizer.json as a line filter. Each input line is
// one JSON value (a string to encode, or an array of ids to decode) and gives one JSON line out,
// so a shell pipeline or another program can drive the tokenizer without linking it.
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/flags.h"
#include "common/program.h"
#include "common/status.h"
#include "common/tokenizer/tokenizer.h"
#include "nlohmann/json.hpp"
#include "tools/cohort/commands.h"

namespace cohort::tools {
namespace {

using Json = nlohmann::json;

const std::string kLogLevel = "warn";  // the filters log nothing but errors, which they print themselves

// Runs `handle` on every stdin line, printing what it returns; the first error stops the run and
// is returned naming the input line.
template <typename Handle>
absl::Status ForEachLine(Handle handle) {
  std::string line;
  for (int64_t number = 1; std::getline(std::cin, line); ++number) {
    absl::StatusOr<std::string> out = handle(line);
    if (!out.ok()) {
      std::fflush(stdout);
      return absl::Status(out.status().code(), absl::StrCat("input line ", number, ": ", out.status().message()));
    }
    std::fwrite(out->data(), 1, out->size(), stdout);
    std::fputc('\n', stdout);
    std::fflush(stdout);  // a caller may wait for each answer before sending the next line
  }
  return absl::OkStatus();
}

// `text` with bytes that would garble a terminal (controls, anything not ASCII) as \xNN.
std::string Printable(std::string_view text) {
  std::string out;
  for (char c : text) {
    const auto b = static_cast<unsigned char>(c);
    if (b >= 0x20 && b < 0x7F) {
      out += c;
    } else {
      constexpr char kHex[] = "0123456789ABCDEF";
      out += {'\\', 'x', kHex[b >> 4], kHex[b & 15]};
    }
  }
  return out;
}

absl::StatusOr<Json> ParseLine(const std::string& line) {
  try {
    return Json::parse(line);
  } catch (const Json::parse_error& e) {
    // what() reads "[json.exception.parse_error.101] parse error at line 1, column 7: <reason>".
    std::string_view reason = e.what();
    if (size_t colon = reason.find(": "); colon != std::string_view::npos) reason.remove_prefix(colon + 2);
    return absl::InvalidArgumentError(absl::StrCat("not valid JSON at byte ", e.byte, ": ", Printable(reason)));
  } catch (const Json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("not valid JSON: ", Printable(e.what())));
  }
}

}  // namespace

int RunTokenize(int argc, char** argv) {
  constexpr const char* kProgram = "cohort tokenize";
  std::string path;
  bool special = true;
  FlagSet flags(kProgram,
                "Reads one JSON string per line on stdin and prints its token ids as a JSON array per line.\n"
                "Special tokens written in the text are matched as tokens.");
  flags.Add("tokenizer", &path, "tokenizer.json, or a model folder holding one", /*required=*/true);
  flags.Add("special", &special, "add the post-processor's special tokens (e.g. BOS); --no-special leaves them out");
  return RunProgram(flags, argc, argv, kLogLevel, [&]() -> absl::Status {
    COHORT_ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> tokenizer, Tokenizer::Load(path));
    return ForEachLine([&](const std::string& line) -> absl::StatusOr<std::string> {
      auto value = ParseLine(line);
      if (!value.ok()) return value.status();
      if (!value->is_string()) return absl::InvalidArgumentError("expected a JSON string");
      auto ids = tokenizer->Encode(value->get_ref<const std::string&>(), special);
      if (!ids.ok()) return ids.status();
      return Json(*ids).dump();
    });
  });
}

int RunDetokenize(int argc, char** argv) {
  constexpr const char* kProgram = "cohort detokenize";
  std::string path;
  bool skip_special = false;
  FlagSet flags(kProgram,
                "Reads one JSON array of token ids per line on stdin and prints its text as a JSON string per line.\n"
                "Ids the vocabulary does not hold are skipped, as Hugging Face tokenizers does.");
  flags.Add("tokenizer", &path, "tokenizer.json, or a model folder holding one", /*required=*/true);
  flags.Add("skip-special", &skip_special, "leave special tokens out of the text");
  return RunProgram(flags, argc, argv, kLogLevel, [&]() -> absl::Status {
    COHORT_ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> tokenizer, Tokenizer::Load(path));
    return ForEachLine([&](const std::string& line) -> absl::StatusOr<std::string> {
      auto value = ParseLine(line);
      if (!value.ok()) return value.status();
      if (!value->is_array()) return absl::InvalidArgumentError("expected a JSON array of token ids");
      std::vector<int32_t> ids;
      ids.reserve(value->size());
      for (const Json& id : *value) {
        if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > INT32_MAX) {
          return absl::InvalidArgumentError(
              absl::StrCat("expected token ids (integers from 0 to 2^31-1), got ", id.dump()));
        }
        ids.push_back(id.get<int32_t>());
      }
      return Json(tokenizer->Decode(ids, skip_special)).dump();
    });
  });
}

}  // namespace cohort::tools
