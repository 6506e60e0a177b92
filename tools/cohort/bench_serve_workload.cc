#include "tools/cohort/bench_serve_workload.h"

#include <algorithm>
#include <cmath>
#include <fstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/status.h"
#include "nlohmann/json.hpp"

namespace cohort::bench {
namespace {

using nlohmann::json;

absl::Status BadLength(absl::string_view flag, absl::string_view text, absl::string_view why) {
  return absl::InvalidArgumentError(absl::StrCat(flag, ": '", text, "' ", why,
                                                 "; use N, uniform:MIN:MAX, normal:MEAN:STDDEV or exponential:MEAN:MAX"));
}

}  // namespace

absl::StatusOr<LengthSpec> LengthSpec::Parse(absl::string_view flag, absl::string_view text) {
  std::vector<absl::string_view> parts = absl::StrSplit(text, ':');
  LengthSpec spec;
  if (parts.size() == 1) {
    int64_t n;
    if (!absl::SimpleAtoi(parts[0], &n)) return BadLength(flag, text, "is not a length");
    if (n < 1) return BadLength(flag, text, "must be at least 1");
    return Fixed(n);
  }
  if (parts.size() != 3) return BadLength(flag, text, "has the wrong number of fields");
  double a, b;
  if (!absl::SimpleAtod(parts[1], &a) || !absl::SimpleAtod(parts[2], &b) || !std::isfinite(a) || !std::isfinite(b)) {
    return BadLength(flag, text, "has a field that is not a number");
  }
  if (parts[0] == "uniform") {
    if (a < 1 || b < a || a != std::floor(a) || b != std::floor(b)) {
      return BadLength(flag, text, "needs whole numbers 1 <= MIN <= MAX");
    }
    spec.kind_ = Kind::kUniform;
    spec.min_ = static_cast<int64_t>(a);
    spec.max_ = static_cast<int64_t>(b);
    spec.mean_ = (a + b) / 2;
    return spec;
  }
  if (parts[0] == "normal") {
    if (a < 1 || b < 0) return BadLength(flag, text, "needs MEAN >= 1 and STDDEV >= 0");
    spec.kind_ = Kind::kNormal;
    spec.mean_ = a;
    spec.stddev_ = b;
    spec.min_ = std::max<int64_t>(1, std::llround(a - 3 * b));
    spec.max_ = std::max<int64_t>(spec.min_, std::llround(a + 3 * b));
    return spec;
  }
  if (parts[0] == "exponential") {
    if (a < 1 || b < 1 || b != std::floor(b)) return BadLength(flag, text, "needs MEAN >= 1 and a whole MAX >= 1");
    spec.kind_ = Kind::kExponential;
    spec.mean_ = a;
    spec.min_ = 1;
    spec.max_ = static_cast<int64_t>(b);
    return spec;
  }
  return BadLength(flag, text, absl::StrCat("names no distribution ('", parts[0], "')"));
}

LengthSpec LengthSpec::Fixed(int64_t n) {
  LengthSpec spec;
  spec.kind_ = Kind::kFixed;
  spec.mean_ = static_cast<double>(n);
  spec.min_ = spec.max_ = n;
  return spec;
}

int64_t LengthSpec::Draw(std::mt19937_64& rng) const {
  switch (kind_) {
    case Kind::kFixed:
      return min_;
    case Kind::kUniform:
      return std::uniform_int_distribution<int64_t>(min_, max_)(rng);
    case Kind::kNormal:
      return std::clamp<int64_t>(std::llround(std::normal_distribution<double>(mean_, stddev_)(rng)), min_, max_);
    case Kind::kExponential:
      return std::clamp<int64_t>(std::llround(std::exponential_distribution<double>(1.0 / mean_)(rng)), min_, max_);
  }
  return min_;
}

std::string LengthSpec::ToString() const {
  switch (kind_) {
    case Kind::kFixed:
      return absl::StrCat(min_);
    case Kind::kUniform:
      return absl::StrCat("uniform:", min_, ":", max_);
    case Kind::kNormal:
      return absl::StrCat("normal:", mean_, ":", stddev_);
    case Kind::kExponential:
      return absl::StrCat("exponential:", mean_, ":", max_);
  }
  return "";
}

absl::StatusOr<std::unique_ptr<Workload>> Workload::Create(const WorkloadOptions& options) {
  if (options.shared_prefix_len < 0) return absl::InvalidArgumentError("--shared-prefix-len must not be negative");
  if (options.num_prefixes < 1) return absl::InvalidArgumentError("--num-prefixes must be at least 1");
  std::unique_ptr<Workload> w(new Workload(options));
  if (!options.prompts_file.empty()) {
    if (options.shared_prefix_len > 0) {
      return absl::InvalidArgumentError(
          "--shared-prefix-len applies to generated prompts; put the shared text in the --prompts-file prompts");
    }
    COHORT_RETURN_IF_ERROR(w->LoadPromptsFile());
    return w;
  }
  if (options.vocab_size <= 0) {
    return absl::InvalidArgumentError("random token-id prompts need the model's vocabulary size: pass --vocab-size");
  }
  std::uniform_int_distribution<uint32_t> token(0, static_cast<uint32_t>(options.vocab_size - 1));
  if (options.shared_prefix_len > 0) {
    for (int64_t p = 0; p < options.num_prefixes; ++p) {
      std::vector<uint32_t>& prefix = w->prefixes_.emplace_back();
      for (int64_t i = 0; i < options.shared_prefix_len; ++i) prefix.push_back(token(w->rng_));
    }
  }
  return w;
}

absl::Status Workload::LoadPromptsFile() {
  const std::string& path = options_.prompts_file;
  std::ifstream in(path);
  if (!in) return absl::InvalidArgumentError(absl::StrCat("--prompts-file: cannot read ", path));
  std::string line;
  for (int64_t number = 1; std::getline(in, line); ++number) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    auto fail = [&](absl::string_view why) {
      return absl::InvalidArgumentError(absl::StrCat("--prompts-file ", path, " line ", number, ": ", why));
    };
    const json object = json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (object.is_discarded() || !object.is_object()) return fail("not a JSON object");
    const json* prompt = object.contains("prompt") ? &object["prompt"]
                         : object.contains("prompt_token_ids") ? &object["prompt_token_ids"]
                                                               : nullptr;
    BenchRequest request;
    if (prompt == nullptr) return fail("has no \"prompt\" (text or token ids) or \"prompt_token_ids\"");
    if (prompt->is_string()) {
      request.prompt_text = prompt->get<std::string>();
      if (request.prompt_text.empty()) return fail("has an empty prompt");
    } else if (prompt->is_array() && !prompt->empty()) {
      for (const json& id : *prompt) {
        if (!id.is_number_unsigned() || id.get<uint64_t>() > UINT32_MAX) return fail("has a prompt id that is not a token id");
        request.prompt_ids.push_back(id.get<uint32_t>());
      }
    } else {
      return fail("\"prompt\" is neither text nor a non-empty array of token ids");
    }
    for (const char* key : {"output_len", "max_tokens"}) {
      if (!object.contains(key)) continue;
      if (!object[key].is_number_unsigned() || object[key].get<uint64_t>() < 1) {
        return fail(absl::StrCat("\"", key, "\" is not a positive integer"));
      }
      request.max_tokens = object[key].get<int64_t>();
    }
    file_prompts_.push_back(std::move(request));
  }
  if (file_prompts_.empty()) return absl::InvalidArgumentError(absl::StrCat("--prompts-file ", path, " has no prompts"));
  return absl::OkStatus();
}

