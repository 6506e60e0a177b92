// libFuzzer entry for the tokenizer (built and run by scripts/fuzz_tokenizer.sh, outside the main
// build). Every input is encoded as text:
//   - invalid UTF-8 (judged by utf8proc, independently of the tokenizer's own check) must be
//     InvalidArgument; valid text must encode;
//   - the byte-level demo tokenizer must round-trip: Decode(Encode(s)) == s, and with special
//     tokens added the same ids follow BOS;
//   - a variant using the other supported parts (NFKC, Prepend, GPT-2 ByteLevel regex, Digits,
//     every added-token flag, no decoder) must not crash, and streaming decoding must equal
//     Decode for both tokenizers;
//   - the input bytes read as token ids must decode, streamed or not, to the same valid UTF-8.
#include <utf8proc.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "common/tokenizer/tokenizer.h"
#include "nlohmann/json.hpp"

namespace {

std::unique_ptr<cohort::Tokenizer> demo;
std::unique_ptr<cohort::Tokenizer> variant;

void Fail(const char* what, const std::string& input) {
  std::fprintf(stderr, "tokenizer_fuzz: %s for input %s\n", what,
               nlohmann::json::binary({input.begin(), input.end()}).dump().c_str());
  std::abort();
}

bool ValidUtf8(const std::string& text) {
  const auto* p = reinterpret_cast<const utf8proc_uint8_t*>(text.data());
  utf8proc_ssize_t left = static_cast<utf8proc_ssize_t>(text.size());
  while (left > 0) {
    utf8proc_int32_t c;
    const utf8proc_ssize_t n = utf8proc_iterate(p, left, &c);
    if (n <= 0 || c < 0) return false;
    p += n;
    left -= n;
  }
  return true;
}

std::string Stream(const cohort::Tokenizer& tokenizer, const std::vector<int32_t>& ids, bool skip,
                   const std::string& input) {
  cohort::IncrementalDecoder decoder(tokenizer, skip);
  std::string out;
  for (int32_t id : ids) {
    const std::string chunk = decoder.Push(id);
    if (!ValidUtf8(chunk)) Fail("IncrementalDecoder::Push returned invalid UTF-8", input);
    out += chunk;
  }
  out += decoder.Flush();
  return out;
}

void CheckDecoding(const cohort::Tokenizer& tokenizer, const std::vector<int32_t>& ids, const std::string& input) {
  for (bool skip : {false, true}) {
    const std::string decoded = tokenizer.Decode(ids, skip);
    if (!ValidUtf8(decoded)) Fail("Decode returned invalid UTF-8", input);
    if (Stream(tokenizer, ids, skip, input) != decoded) Fail("streamed decoding differs from Decode", input);
  }
}

std::unique_ptr<cohort::Tokenizer> LoadOrDie(const std::string& path) {
  auto tokenizer = cohort::Tokenizer::Load(path);
  if (!tokenizer.ok()) {
    std::fprintf(stderr, "tokenizer_fuzz: %s\n", std::string(tokenizer.status().message()).c_str());
    std::exit(1);
  }
  return std::move(tokenizer).value();
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  const char* env = std::getenv("COHORT_FUZZ_TOKENIZER");
  const std::string dir = env != nullptr ? env : COHORT_SOURCE_DIR "/models/cohort-demo";
  demo = LoadOrDie(dir);

  std::ifstream in(dir + "/tokenizer.json");
  nlohmann::json json = nlohmann::json::parse(in);
  json["normalizer"] = nlohmann::json::parse(R"({"type": "Sequence", "normalizers": [
      {"type": "NFKC"}, {"type": "Replace", "pattern": {"Regex": "\\s{3,}"}, "content": "  "},
      {"type": "Prepend", "prepend": " "}]})");
  json["pre_tokenizer"] = nlohmann::json::parse(R"({"type": "Sequence", "pretokenizers": [
      {"type": "Digits", "individual_digits": true},
      {"type": "Split", "pattern": {"String": "--"}, "behavior": "MergedWithNext", "invert": false},
      {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}]})");
  json["decoder"] = nullptr;
  for (const char* token : {R"({"content": "<tok>", "lstrip": true, "rstrip": true, "special": true})",
                            R"({"content": "tok", "single_word": true, "normalized": true})",
                            R"({"content": "ab", "single_word": true, "lstrip": true, "normalized": false})",
                            R"({"content": "ﬁ", "normalized": true})"}) {
    json["added_tokens"].push_back(nlohmann::json::parse(token));
  }
  char dir_template[] = "/tmp/tokenizer_fuzz_XXXXXX";
  const char* variant_dir = mkdtemp(dir_template);
  if (variant_dir == nullptr) return 1;
  const std::string variant_path = std::string(variant_dir) + "/tokenizer.json";
  std::ofstream(variant_path) << json.dump();
  variant = LoadOrDie(variant_path);
  std::remove(variant_path.c_str());
  std::remove(variant_dir);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  const bool valid = ValidUtf8(text);

  auto ids = demo->Encode(text, false);
  if (!valid) {
    if (ids.ok() || !absl::IsInvalidArgument(ids.status())) Fail("invalid UTF-8 was not InvalidArgument", text);
    if (variant->Encode(text, true).ok()) Fail("invalid UTF-8 encoded with the variant", text);
  } else {
    if (!ids.ok()) Fail("valid text did not encode", text);
    if (demo->Decode(*ids, false) != text) Fail("Decode(Encode(s)) != s", text);
    CheckDecoding(*demo, *ids, text);
    auto with_bos = demo->Encode(text, true);
    if (!with_bos.ok() || with_bos->empty() || (*with_bos)[0] != *demo->bos_id() ||
        !std::equal(with_bos->begin() + 1, with_bos->end(), ids->begin(), ids->end())) {
      Fail("add_special_tokens did not just prepend BOS", text);
    }
    auto variant_ids = variant->Encode(text, true);
    if (!variant_ids.ok()) Fail("valid text did not encode with the variant", text);
    CheckDecoding(*variant, *variant_ids, text);
  }

  // The bytes as ids (little-endian 16-bit, so that most fall inside the vocabulary).
  std::vector<int32_t> raw_ids;
  for (size_t i = 0; i + 1 < size; i += 2) raw_ids.push_back(static_cast<int32_t>(data[i] | (data[i + 1] << 8)) - 256);
  CheckDecoding(*demo, raw_ids, text);
  CheckDecoding(*variant, raw_ids, text);
  return 0;
}
