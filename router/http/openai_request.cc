#include "router/http/openai_request.h"

#include <cmath>
#include <limits>
#include <optional>

#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace cohort {
namespace {

using nlohmann::json;

constexpr char kParamPayload[] = "type.cohort/openai.param";  // the field a parse error names
constexpr int64_t kMaxUint32 = std::numeric_limits<uint32_t>::max();
constexpr int kMaxTopLogprobs = 20;

absl::Status FieldError(const std::string& field, absl::string_view problem) {
  absl::Status status = absl::InvalidArgumentError(absl::StrCat(field, ": ", problem));
  status.SetPayload(kParamPayload, absl::Cord(field));
  return status;
}

absl::Status TypeError(const std::string& field, absl::string_view expected, const json& value) {
  return FieldError(field, absl::StrCat("expected ", expected, ", got ", value.type_name()));
}

// Non-negative JSON integers are stored unsigned and may exceed int64_t.
bool IntegerInRange(const json& v, int64_t min, int64_t max) {
  if (v.is_number_unsigned()) {
    const uint64_t u = v.get<uint64_t>();
    return u <= static_cast<uint64_t>(max) && (min <= 0 || u >= static_cast<uint64_t>(min));
  }
  const int64_t i = v.get<int64_t>();
  return i >= min && i <= max;
}

// The optional fields of one JSON object: each reader calls its setter only when the field is
// present and not null, and names the field (with its path) when the value does not fit.
class Fields {
 public:
  Fields(const json& object, std::string path) : object_(object), path_(std::move(path)) {}

  const json* Get(const char* key) const {
    auto it = object_.find(key);
    return it == object_.end() || it->is_null() ? nullptr : &*it;
  }
  std::string Name(const char* key) const { return path_.empty() ? key : absl::StrCat(path_, ".", key); }

  template <typename Set>
  absl::Status Float(const char* key, Set set) const {
    const json* v = Get(key);
    if (v == nullptr) return absl::OkStatus();
    if (!v->is_number()) return TypeError(Name(key), "a number", *v);
    const float f = static_cast<float>(v->get<double>());
    if (!std::isfinite(f)) return FieldError(Name(key), absl::StrCat(v->dump(), " does not fit a float"));
    set(f);
    return absl::OkStatus();
  }

  template <typename Set>
  absl::Status Integer(const char* key, int64_t min, int64_t max, Set set) const {
    const json* v = Get(key);
    if (v == nullptr) return absl::OkStatus();
    if (!v->is_number_integer()) return TypeError(Name(key), "an integer", *v);
    if (!IntegerInRange(*v, min, max))
      return FieldError(Name(key), absl::StrCat(v->dump(), " is outside [", min, ", ", max, "]"));
    set(v->get<int64_t>());
    return absl::OkStatus();
  }

  template <typename Set>
  absl::Status Bool(const char* key, Set set) const {
    const json* v = Get(key);
    if (v == nullptr) return absl::OkStatus();
    if (!v->is_boolean()) return TypeError(Name(key), "true or false", *v);
    set(v->get<bool>());
    return absl::OkStatus();
  }

  template <typename Set>
  absl::Status String(const char* key, Set set) const {
    const json* v = Get(key);
    if (v == nullptr) return absl::OkStatus();
    if (!v->is_string()) return TypeError(Name(key), "a string", *v);
    set(v->get<std::string>());
    return absl::OkStatus();
  }

