// cohort-router's OpenAI-compatible HTTP front as a client sees it: a real cohort-worker and a real
// cohort-router on 127.0.0.1, driven with curl.
#include <grpcpp/grpcpp.h>
#include <signal.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <thread>

#include "cohort/worker/v1/worker.grpc.pb.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/paths.h"
#include "tests/testing/server_process.h"
#include "tests/testing/subprocess.h"

namespace cohort {
namespace {

using nlohmann::json;
using testing::ServerProcess;

struct HttpReply {
  int status = 0;  // 0 when curl got no answer (see error)
  std::string body;
  std::string error;
};

// curl -sS -w '\n%{http_code}' <args>: the body, then the status on a line of its own.
HttpReply Curl(const std::vector<std::string>& args, int timeout_s = 30) {
  std::vector<std::string> argv = {"/usr/bin/curl", "-sS", "-w", "\n%{http_code}"};
  argv.insert(argv.end(), args.begin(), args.end());
  const testing::ProcessResult result = testing::RunProcess(argv, timeout_s);
  HttpReply reply;
  reply.error = result.err;
  const size_t newline = result.out.rfind('\n');
  if (newline == std::string::npos) return reply;
  reply.status = std::atoi(result.out.c_str() + newline + 1);
  reply.body = result.out.substr(0, newline);
  return reply;
}

json Json(const HttpReply& reply) {
  json body = json::parse(reply.body, nullptr, /*allow_exceptions=*/false);
  EXPECT_FALSE(body.is_discarded()) << "not JSON: " << reply.body;
  return body;
}

// The data of each server-sent event, in order.
std::vector<std::string> EventData(const std::string& body) {
  std::vector<std::string> data;
  for (size_t start = 0; start < body.size();) {
    size_t end = body.find("\n\n", start);
    if (end == std::string::npos) end = body.size();
    const std::string event = body.substr(start, end - start);
    if (event.rfind("data: ", 0) == 0) {
      data.push_back(event.substr(6));
    } else {
      ADD_FAILURE() << "not a data event: '" << event << "'";
    }
    start = end + 2;
  }
  return data;
}

std::vector<uint32_t> TokenIds(const json& choice) { return choice.at("token_ids").get<std::vector<uint32_t>>(); }

const std::vector<uint32_t> kPrompt = {5, 17, 42, 99, 3};
constexpr uint32_t kMaxTokens = 12;

json GreedyBody() {
  return {
      {"model", "v3_plain"}, {"prompt", kPrompt}, {"max_tokens", kMaxTokens}, {"temperature", 0}, {"ignore_eos", true}};
}

class RouterHttpTest : public ::testing::Test {
 protected:
  void SetUp() override {
    worker_ = testing::WorkerProcess::Start(testing::SourcePath("tests/fixtures/models/v3_plain"), {});
    ASSERT_NE(worker_, nullptr);
    StartRouter({"--metrics-port", "-1"});
  }

