// `cohort bench serve`: a load generator for a running router or worker. It runs one load level
// after another (closed loops at the --concurrency levels, then open loops at the --request-rate
// rates), prints a table of latency and throughput, and writes everything as JSON (--output).
// See bench_serve_load.h for how a level is run and measured, bench_serve_stats.h for the numbers.
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <type_traits>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/flags.h"
#include "common/program.h"
#include "common/status.h"
#include "tools/cohort/bench_serve_client.h"
#include "tools/cohort/bench_serve_load.h"
#include "tools/cohort/bench_serve_stats.h"
#include "tools/cohort/bench_serve_workload.h"
#include "tools/cohort/commands.h"

namespace cohort::tools {
namespace {

using bench::LoadPlan;
using nlohmann::ordered_json;

struct BenchServeFlags {
  std::string target;
  std::string api = "grpc";
  std::string model;
  std::string concurrency;
  std::string request_rate;
  int64_t num_requests = 100;
  double num_requests_per_user = 0;
  int64_t warmup_requests = -1;
  std::string input_len = "128";
  std::string output_len = "128";
  int64_t shared_prefix_len = 0;
  int64_t num_prefixes = 1;
  std::string prompts_file;
  int64_t vocab_size = 0;
  double temperature = 0;
  bool ignore_eos = true;
  double slo_ttft_ms = 0;
  double slo_tpot_ms = 0;
  int channels = 4;
  double request_timeout_s = 600;
  double connect_timeout_s = 10;
  int64_t seed = 0;
  std::string output;
  std::string label;
  bool progress = true;
  std::string log_level = "warn";
};

template <typename T>
absl::StatusOr<std::vector<T>> ParseList(absl::string_view flag, absl::string_view text) {
  std::vector<T> values;
  for (absl::string_view part : absl::StrSplit(text, ',', absl::SkipWhitespace())) {
    T value;
    bool ok;
    if constexpr (std::is_integral_v<T>) {
      ok = absl::SimpleAtoi(part, &value);
    } else {
      ok = absl::SimpleAtod(part, &value) && std::isfinite(value);
    }
    if (!ok || value <= 0) {
      return absl::InvalidArgumentError(absl::StrCat(flag, ": '", part, "' is not a positive number"));
    }
    values.push_back(value);
  }
  if (values.empty()) return absl::InvalidArgumentError(absl::StrCat(flag, ": no values given"));
  return values;
}

std::string UtcNow() {
  char text[32];
  const std::time_t now = std::time(nullptr);
  std::tm utc;
  gmtime_r(&now, &utc);
  std::strftime(text, sizeof(text), "%Y-%m-%dT%H:%M:%SZ", &utc);
  return text;
}

absl::Status WriteJson(const std::string& path, const ordered_json& json) {
  const std::string partial = path + ".partial";
  {
    std::ofstream out(partial, std::ios::trunc);
    if (!out) return absl::PermissionDeniedError(absl::StrCat("--output: cannot write ", path));
    out << json.dump(2) << "\n";
    if (!out.flush()) return absl::DataLossError(absl::StrCat("--output: writing ", path, " failed"));
  }
  if (std::rename(partial.c_str(), path.c_str()) != 0) {
    return absl::PermissionDeniedError(absl::StrCat("--output: cannot write ", path));
  }
  return absl::OkStatus();
}

// The load levels the flags ask for: closed loops first, then open loops.
absl::StatusOr<std::vector<LoadPlan>> PlanLevels(const BenchServeFlags& f, bool concurrency_set) {
  std::vector<LoadPlan> plans;
  if (concurrency_set || f.request_rate.empty()) {
    const absl::string_view text = f.concurrency.empty() ? absl::string_view("1") : absl::string_view(f.concurrency);
    COHORT_ASSIGN_OR_RETURN(auto levels, ParseList<int64_t>("--concurrency", text));
    for (int64_t c : levels) plans.push_back({.mode = LoadPlan::Mode::kClosed, .concurrency = c});
  }
  if (!f.request_rate.empty()) {
    COHORT_ASSIGN_OR_RETURN(auto rates, ParseList<double>("--request-rate", f.request_rate));
    for (double r : rates) plans.push_back({.mode = LoadPlan::Mode::kOpen, .rate = r});
  }
  if (f.num_requests < 1) return absl::InvalidArgumentError("--num-requests must be at least 1");
  if (f.num_requests_per_user < 0) return absl::InvalidArgumentError("--num-requests-per-user must not be negative");
  for (size_t i = 0; i < plans.size(); ++i) {
    LoadPlan& plan = plans[i];
    const bool closed = plan.mode == LoadPlan::Mode::kClosed;
    plan.num_requests = f.num_requests;
    if (closed) {
      const double per_user = std::ceil(f.num_requests_per_user * static_cast<double>(plan.concurrency));
      plan.num_requests = std::max(plan.num_requests, static_cast<int64_t>(per_user));
    }
    plan.warmup_requests = f.warmup_requests >= 0 ? f.warmup_requests
                           : closed               ? plan.concurrency
                                                  : std::max<int64_t>(1, f.num_requests / 10);
    plan.seed = static_cast<uint64_t>(f.seed) + i;
  }
  return plans;
}

absl::Status BenchServe(const BenchServeFlags& f, bool concurrency_set) {
  // Everything a flag can get wrong is checked before the server is contacted.
  COHORT_ASSIGN_OR_RETURN(const bench::Api api, bench::ParseApi(f.api));
  COHORT_ASSIGN_OR_RETURN(const bench::LengthSpec input_len, bench::LengthSpec::Parse("--input-len", f.input_len));
  COHORT_ASSIGN_OR_RETURN(const bench::LengthSpec output_len, bench::LengthSpec::Parse("--output-len", f.output_len));
  COHORT_ASSIGN_OR_RETURN(const std::vector<LoadPlan> plans, PlanLevels(f, concurrency_set));
  if (f.temperature < 0) return absl::InvalidArgumentError("--temperature must not be negative");
  if (f.slo_ttft_ms < 0 || f.slo_tpot_ms < 0) {
    return absl::InvalidArgumentError("--slo-ttft-ms and --slo-tpot-ms must not be negative (0: no bound)");
  }
  if (f.connect_timeout_s <= 0) return absl::InvalidArgumentError("--connect-timeout-s must be positive");
  if (f.vocab_size < 0) return absl::InvalidArgumentError("--vocab-size must not be negative");
  if (api == bench::Api::kHttp && f.prompts_file.empty() && f.vocab_size == 0) {
    return absl::InvalidArgumentError(
        "--api http cannot ask the model's vocabulary size: pass --vocab-size (or --prompts-file)");
  }
  COHORT_ASSIGN_OR_RETURN(auto transport, bench::Transport::Create({.api = api,
                                                                     .target = f.target,
                                                                     .model = f.model,
                                                                     .channels = f.channels,
                                                                     .temperature = f.temperature,
                                                                     .ignore_eos = f.ignore_eos,
                                                                     .request_timeout_s = f.request_timeout_s}));

  COHORT_ASSIGN_OR_RETURN(
      const bench::ServerModel model,
      transport->Connect(bench::Clock::now() + std::chrono::milliseconds(static_cast<int64_t>(f.connect_timeout_s * 1000))));
  if (model.vocab_size > 0 && f.vocab_size > model.vocab_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("--vocab-size ", f.vocab_size, " exceeds the model's vocabulary of ", model.vocab_size));
  }
  const int64_t vocab_size = f.vocab_size > 0 ? f.vocab_size : model.vocab_size;
  COHORT_ASSIGN_OR_RETURN(auto workload, bench::Workload::Create({.input_len = input_len,
                                                                   .output_len = output_len,
                                                                   .shared_prefix_len = f.shared_prefix_len,
                                                                   .num_prefixes = f.num_prefixes,
                                                                   .vocab_size = vocab_size,
                                                                   .seed = static_cast<uint64_t>(f.seed),
                                                                   .prompts_file = f.prompts_file}));
  const int64_t most_tokens = workload->MaxTotalTokens();
  if (model.max_context_tokens > 0 && most_tokens > model.max_context_tokens) {
    return absl::InvalidArgumentError(absl::StrCat(
        "a request may need ", most_tokens, " tokens (prompt plus output), more than the model's context of ",
        model.max_context_tokens, ": lower --input-len, --output-len or --shared-prefix-len"));
  }

