// Encoding throughput on one thread: English text (Debian's GPL-3 repeated to ~20 MB by
// default) through the demo tokenizer, as one call and as paragraph-sized calls (what serving
// does), five rounds. Prints MB/s; not a test.
//
//   build/bin/tokenizer_bench [--tokenizer DIR_OR_FILE] [--text FILE] [--mb 20]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "common/tokenizer/tokenizer.h"

namespace {

double Seconds(std::chrono::steady_clock::duration d) { return std::chrono::duration<double>(d).count(); }

}  // namespace

int main(int argc, char** argv) {
  std::string tokenizer_path = std::string(COHORT_SOURCE_DIR) + "/models/cohort-demo";
  std::string text_path = "/usr/share/common-licenses/GPL-3";
  double megabytes = 20;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--tokenizer") {
      tokenizer_path = argv[i + 1];
    } else if (flag == "--text") {
      text_path = argv[i + 1];
    } else if (flag == "--mb") {
      megabytes = std::atof(argv[i + 1]);
    } else {
      std::fprintf(stderr, "usage: tokenizer_bench [--tokenizer DIR_OR_FILE] [--text FILE] [--mb N]\n");
      return 2;
    }
  }
  auto tokenizer = cohort::Tokenizer::Load(tokenizer_path);
  if (!tokenizer.ok()) {
    std::fprintf(stderr, "tokenizer_bench: %s\n", std::string(tokenizer.status().message()).c_str());
    return 1;
  }
  std::ifstream in(text_path, std::ios::binary);
  std::stringstream buffer;
  buffer << in.rdbuf();
  const std::string unit = buffer.str();
  if (unit.empty()) {
    std::fprintf(stderr, "tokenizer_bench: cannot read %s\n", text_path.c_str());
    return 1;
  }
  std::string text;
  while (text.size() < megabytes * 1e6) text += unit;
  // Paragraphs: pieces of the text cut at blank lines, as prompts of a few hundred bytes to a
  // few KB would be.
  std::vector<std::string> paragraphs;
  for (size_t start = 0; start < text.size();) {
    size_t end = text.find("\n\n", start);
    end = end == std::string::npos ? text.size() : end + 2;
    paragraphs.push_back(text.substr(start, end - start));
    start = end;
  }

  const double mb = static_cast<double>(text.size()) / 1e6;
  std::printf("text: %s repeated to %.1f MB, %zu paragraphs; tokenizer %s\n", text_path.c_str(), mb, paragraphs.size(),
              tokenizer_path.c_str());
  // The first round also fills the BPE word cache; shared machines are noisy, so the best round
  // is the figure to quote.
  double best_whole = 0, best_paragraphs = 0;
  for (int round = 0; round < 5; ++round) {
    auto start = std::chrono::steady_clock::now();
    auto ids = (*tokenizer)->Encode(text, false);
    const double whole_s = Seconds(std::chrono::steady_clock::now() - start);
    if (!ids.ok()) {
      std::fprintf(stderr, "tokenizer_bench: %s\n", std::string(ids.status().message()).c_str());
      return 1;
    }
    start = std::chrono::steady_clock::now();
    size_t paragraph_tokens = 0;
    for (const std::string& p : paragraphs) paragraph_tokens += (*tokenizer)->Encode(p, false)->size();
    const double paragraphs_s = Seconds(std::chrono::steady_clock::now() - start);
    start = std::chrono::steady_clock::now();
    const std::string decoded = (*tokenizer)->Decode(*ids, false);
    const double decode_s = Seconds(std::chrono::steady_clock::now() - start);
    std::printf(
        "round %d: one call %.1f MB/s (%zu tokens, %.2f bytes/token); per paragraph %.1f MB/s (%zu tokens); "
        "decode %.1f MB/s%s\n",
        round + 1, mb / whole_s, ids->size(), static_cast<double>(text.size()) / ids->size(), mb / paragraphs_s,
        paragraph_tokens, mb / decode_s, decoded == text ? "" : " (DECODE MISMATCH)");
    best_whole = std::max(best_whole, mb / whole_s);
    best_paragraphs = std::max(best_paragraphs, mb / paragraphs_s);
  }
  std::printf("best: one call %.1f MB/s, per paragraph %.1f MB/s (one thread)\n", best_whole, best_paragraphs);
  return 0;
}