BenchRequest Workload::Next() {
  const uint64_t index = next_++;
  if (!file_prompts_.empty()) {
    BenchRequest r = file_prompts_[index % file_prompts_.size()];
    if (r.max_tokens == 0) r.max_tokens = options_.output_len.Draw(rng_);
    return r;
  }
  BenchRequest r;
  const int64_t input_len = options_.input_len.Draw(rng_);
  r.max_tokens = options_.output_len.Draw(rng_);
  if (!prefixes_.empty()) r.prompt_ids = prefixes_[index % prefixes_.size()];
  std::uniform_int_distribution<uint32_t> token(0, static_cast<uint32_t>(options_.vocab_size - 1));
  for (int64_t i = 0; i < input_len; ++i) r.prompt_ids.push_back(token(rng_));
  return r;
}

int64_t Workload::MaxTotalTokens() const {
  if (file_prompts_.empty()) return options_.shared_prefix_len + options_.input_len.max() + options_.output_len.max();
  int64_t most = 0;
  for (const BenchRequest& r : file_prompts_) {
    if (!r.prompt_text.empty()) return -1;
    most = std::max(most, r.prompt_tokens() + (r.max_tokens > 0 ? r.max_tokens : options_.output_len.max()));
  }
  return most;
}

std::string Workload::Describe() const {
  std::string prompts = file_prompts_.empty()
                            ? absl::StrCat("input ", options_.input_len.ToString(), " random token ids")
                            : absl::StrCat(file_prompts_.size(), " prompts from ", options_.prompts_file);
  if (options_.shared_prefix_len > 0) {
    absl::StrAppend(&prompts, " after a shared prefix of ", options_.shared_prefix_len, " tokens",
                    options_.num_prefixes > 1 ? absl::StrCat(" (", options_.num_prefixes, " prefixes)") : "");
  }
  return absl::StrCat(prompts, ", output ", options_.output_len.ToString(), " tokens");
}

}  // namespace cohort::bench