 private:
  const json& object_;
  std::string path_;
};

// OpenAI parameters that change what is generated and that Cohort does not offer: refused rather
// than silently ignored.
absl::Status RefuseUnsupported(const Fields& f) {
  for (const char* key : {"n", "best_of"}) {
    int64_t n = 1;
    COHORT_RETURN_IF_ERROR(f.Integer(key, 1, std::numeric_limits<int64_t>::max(), [&](int64_t v) { n = v; }));
    if (n != 1) return FieldError(key, "only 1 choice per request is supported; send more requests");
  }
  if (const json* bias = f.Get("logit_bias"); bias != nullptr && !bias->empty()) {
    return FieldError("logit_bias", "not supported");
  }
  return absl::OkStatus();
}

absl::Status ParseStop(const Fields& f, cohort::v1::StoppingCriteria& stopping) {
  if (const json* stop = f.Get("stop")) {
    if (stop->is_string()) {
      stopping.add_stop(stop->get<std::string>());
    } else if (stop->is_array()) {
      for (size_t i = 0; i < stop->size(); ++i) {
        if (!(*stop)[i].is_string()) return TypeError(absl::StrCat("stop[", i, "]"), "a string", (*stop)[i]);
        stopping.add_stop((*stop)[i].get<std::string>());
      }
    } else {
      return TypeError("stop", "a string or an array of strings", *stop);
    }
  }
  if (const json* ids = f.Get("stop_token_ids")) {
    if (!ids->is_array()) return TypeError("stop_token_ids", "an array of token ids", *ids);
    for (size_t i = 0; i < ids->size(); ++i) {
      const json& id = (*ids)[i];
      if (!id.is_number_unsigned() || id.get<uint64_t>() > static_cast<uint64_t>(kMaxUint32)) {
        return TypeError(absl::StrCat("stop_token_ids[", i, "]"), "a token id", id);
      }
      stopping.add_stop_token_ids(id.get<uint32_t>());
    }
  }
  return absl::OkStatus();
}

// The fields /v1/completions and /v1/chat/completions share.
absl::Status ParseOptions(const json& body, CompletionRequest& out) {
  const Fields f(body, "");
  cohort::v1::GenerateRequest& g = out.generate;
  cohort::v1::SamplingParams& s = *g.mutable_sampling();
  cohort::v1::StoppingCriteria& stopping = *g.mutable_stopping();
  COHORT_RETURN_IF_ERROR(RefuseUnsupported(f));
  COHORT_RETURN_IF_ERROR(f.String("model", [&](const std::string& v) { g.set_model(v); }));
  COHORT_RETURN_IF_ERROR(f.Integer("max_tokens", 0, kMaxUint32, [&](int64_t v) { stopping.set_max_tokens(v); }));
  COHORT_RETURN_IF_ERROR(f.Float("temperature", [&](float v) { s.set_temperature(v); }));
  COHORT_RETURN_IF_ERROR(f.Float("top_p", [&](float v) { s.set_top_p(v); }));
  COHORT_RETURN_IF_ERROR(f.Float("min_p", [&](float v) { s.set_min_p(v); }));
  COHORT_RETURN_IF_ERROR(f.Float("presence_penalty", [&](float v) { s.set_presence_penalty(v); }));
  COHORT_RETURN_IF_ERROR(f.Float("frequency_penalty", [&](float v) { s.set_frequency_penalty(v); }));
  COHORT_RETURN_IF_ERROR(f.Float("repetition_penalty", [&](float v) { s.set_repetition_penalty(v); }));
  // -1 is how vLLM's clients say "off"; the proto says 0.
  COHORT_RETURN_IF_ERROR(f.Integer("top_k", -1, kMaxUint32, [&](int64_t v) { s.set_top_k(v < 0 ? 0 : v); }));
  COHORT_RETURN_IF_ERROR(f.Integer("seed", std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max(),
                                   [&](int64_t v) { s.set_seed(static_cast<uint64_t>(v)); }));
  COHORT_RETURN_IF_ERROR(ParseStop(f, stopping));
  COHORT_RETURN_IF_ERROR(f.Bool("ignore_eos", [&](bool v) { stopping.set_ignore_eos(v); }));

  std::optional<std::string> priority;
  COHORT_RETURN_IF_ERROR(f.String("priority", [&](const std::string& v) { priority = v; }));
  if (priority == "interactive") {
    g.set_priority(cohort::v1::PRIORITY_INTERACTIVE);
  } else if (priority == "batch") {
    g.set_priority(cohort::v1::PRIORITY_BATCH);
  } else if (priority) {
    return FieldError("priority", absl::StrCat("'", *priority, "' is neither \"interactive\" nor \"batch\""));
  }

  COHORT_RETURN_IF_ERROR(f.Bool("stream", [&](bool v) { out.stream = v; }));
  if (const json* options = f.Get("stream_options")) {
    if (!options->is_object()) return TypeError("stream_options", "an object", *options);
    COHORT_RETURN_IF_ERROR(
        Fields(*options, "stream_options").Bool("include_usage", [&](bool v) { out.include_usage = v; }));
  }
  return absl::OkStatus();
}

// `prompt`: token ids, or a string passed on as text. A batch of one prompt is that prompt.
absl::Status ParsePrompt(const json& prompt, cohort::v1::GenerateRequest& g) {
  if (prompt.is_string()) {
    g.set_text(prompt.get<std::string>());
    return absl::OkStatus();
  }
  if (!prompt.is_array()) return TypeError("prompt", "an array of token ids", prompt);
  if (prompt.size() == 1 && (prompt[0].is_array() || prompt[0].is_string())) return ParsePrompt(prompt[0], g);
  cohort::v1::TokenIds& ids = *g.mutable_token_ids();
  for (size_t i = 0; i < prompt.size(); ++i) {
    const json& id = prompt[i];
    if (id.is_array() || id.is_string()) {
      return FieldError("prompt", absl::StrCat("a batch of ", prompt.size(), " prompts; send one prompt per request"));
    }
    if (!id.is_number_unsigned() || id.get<uint64_t>() > static_cast<uint64_t>(kMaxUint32)) {
      return FieldError(absl::StrCat("prompt[", i, "]"), absl::StrCat("expected a token id, got ", id.dump()));
    }
    ids.add_ids(id.get<uint32_t>());
  }
  return absl::OkStatus();
}

absl::Status ParseMessage(const json& m, const std::string& name, ChatMessage& out) {
  if (!m.is_object()) return TypeError(name, "an object with role and content", m);
  const Fields f(m, name);
  const json* role = f.Get("role");
  if (role == nullptr) return FieldError(f.Name("role"), "required");
  if (!role->is_string()) return TypeError(f.Name("role"), "a string", *role);
  out.role = role->get<std::string>();
  if (out.role != "system" && out.role != "developer" && out.role != "user" && out.role != "assistant" &&
      out.role != "tool") {
    return FieldError(f.Name("role"),
                      absl::StrCat("'", out.role, "' is not one of system, developer, user, assistant, tool"));
  }
  const json* content = f.Get("content");
  if (content == nullptr) {
    // An assistant turn that only called tools has no content.
    return out.role == "assistant" ? absl::OkStatus() : FieldError(f.Name("content"), "required");
  }
  if (content->is_string()) {
    out.content = content->get<std::string>();
    return absl::OkStatus();
  }
  if (!content->is_array()) return TypeError(f.Name("content"), "a string or an array of content parts", *content);
  for (size_t j = 0; j < content->size(); ++j) {
    const json& part = (*content)[j];
    const std::string part_name = absl::StrCat(f.Name("content"), "[", j, "]");
    if (!part.is_object()) return TypeError(part_name, "a content part object", part);
    const Fields p(part, part_name);
    std::string type, text;
    bool has_text = false;
    COHORT_RETURN_IF_ERROR(p.String("type", [&](const std::string& v) { type = v; }));
    if (type != "text")
      return FieldError(p.Name("type"), absl::StrCat("'", type, "' parts are not supported; send \"text\""));
    COHORT_RETURN_IF_ERROR(p.String("text", [&](const std::string& v) {
      text = v;
      has_text = true;
    }));
    if (!has_text) return FieldError(p.Name("text"), "required");
    if (!out.content.empty()) out.content += "\n";
    out.content += text;
  }
  return absl::OkStatus();
}

}  // namespace