  const bench::Slo slo{.ttft_ms = f.slo_ttft_ms, .tpot_ms = f.slo_tpot_ms};
  ordered_json report = {
      {"tool", "cohort bench serve"},
      {"format_version", 1},
      {"label", f.label},
      {"started_at", UtcNow()},
      {"target", f.target},
      {"api", bench::ApiName(api)},
      {"model",
       {{"name", model.name},
        {"architecture", model.architecture},
        {"vocab_size", model.vocab_size},
        {"max_context_tokens", model.max_context_tokens},
        {"total_parameters", model.total_parameters},
        {"active_parameters_per_token", model.active_parameters_per_token}}},
      {"workload",
       {{"description", workload->Describe()},
        {"input_len", input_len.ToString()},
        {"output_len", output_len.ToString()},
        {"shared_prefix_len", f.shared_prefix_len},
        {"num_prefixes", f.num_prefixes},
        {"prompts_file", f.prompts_file},
        {"vocab_size", vocab_size},
        {"temperature", f.temperature},
        {"ignore_eos", f.ignore_eos},
        {"seed", f.seed}}},
      {"slo", {{"ttft_ms", f.slo_ttft_ms}, {"tpot_ms", f.slo_tpot_ms}}},
      {"runs", ordered_json::array()},
  };
  const std::string header = absl::StrCat("cohort bench serve: ", bench::ApiName(api), " ", f.target, ", model ",
                                          model.name, "; ", workload->Describe(), "\n");
  std::fputs(header.c_str(), stdout);
  std::fflush(stdout);