  // (Re)starts the router in front of the worker, and waits until it is ready.
  void StartRouter(std::vector<std::string> args) {
    router_.reset();
    args.insert(args.end(), {"--http-port", "0"});
    router_ = testing::RouterProcess::Start({worker_->address()}, args);
    ASSERT_NE(router_, nullptr);
    ASSERT_GT(router_->http_port(), 0) << router_->Log();
    // Ready once the router has the worker's first load report.
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (Get("/ready").status != 200) {
      ASSERT_LT(std::chrono::steady_clock::now(), deadline) << "never ready:\n" << router_->Log();
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }

  std::string Url(const std::string& path) const {
    return "http://127.0.0.1:" + std::to_string(router_->http_port()) + path;
  }
  HttpReply Get(const std::string& path) const { return Curl({Url(path)}); }
  HttpReply Post(const std::string& path, const std::string& body, std::vector<std::string> curl_args = {}) const {
    curl_args.insert(curl_args.end(), {"-H", "Content-Type: application/json", "--data-binary", body, Url(path)});
    return Curl(curl_args);
  }

  // How many requests the router counted with `outcome` (cohort_router_requests_total).
  double RequestsEndedAs(const std::string& outcome) const {
    const HttpReply metrics = Curl({"http://127.0.0.1:" + std::to_string(router_->metrics_port()) + "/metrics"});
    double total = 0;
    std::istringstream lines(metrics.body);
    for (std::string line; std::getline(lines, line);) {
      if (line.rfind("cohort_router_requests_total{", 0) == 0 &&
          line.find("outcome=\"" + outcome + "\"") != std::string::npos) {
        total += std::stod(line.substr(line.rfind(' ') + 1));
      }
    }
    return total;
  }

  // The tokens the worker itself gives for GreedyBody(), over gRPC.
  std::vector<uint32_t> WorkerGreedyTokens() const {
    auto stub = cohort::worker::v1::Worker::NewStub(worker_->Channel());
    cohort::v1::GenerateRequest request;
    for (uint32_t t : kPrompt) request.mutable_token_ids()->add_ids(t);
    request.mutable_sampling()->set_temperature(0);
    request.mutable_stopping()->set_max_tokens(kMaxTokens);
    request.mutable_stopping()->set_ignore_eos(true);
    grpc::ClientContext context;
    auto reader = stub->Generate(&context, request);
    std::vector<uint32_t> tokens;
    cohort::v1::GenerateResponse response;
    while (reader->Read(&response)) {
      tokens.insert(tokens.end(), response.chunk().token_ids().begin(), response.chunk().token_ids().end());
    }
    EXPECT_TRUE(reader->Finish().ok());
    EXPECT_EQ(tokens.size(), kMaxTokens);
    return tokens;
  }

  std::unique_ptr<ServerProcess> worker_;
  std::unique_ptr<ServerProcess> router_;
};

TEST_F(RouterHttpTest, CompletionGivesTheWorkersGreedyTokens) {
  const HttpReply reply = Post("/v1/completions", GreedyBody().dump());
  ASSERT_EQ(reply.status, 200) << reply.body << reply.error;
  const json completion = Json(reply);
  EXPECT_EQ(completion["object"], "text_completion");
  EXPECT_EQ(completion["id"].get<std::string>().rfind("cmpl-", 0), 0u) << completion["id"];
  EXPECT_EQ(completion["model"], "v3_plain");
  EXPECT_GT(completion["created"].get<int64_t>(), 1700000000);
  ASSERT_EQ(completion["choices"].size(), 1u);
  const json& choice = completion["choices"][0];
  EXPECT_EQ(TokenIds(choice), WorkerGreedyTokens());
  EXPECT_EQ(choice["finish_reason"], "length");
  EXPECT_TRUE(choice["logprobs"].is_null());
  EXPECT_EQ(completion["usage"]["prompt_tokens"], kPrompt.size());
  EXPECT_EQ(completion["usage"]["completion_tokens"], kMaxTokens);
  EXPECT_EQ(completion["usage"]["total_tokens"], kPrompt.size() + kMaxTokens);
}

TEST_F(RouterHttpTest, CompletionWithoutModelUsesTheOnlyOneAndReturnsLogprobs) {
  json body = GreedyBody();
  body.erase("model");
  body["logprobs"] = 2;
  const HttpReply reply = Post("/v1/completions", body.dump());
  ASSERT_EQ(reply.status, 200) << reply.body << reply.error;
  const json completion = Json(reply);
  EXPECT_EQ(completion["model"], "v3_plain");
  const json& logprobs = completion["choices"][0]["logprobs"];
  ASSERT_EQ(logprobs["tokens"].size(), kMaxTokens) << logprobs;
  ASSERT_EQ(logprobs["token_logprobs"].size(), kMaxTokens);
  ASSERT_EQ(logprobs["top_logprobs"].size(), kMaxTokens);
  const std::vector<uint32_t> tokens = TokenIds(completion["choices"][0]);
  EXPECT_EQ(logprobs["tokens"][0], "token_id:" + std::to_string(tokens[0]));
  EXPECT_LE(logprobs["token_logprobs"][0].get<double>(), 0.0);
  EXPECT_EQ(logprobs["top_logprobs"][0].size(), 2u) << logprobs["top_logprobs"][0];
}

TEST_F(RouterHttpTest, StreamedCompletionSendsTheSameTokensThenFinishReasonAndDone) {
  json body = GreedyBody();
  body["stream"] = true;
  const HttpReply reply = Post("/v1/completions", body.dump(), {"-N"});
  ASSERT_EQ(reply.status, 200) << reply.body << reply.error;
  const std::vector<std::string> events = EventData(reply.body);
  ASSERT_GE(events.size(), 3u) << reply.body;
  EXPECT_EQ(events.back(), "[DONE]");
  std::vector<uint32_t> tokens;
  std::string id;
  for (size_t i = 0; i + 1 < events.size(); ++i) {
    const json event = json::parse(events[i]);
    const json& choice = event["choices"][0];
    if (id.empty()) id = event["id"];
    EXPECT_EQ(event["id"], id) << "one id for the whole stream";
    EXPECT_EQ(event["object"], "text_completion");
    EXPECT_FALSE(event.contains("usage")) << "usage was not asked for: " << events[i];
    const std::vector<uint32_t> event_tokens = TokenIds(choice);
    tokens.insert(tokens.end(), event_tokens.begin(), event_tokens.end());
    if (i + 2 < events.size()) {
      EXPECT_TRUE(choice["finish_reason"].is_null()) << events[i];
    } else {
      EXPECT_EQ(choice["finish_reason"], "length") << events[i];
    }
  }
  EXPECT_EQ(tokens, WorkerGreedyTokens());
}

TEST_F(RouterHttpTest, StreamedCompletionEndsWithUsageWhenAsked) {
  json body = GreedyBody();
  body["stream"] = true;
  body["stream_options"] = {{"include_usage", true}};
  const HttpReply reply = Post("/v1/completions", body.dump(), {"-N"});
  ASSERT_EQ(reply.status, 200) << reply.body << reply.error;
  const std::vector<std::string> events = EventData(reply.body);
  ASSERT_GE(events.size(), 2u) << reply.body;
  EXPECT_EQ(events.back(), "[DONE]");
  const json last = json::parse(events[events.size() - 2]);
  EXPECT_EQ(last["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(last["usage"]["prompt_tokens"], kPrompt.size()) << last;
  EXPECT_EQ(last["usage"]["completion_tokens"], kMaxTokens) << last;
  EXPECT_EQ(last["usage"]["total_tokens"], kPrompt.size() + kMaxTokens) << last;
  EXPECT_TRUE(json::parse(events[0])["usage"].is_null()) << events[0];
}

TEST_F(RouterHttpTest, ModelsHealthAndReadiness) {
  const HttpReply models = Get("/v1/models");
  ASSERT_EQ(models.status, 200) << models.body;
  const json list = Json(models);
  EXPECT_EQ(list["object"], "list");
  ASSERT_EQ(list["data"].size(), 1u) << list;
  EXPECT_EQ(list["data"][0]["id"], "v3_plain");
  EXPECT_EQ(list["data"][0]["object"], "model");
  EXPECT_EQ(list["data"][0]["owned_by"], "cohort");

  const HttpReply health = Get("/health");
  EXPECT_EQ(health.status, 200);
  EXPECT_EQ(Json(health)["status"], "ok");
  EXPECT_EQ(Get("/ready").status, 200);
}

TEST_F(RouterHttpTest, ErrorsAreOpenAiErrorBodiesWithTheirStatus) {
  struct Case {
    const char* what;
    const char* path;
    std::string body;
    int status;
    const char* message;  // a part of error.message
  };
  json unknown_model = GreedyBody();
  unknown_model["model"] = "gpt-17";
  json negative_temperature = GreedyBody();
  negative_temperature["temperature"] = -1;
  json streamed_negative_temperature = negative_temperature;
  streamed_negative_temperature["stream"] = true;
  json text_temperature = GreedyBody();
  text_temperature["temperature"] = "hot";
  json text_prompt = GreedyBody();
  text_prompt["prompt"] = "Hello";
  json no_prompt = GreedyBody();
  no_prompt.erase("prompt");
  const json chat = {
      {"model", "v3_plain"},
      {"messages", {{{"role", "system"}, {"content", "Be brief."}}, {{"role", "user"}, {"content", "Hi"}}}}};
  const json chat_without_messages = {{"model", "v3_plain"}, {"max_tokens", 4}};
  const json chat_bad_role = {{"messages", {{{"role", "narrator"}, {"content", "Hi"}}}}};

  const std::vector<Case> cases = {
      {"unknown model", "/v1/completions", unknown_model.dump(), 404, "gpt-17"},
      {"negative temperature", "/v1/completions", negative_temperature.dump(), 400, "temperature"},
      {"negative temperature, streamed", "/v1/completions", streamed_negative_temperature.dump(), 400, "temperature"},
      {"temperature of the wrong type", "/v1/completions", text_temperature.dump(), 400, "temperature"},
      {"malformed JSON", "/v1/completions", R"({"prompt": [1, 2)", 400, "JSON"},
      {"no prompt", "/v1/completions", no_prompt.dump(), 400, "prompt"},
      {"text prompt without a tokenizer", "/v1/completions", text_prompt.dump(), 501, "tokenizer"},
      {"chat without a tokenizer", "/v1/chat/completions", chat.dump(), 501, "tokenizer"},
      {"chat without messages", "/v1/chat/completions", chat_without_messages.dump(), 400, "messages"},
      {"chat with an unknown role", "/v1/chat/completions", chat_bad_role.dump(), 400, "messages[0].role"},
      {"unknown path", "/v1/engines", "{}", 404, "/v1/engines"},
  };
  for (const Case& c : cases) {
    const HttpReply reply = Post(c.path, c.body);
    EXPECT_EQ(reply.status, c.status) << c.what << ": " << reply.body << reply.error;
    const json body = Json(reply);
    ASSERT_TRUE(body.contains("error")) << c.what << ": " << reply.body;
    const json& error = body["error"];
    ASSERT_TRUE(error["message"].is_string()) << c.what << ": " << reply.body;
    EXPECT_NE(error["message"].get<std::string>().find(c.message), std::string::npos) << c.what << ": " << reply.body;
    EXPECT_TRUE(error["type"].is_string()) << c.what << ": " << reply.body;
    EXPECT_TRUE(error.contains("param")) << c.what << ": " << reply.body;
    EXPECT_TRUE(error.contains("code")) << c.what << ": " << reply.body;
  }
  const json type_error = Json(Post("/v1/completions", text_temperature.dump()));
  EXPECT_EQ(type_error["error"]["param"], "temperature") << type_error;
  // The router still serves afterwards.
  EXPECT_EQ(Post("/v1/completions", GreedyBody().dump()).status, 200);
}

// A request whose client hangs up is cancelled, so that the worker frees its KV blocks, whether or
// not it streams and without waiting for the worker: the worker is frozen and answers nothing.
TEST_F(RouterHttpTest, ClientHangingUpCancelsTheRequest) {
  StartRouter({"--metrics-port", "0"});
  worker_->Signal(SIGSTOP);
  for (bool stream : {false, true}) {
    json body = GreedyBody();
    body["stream"] = stream;
    const HttpReply reply = Post("/v1/completions", body.dump(), {"-N", "--max-time", "0.5"});
    EXPECT_EQ(reply.status, 0) << "a frozen worker cannot answer: " << reply.body;
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (RequestsEndedAs("cancelled") < 2 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  worker_->Signal(SIGCONT);
  EXPECT_EQ(RequestsEndedAs("cancelled"), 2) << router_->Log();
  EXPECT_EQ(Post("/v1/completions", GreedyBody().dump()).status, 200);
}

TEST_F(RouterHttpTest, OversizedBodyIsRefusedWith413) {
  testing::TempDir dir;
  const std::string path = dir.Join("body.json");
  {
    std::ofstream out(path);
    out << R"({"prompt": [1], "padding": ")" << std::string(9 << 20, 'x') << R"("})";
  }
  const HttpReply reply =
      Curl({"-H", "Content-Type: application/json", "--data-binary", "@" + path, Url("/v1/completions")});
  EXPECT_EQ(reply.status, 413) << reply.error;
  EXPECT_TRUE(Json(reply).contains("error")) << reply.body;
}

}  // namespace
}  // namespace cohort

namespace cohort {
namespace {

// The demo model has a tokenizer and a DeepSeek-V3 chat template: text and chat work end to end.
TEST(RouterHttpDemoTest, TextCompletionAndChatOnTheDemoModel) {
  auto worker = testing::WorkerProcess::Start(testing::SourcePath("models/cohort-demo"), {});
  ASSERT_NE(worker, nullptr);
  auto router = testing::RouterProcess::Start({worker->address()}, {});
  ASSERT_NE(router, nullptr);
  const std::string base = "http://127.0.0.1:" + std::to_string(router->http_port());
  for (int i = 0; i < 200 && Curl({base + "/ready"}).status != 200; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  const HttpReply text = Curl({"-H", "Content-Type: application/json", "-d",
                               R"({"prompt": "The meaning of life is", "max_tokens": 16, "temperature": 0,
                                   "ignore_eos": true})",
                               base + "/v1/completions"});
  ASSERT_EQ(text.status, 200) << text.body;
  EXPECT_EQ(Json(text)["choices"][0]["text"], " the process of casting.\n\t\t-- Ogden Nash");

  const HttpReply chat = Curl({"-H", "Content-Type: application/json", "-d",
                               R"({"messages": [{"role": "user", "content": "Tell me a joke"}],
                                   "max_tokens": 12, "seed": 1})",
                               base + "/v1/chat/completions"});
  ASSERT_EQ(chat.status, 200) << chat.body;
  const json body = Json(chat);
  EXPECT_EQ(body["object"], "chat.completion");
  EXPECT_EQ(body["choices"][0]["message"]["role"], "assistant");
  EXPECT_TRUE(body["choices"][0]["message"]["content"].is_string());
  EXPECT_GT(body["usage"]["prompt_tokens"].get<int>(), 4);

  const HttpReply streamed = Curl({"-N", "-H", "Content-Type: application/json", "-d",
                                   R"({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5,
                                       "stream": true})",
                                   base + "/v1/chat/completions"});
  ASSERT_EQ(streamed.status, 200) << streamed.body;
  const std::vector<std::string> events = EventData(streamed.body);
  ASSERT_GE(events.size(), 2u);
  EXPECT_EQ(json::parse(events.front())["object"], "chat.completion.chunk");
  EXPECT_EQ(json::parse(events.front())["choices"][0]["delta"]["role"], "assistant");
  EXPECT_EQ(events.back(), "[DONE]");
}

}  // namespace
}  // namespace cohort
