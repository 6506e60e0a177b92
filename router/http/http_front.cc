#include "router/http/http_front.h"

#include <httplib.h>

#include <optional>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "router/http/client_socket.h"
#include "router/http/generation_queue.h"
#include "router/http/openai_request.h"
#include "router/http/openai_response.h"

namespace cohort {
namespace {

using nlohmann::json;
using nlohmann::ordered_json;

int64_t UnixSeconds() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// Invalid UTF-8 is replaced rather than thrown on: the text comes from the model.
std::string Dump(const ordered_json& value) { return value.dump(-1, ' ', false, json::error_handler_t::replace); }

void SendJson(httplib::Response& res, int http_status, const ordered_json& body) {
  res.status = http_status;
  res.set_content(Dump(body) + "\n", "application/json");
}

void SendError(httplib::Response& res, const absl::Status& status) {
  const int http_status = HttpStatusFor(status.code());
  SendJson(res, http_status, ErrorBody(http_status, status));
}

absl::Status FromGrpc(const grpc::Status& status) {
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
}

std::string Event(const ordered_json& data) { return absl::StrCat("data: ", Dump(data), "\n\n"); }

absl::StatusOr<json> ParseBody(const httplib::Request& req) {
  try {
    return json::parse(req.body);
  } catch (const json::parse_error& e) {
    return absl::InvalidArgumentError(absl::StrCat("the request body is not valid JSON: ", e.what()));
  }
}

absl::Status ShuttingDown() { return absl::UnavailableError("the router is shutting down"); }

}  // namespace

// Counts one open generation for Shutdown's drain.
class HttpFront::InFlight {
 public:
  // None once the front drains.
  static std::unique_ptr<InFlight> Admit(HttpFront& front) {
    std::lock_guard<std::mutex> lock(front.mu_);
    if (front.draining_) return nullptr;
    ++front.in_flight_;
    return std::unique_ptr<InFlight>(new InFlight(front));
  }
  ~InFlight() {
    {
      std::lock_guard<std::mutex> lock(front_.mu_);
      --front_.in_flight_;
    }
    front_.idle_.notify_all();
  }

 private:
  explicit InFlight(HttpFront& front) : front_(front) {}
  HttpFront& front_;
};

// One generation request, shared by its handler, its stream's content provider and the provider's
// releaser. Only the thread serving the request's connection touches it, one after the other.
struct HttpFront::Generation {
  Generation(CompletionHeader header, const CompletionRequest& request, ClientSocket client,
             const std::atomic<bool>& stopping, std::chrono::milliseconds hangup_check,
             std::unique_ptr<InFlight> in_flight)
      : completion(std::move(header), request.generate.has_top_logprobs(), request.include_usage),
        client(client),
        stopping(stopping),
        hangup_check(hangup_check),
        in_flight(std::move(in_flight)) {}

  // The next responses, or none after cancelling the generation because the client hung up or
  // the front is stopping.
  std::optional<GenerationQueue::Batch> Next() {
    if (first) return std::exchange(first, std::nullopt);
    while (true) {
      if (client.HungUp() || stopping) {
        handle->Cancel();
        return std::nullopt;
      }
      GenerationQueue::Batch batch = queue->Wait(hangup_check);
      if (!batch.responses.empty() || batch.done) return batch;
    }
  }

  // Content provider of a stream: writes the next events, and ends the stream after the last.
  bool WriteEvents(httplib::DataSink& sink) {
    std::optional<GenerationQueue::Batch> batch = Next();
    if (!batch) return false;
    std::string events;
    for (const cohort::v1::GenerateResponse& response : batch->responses) events += Event(completion.Add(response));
    if (batch->done) {
      if (!batch->done->ok()) {
        const absl::Status error = FromGrpc(*batch->done);
        events += Event(ErrorBody(HttpStatusFor(error.code()), error));
      }
      events += "data: [DONE]\n\n";
    }
    if (!sink.write(events.data(), events.size())) {
      handle->Cancel();  // the client is gone
      return false;
    }
    if (batch->done) sink.done();
    return true;
  }

