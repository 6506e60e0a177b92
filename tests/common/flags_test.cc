#include "common/flags.h"

#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace cohort {
namespace {

// Succeeds when `text` contains every one of `parts`.
::testing::AssertionResult Contains(const std::string& text, std::initializer_list<std::string> parts) {
  for (const std::string& part : parts) {
    if (text.find(part) == std::string::npos) {
      return ::testing::AssertionFailure() << "\"" << text << "\" does not contain \"" << part << "\"";
    }
  }
  return ::testing::AssertionSuccess();
}

std::string Message(const absl::Status& status) { return std::string(status.message()); }

// A program with one flag of every type, as a subcommand would declare them.
struct TestFlags {
  FlagSet flags{"cohort generate", "Generates tokens from a checkpoint on one device."};
  std::string model;
  std::string device = "cpu";
  int max_tokens = 16;
  int64_t seed = 7;
  double temperature = 0.5;
  bool verbose = false;
  bool cache = true;

  explicit TestFlags(bool model_required = false) {
    flags.Add("model", &model, "checkpoint folder", model_required);
    flags.Add("device", &device, "where to run");
    flags.Add("max-tokens", &max_tokens, "tokens to generate");
    flags.Add("seed", &seed, "sampling seed");
    flags.Add("temperature", &temperature, "sampling temperature");
    flags.Add("verbose", &verbose, "log every step");
    flags.Add("cache", &cache, "use the prefix cache");
  }