std::optional<std::string> ErrorParam(const absl::Status& status) {
  auto param = status.GetPayload(kParamPayload);
  if (!param) return std::nullopt;
  return std::string(*param);
}

absl::StatusOr<CompletionRequest> ParseCompletionRequest(const json& body) {
  if (!body.is_object())
    return absl::InvalidArgumentError(absl::StrCat("expected a JSON object, got ", body.type_name()));
  CompletionRequest out;
  COHORT_RETURN_IF_ERROR(ParseOptions(body, out));
  const Fields f(body, "");
  const json* prompt = f.Get("prompt");
  if (prompt == nullptr) return FieldError("prompt", "required: an array of token ids");
  COHORT_RETURN_IF_ERROR(ParsePrompt(*prompt, out.generate));
  COHORT_RETURN_IF_ERROR(
      f.Integer("logprobs", 0, kMaxTopLogprobs, [&](int64_t v) { out.generate.set_top_logprobs(v); }));
  bool echo = false;
  COHORT_RETURN_IF_ERROR(f.Bool("echo", [&](bool v) { echo = v; }));
  if (echo) return FieldError("echo", "not supported");
  if (const json* suffix = f.Get("suffix"); suffix != nullptr && !(suffix->is_string() && suffix->empty())) {
    return FieldError("suffix", "not supported");
  }
  return out;
}

absl::StatusOr<ChatRequest> ParseChatRequest(const json& body) {
  if (!body.is_object())
    return absl::InvalidArgumentError(absl::StrCat("expected a JSON object, got ", body.type_name()));
  ChatRequest out;
  const Fields f(body, "");
  const json* messages = f.Get("messages");
  if (messages == nullptr) return FieldError("messages", "required: an array of {\"role\", \"content\"} objects");
  if (!messages->is_array()) return TypeError("messages", "an array of messages", *messages);
  if (messages->empty()) return FieldError("messages", "empty; send at least one message");
  out.messages.resize(messages->size());
  for (size_t i = 0; i < messages->size(); ++i) {
    COHORT_RETURN_IF_ERROR(ParseMessage((*messages)[i], absl::StrCat("messages[", i, "]"), out.messages[i]));
  }
  COHORT_RETURN_IF_ERROR(ParseOptions(body, out.options));
  cohort::v1::GenerateRequest& g = out.options.generate;
  COHORT_RETURN_IF_ERROR(
      f.Integer("max_completion_tokens", 0, kMaxUint32, [&](int64_t v) { g.mutable_stopping()->set_max_tokens(v); }));
  bool logprobs = false;
  int64_t top_logprobs = 0;
  COHORT_RETURN_IF_ERROR(f.Bool("logprobs", [&](bool v) { logprobs = v; }));
  COHORT_RETURN_IF_ERROR(f.Integer("top_logprobs", 0, kMaxTopLogprobs, [&](int64_t v) { top_logprobs = v; }));
  if (logprobs) g.set_top_logprobs(top_logprobs);
  return out;
}

}  // namespace cohort
