// Stop strings on streamed text: text that could still turn out to be the start of a stop string
// is held back, and nothing from a stop string onwards is ever sent.
//
//   StopStringMatcher stops({"\n\n", "END"});
//   auto r = stops.Push(decoder.Push(token));  // r.text: safe to stream; r.stopped: finish now
//   ... at the end without a stop: stops.Flush() is the rest.
#pragma once

#include <string>
#include <vector>

namespace cohort {

class StopStringMatcher {
 public:
  explicit StopStringMatcher(std::vector<std::string> stop_strings);

  struct Result {
    std::string text;      // complete text that can be sent now
    bool stopped = false;  // a stop string completed: `text` ends right before it
  };
  // Appends newly decoded text (complete UTF-8 characters).
  Result Push(const std::string& text);
  // Text still held back when generation ends for another reason.
  std::string Flush();

 private:
  std::vector<std::string> stops_;
  std::string pending_;
  bool stopped_ = false;
};

}  // namespace cohort
