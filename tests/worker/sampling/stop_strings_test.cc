#include "worker/sampling/stop_strings.h"

#include "gtest/gtest.h"

namespace cohort {
namespace {

// Feeds `pieces` and returns everything sent, and whether a stop string ended it.
std::pair<std::string, bool> StreamThrough(std::vector<std::string> stops, const std::vector<std::string>& pieces) {
  StopStringMatcher m(std::move(stops));
  std::string sent;
  for (const std::string& p : pieces) {
    auto r = m.Push(p);
    sent += r.text;
    if (r.stopped) return {sent, true};
  }
  return {sent + m.Flush(), false};
}

TEST(StopStringMatcherTest, TextBeforeTheStopIsSentAndNothingAfter) {
  EXPECT_EQ(StreamThrough({"END"}, {"hello ", "wor", "ld END and more"}), std::make_pair(std::string("hello world "), true));
}

TEST(StopStringMatcherTest, StopSplitAcrossPiecesIsFoundAndNeverLeaks) {
  StopStringMatcher m({"\n\n"});
  auto a = m.Push("line one\n");
  EXPECT_EQ(a.text, "line one");  // the newline might begin the stop: held back
  EXPECT_FALSE(a.stopped);
  auto b = m.Push("\nline two");
  EXPECT_EQ(b.text, "");
  EXPECT_TRUE(b.stopped);
}

TEST(StopStringMatcherTest, HeldBackTextIsReleasedWhenItCannotBeAStop) {
  StopStringMatcher m({"STOP"});
  EXPECT_EQ(m.Push("ab ST").text, "ab ");
  EXPECT_EQ(m.Push("ART").text, "START");
  EXPECT_EQ(m.Push(" S").text, " ");
  EXPECT_EQ(m.Flush(), "S");  // generation ended for another reason: the tail is sent
}

TEST(StopStringMatcherTest, EarliestOfSeveralStopsWins) {
  EXPECT_EQ(StreamThrough({"world", "o"}, {"hello world"}), std::make_pair(std::string("hell"), true));
}

TEST(StopStringMatcherTest, MultibyteStopAndText) {
  EXPECT_EQ(StreamThrough({"。"}, {"日本語", "です。次"}), std::make_pair(std::string("日本語です"), true));
}

TEST(StopStringMatcherTest, NoStopsPassesEverythingThrough) {
  StopStringMatcher m({});
  EXPECT_EQ(m.Push("abc").text, "abc");
  EXPECT_EQ(m.Flush(), "");
}

}  // namespace
}  // namespace cohort
