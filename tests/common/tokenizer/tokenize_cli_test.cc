// `cohort tokenize` and `cohort detokenize` as a user runs them: real processes fed a file on
// stdin, their stdout, stderr and exit codes.
#include <algorithm>
#include <fstream>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/common/tokenizer/tokenizer_test_files.h"
#include "tests/testing/paths.h"
#include "tests/testing/subprocess.h"

namespace cohort {
namespace {

using testing::BinaryPath;
using testing::DemoTokenizerDir;

// Runs `cohort <args...>` with `input` as its stdin (through a file and the shell's `<`).
testing::ProcessResult RunWithInput(const std::vector<std::string>& args, const std::string& input) {
  testing::TempDir dir;
  const std::string input_path = dir.Join("stdin");
  std::ofstream(input_path, std::ios::binary) << input;
  std::vector<std::string> argv = {"/bin/sh", "-c",       "f=$1; shift; exec \"$@\" < \"$f\"",
                                   "sh",      input_path, BinaryPath("cohort")};
  argv.insert(argv.end(), args.begin(), args.end());
  return testing::RunProcess(argv);
}

std::vector<std::string> Lines(const std::string& text) {
  std::vector<std::string> lines;
  size_t start = 0;
  for (size_t end; (end = text.find('\n', start)) != std::string::npos; start = end + 1) {
    lines.push_back(text.substr(start, end - start));
  }
  EXPECT_EQ(start, text.size()) << "output does not end with a newline";
  return lines;
}

TEST(TokenizeCliTest, EncodesEveryReferenceCaseLikeHuggingFace) {
  const auto cases = testing::DemoReferenceCases();
  std::string input;
  for (const auto& c : cases) input += nlohmann::json(c.text).dump() + "\n";
  for (bool special : {true, false}) {
    std::vector<std::string> args = {"tokenize", "--tokenizer", DemoTokenizerDir()};
    if (!special) args.push_back("--no-special");
    const auto r = RunWithInput(args, input);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_EQ(r.err, "");
    const auto lines = Lines(r.out);
    ASSERT_EQ(lines.size(), cases.size());
    for (size_t i = 0; i < cases.size(); ++i) {
      EXPECT_EQ(nlohmann::json::parse(lines[i]).get<std::vector<int32_t>>(),
                special ? cases[i].ids_with_special : cases[i].ids)
          << lines[i];
    }
  }
}

TEST(TokenizeCliTest, DecodesEveryReferenceCaseLikeHuggingFace) {
  const auto cases = testing::DemoReferenceCases();
  std::string input;
  for (const auto& c : cases) input += nlohmann::json(c.ids).dump() + "\n";
  for (bool skip : {false, true}) {
    std::vector<std::string> args = {"detokenize", "--tokenizer", DemoTokenizerDir() + "/tokenizer.json"};
    if (skip) args.push_back("--skip-special");
    const auto r = RunWithInput(args, input);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    const auto lines = Lines(r.out);
    ASSERT_EQ(lines.size(), cases.size());
    for (size_t i = 0; i < cases.size(); ++i) {
      EXPECT_EQ(nlohmann::json::parse(lines[i]).get<std::string>(),
                skip ? cases[i].decoded_skip_special : cases[i].decoded);
    }
  }
}

// One line on stderr naming the input line, exit code 2, and the lines before it answered.
void ExpectBadLine(const testing::ProcessResult& r, int line, const std::string& why, size_t answered) {
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_NE(r.err.find("input line " + std::to_string(line) + ":"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find(why), std::string::npos) << r.err;
  EXPECT_EQ(Lines(r.out).size(), answered) << r.out;
}

TEST(TokenizeCliTest, BadInputLinesAreOneClearError) {
  const std::vector<std::string> tokenize = {"tokenize", "--tokenizer", DemoTokenizerDir()};
  ExpectBadLine(RunWithInput(tokenize, "\"ok\"\nnot json\n\"never read\"\n"), 2, "not valid JSON", 1);
  ExpectBadLine(RunWithInput(tokenize, "\"ok\"\n\"ok\"\n\"a\xFF\"\n"), 3, "UTF-8", 2);  // raw invalid bytes
  ExpectBadLine(RunWithInput(tokenize, "\"\\ud800 lone surrogate\"\n"), 1, "surrogate", 0);
  ExpectBadLine(RunWithInput(tokenize, "[1, 2]\n"), 1, "expected a JSON string", 0);
  ExpectBadLine(RunWithInput(tokenize, "\n"), 1, "not valid JSON", 0);

  const std::vector<std::string> detokenize = {"detokenize", "--tokenizer", DemoTokenizerDir()};
  ExpectBadLine(RunWithInput(detokenize, "[1]\n\"text\"\n"), 2, "expected a JSON array", 1);
  ExpectBadLine(RunWithInput(detokenize, "[1, -3]\n"), 1, "got -3", 0);
  ExpectBadLine(RunWithInput(detokenize, "[1.5]\n"), 1, "got 1.5", 0);
  ExpectBadLine(RunWithInput(detokenize, "[1, 2\n"), 1, "not valid JSON", 0);
}

TEST(TokenizeCliTest, BadFlagsAndFilesExitNonZeroWithOneLine) {
  const auto no_flag = RunWithInput({"tokenize"}, "");
  EXPECT_EQ(no_flag.exit_code, 2);
  EXPECT_NE(no_flag.err.find("--tokenizer"), std::string::npos) << no_flag.err;

  const auto missing = RunWithInput({"detokenize", "--tokenizer", "/nonexistent/model"}, "[1]\n");
  EXPECT_EQ(missing.exit_code, 1);
  EXPECT_EQ(std::count(missing.err.begin(), missing.err.end(), '\n'), 1) << missing.err;
  EXPECT_NE(missing.err.find("/nonexistent/model"), std::string::npos) << missing.err;
  EXPECT_EQ(missing.out, "");

  testing::TempDir dir;
  nlohmann::json json = testing::DemoTokenizerJson();
  json["pre_tokenizer"] = {{"type", "Metaspace"}};
  const auto unsupported = RunWithInput({"tokenize", "--tokenizer", testing::WriteJson(dir, json)}, "\"x\"\n");
  EXPECT_EQ(unsupported.exit_code, 2);
  EXPECT_NE(unsupported.err.find("\"Metaspace\" is not supported"), std::string::npos) << unsupported.err;
}

TEST(TokenizeCliTest, EmptyInputGivesEmptyOutput) {
  const auto r = RunWithInput({"tokenize", "--tokenizer", DemoTokenizerDir()}, "");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "");
  const auto empty_text = RunWithInput({"tokenize", "--tokenizer", DemoTokenizerDir()}, "\"\"\n");
  EXPECT_EQ(empty_text.out, "[0]\n");  // just BOS
}

}  // namespace
}  // namespace cohort