  const std::shared_ptr<GenerationQueue> queue = std::make_shared<GenerationQueue>();
  std::shared_ptr<GenerationHandle> handle;
  CompletionBuilder completion;
  const ClientSocket client;
  const std::atomic<bool>& stopping;
  const std::chrono::milliseconds hangup_check;
  std::optional<GenerationQueue::Batch> first;  // read before the stream's headers, written first
  const std::unique_ptr<InFlight> in_flight;
};

absl::StatusOr<std::unique_ptr<HttpFront>> HttpFront::Create(Dispatcher& dispatcher, const HttpFrontOptions& options) {
  std::unique_ptr<HttpFront> front(new HttpFront(dispatcher, options));
  front->Route();
  httplib::Server& server = *front->server_;
  // cpp-httplib binds with SO_REUSEPORT, as gRPC does: routers on one host may share the port.
  front->port_ = options.port == 0 ? server.bind_to_any_port(options.host)
                                   : (server.bind_to_port(options.host, options.port) ? options.port : -1);
  if (front->port_ <= 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen for HTTP on ", options.host, ":", options.port, " (port in use? see --http-port)"));
  }
  front->listener_ = std::thread([&server] { server.listen_after_bind(); });
  // stop() is a no-op until the accept loop runs: wait for it so that Shutdown always stops it.
  while (!server.is_running()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  return front;
}

HttpFront::HttpFront(Dispatcher& dispatcher, const HttpFrontOptions& options)
    : dispatcher_(dispatcher),
      options_(options),
      started_(UnixSeconds()),
      server_(std::make_unique<httplib::Server>()) {}

HttpFront::~HttpFront() { Shutdown(std::chrono::system_clock::now()); }

void HttpFront::Shutdown(std::chrono::system_clock::time_point deadline) {
  {
    std::unique_lock<std::mutex> lock(mu_);
    if (shut_down_) return;
    shut_down_ = true;
    draining_ = true;
    idle_.wait_until(lock, deadline, [this] { return in_flight_ == 0; });
  }
  stopping_ = true;  // the requests left cancel within hangup_check
  server_->stop();
  if (listener_.joinable()) listener_.join();  // after the connections' threads are done
}

void HttpFront::Route() {
  httplib::Server& s = *server_;
  const int threads = options_.threads;
  s.new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
  s.set_payload_max_length(options_.max_body_bytes);

  s.Get("/health", [](const httplib::Request&, httplib::Response& res) { SendJson(res, 200, {{"status", "ok"}}); });
  s.Get("/ready", [this](const httplib::Request&, httplib::Response& res) { Ready(res); });
  s.Get("/v1/models", [this](const httplib::Request&, httplib::Response& res) { Models(res); });
  s.Post("/v1/completions", [this](const httplib::Request& req, httplib::Response& res) { Completions(req, res); });
  s.Post("/v1/chat/completions",
         [this](const httplib::Request& req, httplib::Response& res) { ChatCompletions(req, res); });

  // Called for every status >= 400; the handlers' own errors already have a body.
  const size_t max_body_bytes = options_.max_body_bytes;
  s.set_error_handler(httplib::Server::HandlerWithResponse([max_body_bytes](const httplib::Request& req,
                                                                            httplib::Response& res) {
    if (!res.body.empty()) return httplib::Server::HandlerResponse::Unhandled;
    absl::Status error;
    if (res.status == 404) {
      error = absl::NotFoundError(absl::StrCat("no route for ", req.method, " ", req.path,
                                               "; this server has POST /v1/completions, POST "
                                               "/v1/chat/completions, GET /v1/models, /health and /ready"));
    } else if (res.status == 413) {
      error = absl::InvalidArgumentError(absl::StrCat("the request body is larger than ", max_body_bytes, " bytes"));
    } else if (res.status < 500) {
      error = absl::InvalidArgumentError("malformed HTTP request");
    } else {
      error = absl::InternalError(absl::StrCat("HTTP ", res.status));
    }
    const int http_status = res.status;
    SendJson(res, http_status, ErrorBody(http_status, error));
    return httplib::Server::HandlerResponse::Handled;
  }));
  s.set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr exception) {
    std::string what = "unknown exception";
    try {
      std::rethrow_exception(exception);
    } catch (const std::exception& e) {
      what = e.what();
    } catch (...) {
    }
    SendError(res, absl::InternalError(absl::StrCat("the router failed to serve the request: ", what)));
  });
}