  absl::Status Parse(std::vector<const char*> args) {
    args.insert(args.begin(), "cohort");
    return flags.Parse(static_cast<int>(args.size()), args.data());
  }
};

TEST(FlagSetTest, NameEqualsValue) {
  TestFlags f;
  ASSERT_TRUE(f.Parse({"--model=/ckpt", "--max-tokens=32", "--seed=-3", "--temperature=0.25"}).ok());
  EXPECT_EQ(f.model, "/ckpt");
  EXPECT_EQ(f.max_tokens, 32);
  EXPECT_EQ(f.seed, -3);
  EXPECT_DOUBLE_EQ(f.temperature, 0.25);
  EXPECT_TRUE(f.flags.IsSet("model"));
  EXPECT_FALSE(f.flags.IsSet("device"));
  EXPECT_EQ(f.device, "cpu");  // untouched flags keep their defaults
}

TEST(FlagSetTest, NameSpaceValue) {
  TestFlags f;
  ASSERT_TRUE(f.Parse({"--model", "/ckpt", "--max-tokens", "8", "--seed", "12345678901"}).ok());
  EXPECT_EQ(f.model, "/ckpt");
  EXPECT_EQ(f.max_tokens, 8);
  EXPECT_EQ(f.seed, int64_t{12345678901});
}

TEST(FlagSetTest, ValueMayContainEqualsSign) {
  TestFlags f;
  ASSERT_TRUE(f.Parse({"--model=a=b"}).ok());
  EXPECT_EQ(f.model, "a=b");
}

TEST(FlagSetTest, BareBoolFlagSetsTrueAndNoPrefixSetsFalse) {
  TestFlags f;
  ASSERT_TRUE(f.Parse({"--verbose", "--no-cache"}).ok());
  EXPECT_TRUE(f.verbose);
  EXPECT_FALSE(f.cache);
  EXPECT_TRUE(f.flags.IsSet("verbose"));
  EXPECT_TRUE(f.flags.IsSet("cache"));
}

TEST(FlagSetTest, BoolFlagTakesExplicitValue) {
  TestFlags f;
  ASSERT_TRUE(f.Parse({"--verbose=true", "--cache=false"}).ok());
  EXPECT_TRUE(f.verbose);
  EXPECT_FALSE(f.cache);
}

TEST(FlagSetTest, BareBoolFlagDoesNotSwallowNextArgument) {
  TestFlags f;
  ASSERT_TRUE(f.Parse({"--verbose", "prompt.txt"}).ok());
  EXPECT_TRUE(f.verbose);
  EXPECT_EQ(f.flags.positional(), std::vector<std::string>{"prompt.txt"});
}

TEST(FlagSetTest, BadBoolValueNamesTheFlag) {
  TestFlags f;
  auto st = f.Parse({"--verbose=maybe"});
  EXPECT_TRUE(absl::IsInvalidArgument(st)) << st;
  EXPECT_TRUE(Contains(Message(st), {"--verbose", "maybe"}));
}

TEST(FlagSetTest, BadIntegerNamesTheFlagAndValue) {
  TestFlags f;
  auto st = f.Parse({"--max-tokens=lots"});
  EXPECT_TRUE(absl::IsInvalidArgument(st)) << st;
  EXPECT_TRUE(Contains(Message(st), {"--max-tokens", "lots", "integer"}));

  TestFlags g;
  st = g.Parse({"--seed", "1.5"});
  EXPECT_TRUE(absl::IsInvalidArgument(st)) << st;
  EXPECT_TRUE(Contains(Message(st), {"--seed", "1.5"}));
}

TEST(FlagSetTest, IntegerOverflowIsAnError) {
  TestFlags f;
  auto st = f.Parse({"--max-tokens=99999999999"});
  EXPECT_TRUE(absl::IsInvalidArgument(st)) << st;
  EXPECT_TRUE(Contains(Message(st), {"--max-tokens"}));
}

TEST(FlagSetTest, BadNumberNamesTheFlag) {
  TestFlags f;
  auto st = f.Parse({"--temperature", "hot"});
  EXPECT_TRUE(absl::IsInvalidArgument(st)) << st;
  EXPECT_TRUE(Contains(Message(st), {"--temperature", "hot", "number"}));
}

TEST(FlagSetTest, UnknownFlagIsNamed) {
  TestFlags f;
  auto st = f.Parse({"--model=/ckpt", "--bogus=1"});
  EXPECT_TRUE(absl::IsInvalidArgument(st)) << st;
  EXPECT_TRUE(Contains(Message(st), {"--bogus", "cohort generate --help"}));
}

TEST(FlagSetTest, NoPrefixOnNonBoolFlagIsUnknown) {
  TestFlags f;
  auto st = f.Parse({"--no-model"});
  EXPECT_TRUE(absl::IsInvalidArgument(st)) << st;
  EXPECT_TRUE(Contains(Message(st), {"--no-model"}));
}

TEST(FlagSetTest, MissingValueAtEndIsAnError) {
  TestFlags f;
  auto st = f.Parse({"--max-tokens"});
  EXPECT_TRUE(absl::IsInvalidArgument(st)) << st;
  EXPECT_TRUE(Contains(Message(st), {"--max-tokens", "needs a value"}));
}

TEST(FlagSetTest, MissingRequiredFlagIsNamed) {
  TestFlags f(/*model_required=*/true);
  auto st = f.Parse({"--max-tokens=4"});
  EXPECT_TRUE(absl::IsInvalidArgument(st)) << st;
  EXPECT_TRUE(Contains(Message(st), {"--model", "required"}));

  TestFlags g(/*model_required=*/true);
  EXPECT_TRUE(g.Parse({"--model", "/ckpt"}).ok());
}

TEST(FlagSetTest, HelpIsReportedAsHelp) {
  for (const char* help : {"--help", "-h"}) {
    TestFlags f(/*model_required=*/true);  // --help wins over a missing required flag
    auto st = f.Parse({"--max-tokens=4", help});
    EXPECT_FALSE(st.ok()) << help;
    EXPECT_TRUE(FlagSet::IsHelp(st)) << help << ": " << st;
  }
  EXPECT_FALSE(FlagSet::IsHelp(absl::OkStatus()));
  EXPECT_FALSE(FlagSet::IsHelp(absl::InvalidArgumentError("--x is required")));
  TestFlags f;
  EXPECT_FALSE(FlagSet::IsHelp(f.Parse({"--bogus"})));
}

TEST(FlagSetTest, UsageListsFlagsWithHelpAndDefaults) {
  TestFlags f(/*model_required=*/true);
  const std::string usage = f.flags.Usage();
  EXPECT_TRUE(Contains(usage, {"cohort generate", "Generates tokens from a checkpoint on one device."}));
  EXPECT_TRUE(Contains(usage, {"--model string", "checkpoint folder (required)"}));
  EXPECT_TRUE(Contains(usage, {"--device string", "where to run (default \"cpu\")"}));
  EXPECT_TRUE(Contains(usage, {"--max-tokens int", "tokens to generate (default 16)"}));
  EXPECT_TRUE(Contains(usage, {"--seed int", "sampling seed (default 7)"}));
  EXPECT_TRUE(Contains(usage, {"--temperature number", "sampling temperature (default 0.5)"}));
  EXPECT_TRUE(Contains(usage, {"--verbose", "log every step (default false)"}));
  EXPECT_TRUE(Contains(usage, {"use the prefix cache (default true)"}));
  EXPECT_EQ(usage.find("--verbose bool"), std::string::npos);  // booleans take no value
  // Flags appear in the order they were declared.
  EXPECT_LT(usage.find("--model"), usage.find("--device"));
  EXPECT_LT(usage.find("--device"), usage.find("--cache"));
}

TEST(FlagSetTest, PositionalArgumentsAreCollected) {
  TestFlags f;
  ASSERT_TRUE(f.Parse({"first", "--model=/ckpt", "second", "--", "--verbose", "-x"}).ok());
  EXPECT_EQ(f.flags.positional(), (std::vector<std::string>{"first", "second", "--verbose", "-x"}));
  EXPECT_FALSE(f.verbose);  // after "--" nothing is a flag
  EXPECT_EQ(f.model, "/ckpt");
}

}  // namespace
}  // namespace cohort