  const bool progress = f.progress && isatty(STDERR_FILENO);
  std::vector<bench::RunSummary> summaries;
  for (const LoadPlan& plan : plans) {
    COHORT_ASSIGN_OR_RETURN(const bench::LoadResult result, bench::RunLoad(*transport, *workload, plan, progress));
    summaries.push_back(bench::Summarize(result, slo));
    report["runs"].push_back(bench::ToJson(summaries.back()));
    if (!f.output.empty()) COHORT_RETURN_IF_ERROR(WriteJson(f.output, report));  // what is done so far survives
    if (!progress) std::fprintf(stderr, "cohort bench serve: %s done\n", plan.Name().c_str());
  }
  std::fputs(bench::FormatTable(summaries, slo).c_str(), stdout);
  if (!f.output.empty()) std::printf("results: %s\n", f.output.c_str());
  return absl::OkStatus();
}

}  // namespace

int RunBenchServe(int argc, char** argv) {
  BenchServeFlags f;
  FlagSet flags(
      "cohort bench serve",
      "Load generator for a running cohort-router or cohort-worker: closed loops at --concurrency levels\n"
      "and open loops at Poisson --request-rate rates, each after warm-up requests that are not measured.\n"
      "Measures time to first token (TTFT), time per output token (TPOT), inter-token latency, end-to-end\n"
      "latency, request and output-token throughput and goodput under --slo-ttft-ms/--slo-tpot-ms; prints\n"
      "a table and writes every number as JSON to --output. Prompts are random token ids within the\n"
      "model's vocabulary unless --prompts-file gives them; max_tokens and ignore_eos fix output lengths.\n"
      "Lengths: N, uniform:MIN:MAX, normal:MEAN:STDDEV or exponential:MEAN:MAX (drawn per request).\n"
      "Exit status: 0 done, 1 the server could not be reached or failed, 2 bad flags.");
  flags.Add("target", &f.target, "server address host:port (gRPC, or the router's --http-port with --api http)",
            /*required=*/true);
  flags.Add("api", &f.api,
            "grpc (cohort.v1.Inference: the router), worker (cohort.worker.v1.Worker: a worker directly) or "
            "http (the router's OpenAI /v1/completions, streamed)");
  flags.Add("model", &f.model, "model name (default: the only model served)");
  flags.Add("concurrency", &f.concurrency, "closed-loop levels, e.g. 1,8,64: requests kept in flight (default 1)");
  flags.Add("request-rate", &f.request_rate, "open-loop Poisson arrival rates in requests/s, e.g. 2,8");
  flags.Add("num-requests", &f.num_requests, "measured requests per level");
  flags.Add("num-requests-per-user", &f.num_requests_per_user,
            "closed loops measure at least this many requests per user (concurrency), so larger levels run longer");
  flags.Add("warmup-requests", &f.warmup_requests,
            "requests sent first and not measured, per level (-1: the concurrency, or a tenth of --num-requests "
            "for a rate)");
  flags.Add("input-len", &f.input_len, "prompt tokens (after the shared prefix)");
  flags.Add("output-len", &f.output_len, "output tokens (max_tokens, with end-of-sequence ignored)");
  flags.Add("shared-prefix-len", &f.shared_prefix_len, "tokens of a system prompt that every prompt starts with");
  flags.Add("num-prefixes", &f.num_prefixes, "distinct shared prefixes, used in turn");
  flags.Add("prompts-file", &f.prompts_file,
            "JSONL prompts, used in order: {\"prompt\": \"text\" or [ids], \"output_len\": n (optional)}");
  flags.Add("vocab-size", &f.vocab_size, "draw token ids below this (0: the model's vocabulary, asked of the server)");
  flags.Add("temperature", &f.temperature, "sampling temperature (0: greedy)");
  flags.Add("ignore-eos", &f.ignore_eos, "generate max_tokens whatever the model says (--no-ignore-eos: stop at EOS)");
  flags.Add("slo-ttft-ms", &f.slo_ttft_ms, "goodput bound on time to first token (0: none)");
  flags.Add("slo-tpot-ms", &f.slo_tpot_ms, "goodput bound on time per output token (0: none)");
  flags.Add("channels", &f.channels, "gRPC connections the streams are spread over");
  flags.Add("request-timeout-s", &f.request_timeout_s, "deadline of each gRPC request (0: none)");
  flags.Add("connect-timeout-s", &f.connect_timeout_s, "how long to wait for the server to answer at the start");
  flags.Add("seed", &f.seed, "seed of prompts, lengths and arrival times");
  flags.Add("output", &f.output, "write the results as JSON here");
  flags.Add("label", &f.label, "a name for this run, copied into the JSON (e.g. continuous, static)");
  flags.Add("progress", &f.progress, "progress bar on stderr when it is a terminal (--no-progress: never)");
  flags.Add("log-level", &f.log_level, "trace, debug, info, warn, error or off (logs go to stderr)");
  return RunProgram(flags, argc, argv, f.log_level, [&] {
    if (!flags.positional().empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("unexpected argument '", flags.positional()[0], "' (see cohort bench serve --help)"));
    }
    return BenchServe(f, flags.IsSet("concurrency"));
  });
}

}  // namespace cohort::tools