void HttpFront::Models(httplib::Response& res) {
  ordered_json data = ordered_json::array();
  for (const std::string& model : dispatcher_.pool().Models()) {
    data.push_back({{"id", model}, {"object", "model"}, {"created", started_}, {"owned_by", "cohort"}});
  }
  SendJson(res, 200, {{"object", "list"}, {"data", std::move(data)}});
}

void HttpFront::Ready(httplib::Response& res) {
  int ready_workers = 0;
  for (const WorkerStatus& w : dispatcher_.pool().Statuses()) ready_workers += w.ready && !w.ejected;
  bool draining;
  {
    std::lock_guard<std::mutex> lock(mu_);
    draining = draining_;
  }
  const char* status = draining ? "shutting_down" : ready_workers > 0 ? "ready" : "no_ready_worker";
  SendJson(res, !draining && ready_workers > 0 ? 200 : 503, {{"status", status}, {"ready_workers", ready_workers}});
}

void HttpFront::Completions(const httplib::Request& req, httplib::Response& res) {
  absl::StatusOr<json> body = ParseBody(req);
  if (!body.ok()) return SendError(res, body.status());
  absl::StatusOr<CompletionRequest> request = ParseCompletionRequest(*body);
  if (!request.ok()) return SendError(res, request.status());
  Generate(req, res, *std::move(request));
}

void HttpFront::ChatCompletions(const httplib::Request& req, httplib::Response& res) {
  absl::StatusOr<json> body = ParseBody(req);
  if (!body.ok()) return SendError(res, body.status());
  absl::StatusOr<ChatRequest> request = ParseChatRequest(*body);
  if (!request.ok()) return SendError(res, request.status());
  // The worker renders the messages in the model's chat format and tokenizes them.
  CompletionRequest completion = std::move(request->options);
  completion.chat = true;
  for (const ChatMessage& m : request->messages) {
    auto* message = completion.generate.mutable_chat()->add_messages();
    message->set_role(m.role);
    message->set_content(m.content);
  }
  Generate(req, res, std::move(completion));
}

void HttpFront::Generate(const httplib::Request& req, httplib::Response& res, CompletionRequest request) {
  std::unique_ptr<InFlight> in_flight = InFlight::Admit(*this);
  if (in_flight == nullptr) return SendError(res, ShuttingDown());

  CompletionHeader header{
      .id = NewCompletionId(), .created = UnixSeconds(), .model = request.generate.model(), .chat = request.chat};
  if (header.model.empty()) {  // the only model served, which the Dispatcher picks too
    const std::set<std::string> models = dispatcher_.pool().Models();
    if (models.size() == 1) header.model = *models.begin();
  }
  request.generate.set_request_id(req.has_header("X-Request-Id") ? req.get_header_value("X-Request-Id") : header.id);
  auto generation = std::make_shared<Generation>(std::move(header), request,
                                                 ClientSocket::Find(req.remote_addr, req.remote_port, req.local_port),
                                                 stopping_, options_.hangup_check, std::move(in_flight));
  generation->handle =
      dispatcher_.Generate(request.generate, generation->queue, std::chrono::system_clock::time_point::max());

  // The status line goes out first: a stream starts once the first response shows that the
  // request was accepted, so that errors found before any token keep their HTTP status.
  std::optional<GenerationQueue::Batch> batch = generation->Next();
  if (request.stream && batch && (!batch->responses.empty() || batch->done->ok())) {
    generation->first = std::move(batch);
    res.set_header("Cache-Control", "no-cache");
    res.set_chunked_content_provider(
        "text/event-stream",
        [generation](size_t /*offset*/, httplib::DataSink& sink) { return generation->WriteEvents(sink); },
        [generation](bool success) {
          if (!success) generation->handle->Cancel();  // the client left or the server stopped mid-stream
        });
    return;
  }
  for (; batch; batch = generation->Next()) {
    for (const cohort::v1::GenerateResponse& response : batch->responses) generation->completion.Add(response);
    if (!batch->done) continue;
    if (!batch->done->ok()) return SendError(res, FromGrpc(*batch->done));
    return SendJson(res, 200, generation->completion.Completion());
  }
  SendError(res, stopping_ ? ShuttingDown() : absl::CancelledError("the client closed the connection"));
}

}  // namespace cohort
