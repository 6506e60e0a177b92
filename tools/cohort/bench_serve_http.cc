// The HTTP transport of `cohort bench serve`: POST /v1/completions with "stream": true on the
// router's OpenAI-style front, read as server-sent events. Plain HTTP/1.1 over blocking sockets, one
// thread and one connection per request (Connection: close), so nothing is shared between requests.
//
// Locking: `mu_` guards the set of open sockets, which CancelAll shuts down; a socket leaves the set
// before it is closed, so a cancel never reaches a reused descriptor. A request remembers the
// cancel epoch it started in, so one whose socket opens after a CancelAll is cancelled too.
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <set>
#include <thread>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "nlohmann/json.hpp"
#include "tools/cohort/bench_serve_client.h"

namespace cohort::bench {
namespace {

using nlohmann::json;

ServerModel Named(const std::string& name) {
  ServerModel model;
  model.name = name;
  return model;
}

absl::StatusCode CodeForHttp(int http_status) {
  switch (http_status) {
    case 400:
      return absl::StatusCode::kInvalidArgument;
    case 404:
      return absl::StatusCode::kNotFound;
    case 429:
      return absl::StatusCode::kResourceExhausted;
    case 499:
      return absl::StatusCode::kCancelled;
    case 501:
      return absl::StatusCode::kUnimplemented;
    case 503:
      return absl::StatusCode::kUnavailable;
    case 504:
      return absl::StatusCode::kDeadlineExceeded;
    default:
      return absl::StatusCode::kInternal;
  }
}

// {"error": {"message": ..., "code": "invalid_argument"}} as a status; `fallback` when it is not one.
absl::Status ErrorFromBody(const std::string& body, absl::StatusCode fallback) {
  const json parsed = json::parse(body, nullptr, /*allow_exceptions=*/false);
  if (parsed.is_object() && parsed.contains("error") && parsed["error"].is_object()) {
    const json& error = parsed["error"];
    std::string message = error.value("message", "");
    static const std::pair<const char*, absl::StatusCode> kCodes[] = {
        {"invalid_argument", absl::StatusCode::kInvalidArgument},
        {"not_found", absl::StatusCode::kNotFound},
        {"resource_exhausted", absl::StatusCode::kResourceExhausted},
        {"unavailable", absl::StatusCode::kUnavailable},
        {"deadline_exceeded", absl::StatusCode::kDeadlineExceeded},
        {"cancelled", absl::StatusCode::kCancelled},
        {"unimplemented", absl::StatusCode::kUnimplemented}};
    absl::StatusCode code = fallback;
    const std::string name = error.contains("code") && error["code"].is_string() ? error["code"].get<std::string>() : "";
    for (const auto& [n, c] : kCodes) {
      if (name == n) code = c;
    }
    return absl::Status(code, message.empty() ? body : message);
  }
  return absl::Status(fallback, body.substr(0, 200));
}

// Decodes a Transfer-Encoding: chunked body as it arrives.
class ChunkedDecoder {
 public:
  // Appends the body bytes in `in` to `out`; false on a malformed chunk header.
  bool Feed(std::string_view in, std::string& out) {
    while (!in.empty() && state_ != State::kDone) {
      if (state_ == State::kSize || state_ == State::kDataEnd) {
        const size_t newline = in.find('\n');
        if (newline == std::string_view::npos) {
          line_.append(in);
          return true;
        }
        line_.append(in.substr(0, newline));
        in.remove_prefix(newline + 1);
        if (state_ == State::kDataEnd) {
          state_ = State::kSize;
        } else {
          const std::string size_field = line_.substr(0, line_.find(';'));
          const absl::string_view size_text = absl::StripAsciiWhitespace(size_field);
          uint64_t size = 0;
          if (!absl::SimpleHexAtoi(size_text, &size)) return false;
          state_ = size == 0 ? State::kDone : State::kData;
          remaining_ = size;
        }
        line_.clear();
      } else {  // kData
        const size_t take = std::min<size_t>(remaining_, in.size());
        out.append(in.substr(0, take));
        in.remove_prefix(take);
        remaining_ -= take;
        if (remaining_ == 0) state_ = State::kDataEnd;
      }
    }
    return true;
  }
  bool done() const { return state_ == State::kDone; }

 private:
  enum class State { kSize, kData, kDataEnd, kDone };
  State state_ = State::kSize;
  std::string line_;
  uint64_t remaining_ = 0;
};

// A response read from a socket: the status line and headers, then the body as it arrives.
class ResponseReader {
 public:
  explicit ResponseReader(int fd) : fd_(fd) {}

  // Reads up to the end of the headers. Errors are UNAVAILABLE (the connection broke).
  absl::Status ReadHead() {
    std::string buffer;
    size_t end;
    while ((end = buffer.find("\r\n\r\n")) == std::string::npos) {
      if (!Receive(buffer)) return absl::UnavailableError("the server closed the connection before answering");
    }
    const std::string head = buffer.substr(0, end);
    pending_ = buffer.substr(end + 4);
    const size_t space = head.find(' ');
    if (head.rfind("HTTP/1.", 0) != 0 || space == std::string::npos ||
        !absl::SimpleAtoi(head.substr(space + 1, 3), &status_)) {
      return absl::UnavailableError(absl::StrCat("not an HTTP response: '", head.substr(0, 40), "'"));
    }
    const std::string lower = absl::AsciiStrToLower(head);
    chunked_ = lower.find("\r\ntransfer-encoding: chunked") != std::string::npos;
    if (size_t at = lower.find("\r\ncontent-length:"); at != std::string::npos) {
      const size_t from = at + 17;
      const std::string field = lower.substr(from, lower.find("\r\n", from) - from);
      uint64_t length = 0;
      if (absl::SimpleAtoi(absl::StripAsciiWhitespace(field), &length)) {
        content_left_ = static_cast<int64_t>(length);
      }
    }
    return absl::OkStatus();
  }

  int status() const { return status_; }

  // Appends the next body bytes to `out`. False at the end of the body (or a broken connection:
  // `broken` says which).
  bool ReadBody(std::string& out, bool& broken) {
    broken = false;
    while (true) {
      if (!pending_.empty()) {
        std::string in;
        in.swap(pending_);
        if (chunked_) {
          if (!decoder_.Feed(in, out)) {
            broken = true;
            return false;
          }
        } else {
          if (content_left_ >= 0) {
            in.resize(std::min<size_t>(in.size(), static_cast<size_t>(content_left_)));
            content_left_ -= static_cast<int64_t>(in.size());
          }
          out += in;
        }
        return true;
      }
      if ((chunked_ && decoder_.done()) || content_left_ == 0) return false;
      if (!Receive(pending_)) {
        broken = chunked_ || content_left_ > 0;
        return false;
      }
    }
  }

  std::string ReadAll() {
    std::string body;
    bool broken;
    while (ReadBody(body, broken)) {
    }
    return body;
  }

 private:
  bool Receive(std::string& buffer) {
    char data[16384];
    ssize_t n;
    do {
      n = recv(fd_, data, sizeof(data), 0);
    } while (n < 0 && errno == EINTR);
    if (n <= 0) return false;
    buffer.append(data, static_cast<size_t>(n));
    return true;
  }

  int fd_;
  int status_ = 0;
  bool chunked_ = false;
  int64_t content_left_ = -1;  // -1: until the connection closes
  std::string pending_;
  ChunkedDecoder decoder_;
};

class HttpTransport final : public Transport {
 public:
  explicit HttpTransport(const TransportOptions& options) : options_(options) {
    const size_t colon = options.target.rfind(':');
    host_ = options.target.substr(0, colon);
    port_ = options.target.substr(colon + 1);
    if (host_.size() > 2 && host_.front() == '[' && host_.back() == ']') host_ = host_.substr(1, host_.size() - 2);
  }

  ~HttpTransport() override {
    // Requests' threads hand their records back before they end; wait for the last to let go of this.
    std::unique_lock<std::mutex> lock(mu_);
    idle_.wait(lock, [&] { return threads_ == 0; });
  }

  absl::StatusOr<ServerModel> Connect(Clock::time_point deadline) override {
    absl::Status last;
    while (true) {
      absl::StatusOr<ServerModel> model = AskModel();
      if (model.ok() || model.status().code() != absl::StatusCode::kUnavailable) return model;
      last = model.status();
      if (Clock::now() + std::chrono::milliseconds(50) >= deadline) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return absl::UnavailableError(absl::StrCat("cannot use ", options_.target, " (HTTP): ", last.message()));
  }

  void Start(const BenchRequest& request, RequestRecord* record, DoneFn done) override {
    json body = {{"max_tokens", request.max_tokens},
                 {"temperature", options_.temperature},
                 {"ignore_eos", options_.ignore_eos},
                 {"stream", true},
                 {"stream_options", {{"include_usage", true}}}};
    if (!options_.model.empty()) body["model"] = options_.model;
    if (request.prompt_text.empty()) {
      body["prompt"] = request.prompt_ids;
    } else {
      body["prompt"] = request.prompt_text;
    }
    uint64_t epoch;
    {
      std::lock_guard<std::mutex> lock(mu_);
      ++threads_;
      epoch = epoch_;
    }
    record->sent = Clock::now();
    std::thread([this, text = body.dump(), record, epoch, done = std::move(done)] {
      Stream(text, epoch, *record);
      record->done = Clock::now();
      done(record);
      std::lock_guard<std::mutex> lock(mu_);
      if (--threads_ == 0) idle_.notify_all();
    }).detach();
  }

  void CancelAll() override {
    std::lock_guard<std::mutex> lock(mu_);
    ++epoch_;
    for (int fd : open_) shutdown(fd, SHUT_RDWR);
  }

 private:
  // A connected socket registered for CancelAll (shut down already when a CancelAll came after
  // `epoch`), or -1 with `error` set.
  int Open(uint64_t epoch, absl::Status& error) {
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* found = nullptr;
    if (int rc = getaddrinfo(host_.c_str(), port_.c_str(), &hints, &found); rc != 0) {
      error = absl::UnavailableError(absl::StrCat("cannot resolve ", host_, ": ", gai_strerror(rc)));
      return -1;
    }
    int fd = -1;
    int connect_errno = 0;
    for (addrinfo* a = found; a != nullptr && fd < 0; a = a->ai_next) {
      fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
      if (fd < 0) continue;
      if (connect(fd, a->ai_addr, a->ai_addrlen) != 0) {
        connect_errno = errno;
        close(fd);
        fd = -1;
      }
    }
    freeaddrinfo(found);
    if (fd < 0) {
      error = absl::UnavailableError(absl::StrCat("cannot connect to ", options_.target, ": ", std::strerror(connect_errno)));
      return -1;
    }
    const int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    std::lock_guard<std::mutex> lock(mu_);
    if (epoch != epoch_) shutdown(fd, SHUT_RDWR);
    open_.insert(fd);
    return fd;
  }

  void Close(int fd) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      open_.erase(fd);
    }
    close(fd);
  }

  // Sends one request; its answer is read by the caller through the reader.
  absl::Status Send(int fd, const std::string& method, const std::string& path, const std::string& body) {
    std::string message = absl::StrCat(method, " ", path, " HTTP/1.1\r\nHost: ", options_.target,
                                       "\r\nAccept: text/event-stream, application/json\r\nConnection: close\r\n");
    if (!body.empty()) {
      absl::StrAppend(&message, "Content-Type: application/json\r\nContent-Length: ", body.size(), "\r\n");
    }
    absl::StrAppend(&message, "\r\n", body);
    for (size_t sent = 0; sent < message.size();) {
      const ssize_t n = send(fd, message.data() + sent, message.size() - sent, MSG_NOSIGNAL);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return absl::UnavailableError(absl::StrCat("sending to ", options_.target, " failed: ", std::strerror(errno)));
      sent += static_cast<size_t>(n);
    }
    return absl::OkStatus();
  }

  absl::StatusOr<ServerModel> AskModel() {
    absl::Status error;
    uint64_t epoch;
    {
      std::lock_guard<std::mutex> lock(mu_);
      epoch = epoch_;
    }
    const int fd = Open(epoch, error);
    if (fd < 0) return error;
    ResponseReader reader(fd);
    absl::Status status = Send(fd, "GET", "/v1/models", "");
    if (status.ok()) status = reader.ReadHead();
    const std::string body = status.ok() ? reader.ReadAll() : "";
    Close(fd);
    if (!status.ok()) return status;
    if (reader.status() != 200) return ErrorFromBody(body, CodeForHttp(reader.status()));
    const json parsed = json::parse(body, nullptr, /*allow_exceptions=*/false);
    if (!parsed.is_object() || !parsed.contains("data") || !parsed["data"].is_array()) {
      return absl::InternalError(absl::StrCat(options_.target, "/v1/models is not a model list: ", body.substr(0, 200)));
    }
    std::vector<std::string> names;
    for (const json& m : parsed["data"]) names.push_back(m.value("id", ""));
    if (!options_.model.empty()) {
      if (std::find(names.begin(), names.end(), options_.model) != names.end()) return Named(options_.model);
      if (names.empty()) return absl::UnavailableError("no model listed yet");
      return absl::NotFoundError(absl::StrCat("model '", options_.model, "' is not served; ", options_.target,
                                              " serves ", absl::StrJoin(names, ", ")));
    }
    if (names.empty()) return absl::UnavailableError("no model listed yet");
    if (names.size() > 1) {
      return absl::InvalidArgumentError(absl::StrCat(options_.target, " serves ", absl::StrJoin(names, ", "), ": pass --model"));
    }
    return Named(names[0]);
  }

  // Runs one streamed completion, filling `record` (all but `done`).
  void Stream(const std::string& body, uint64_t epoch, RequestRecord& record) {
    absl::Status error;
    const int fd = Open(epoch, error);
    if (fd < 0) {
      record.status = error;
      return;
    }
    ResponseReader reader(fd);
    record.status = Send(fd, "POST", "/v1/completions", body);
    if (record.status.ok()) record.status = reader.ReadHead();
    if (record.status.ok() && reader.status() != 200) {
      record.status = ErrorFromBody(reader.ReadAll(), CodeForHttp(reader.status()));
    } else if (record.status.ok()) {
      record.status = ReadEvents(reader, record);
    }
    Close(fd);
    bool cancelled;
    {
      std::lock_guard<std::mutex> lock(mu_);
      cancelled = epoch != epoch_;
    }
    if (cancelled && !record.status.ok()) record.status = absl::CancelledError("cancelled by the benchmark");
  }

  static absl::Status ReadEvents(ResponseReader& reader, RequestRecord& record) {
    std::string events;
    bool broken = false;
    while (reader.ReadBody(events, broken)) {
      const Clock::time_point now = Clock::now();
      size_t end;
      while ((end = events.find("\n\n")) != std::string::npos) {
        const std::string event = events.substr(0, end);
        events.erase(0, end + 2);
        if (event.rfind("data: ", 0) != 0) continue;
        const absl::string_view data = absl::string_view(event).substr(6);
        if (data == "[DONE]") return record.usage_completion_tokens >= 0
                                         ? absl::OkStatus()
                                         : absl::DataLossError("the stream ended without usage");
        const json parsed = json::parse(data.begin(), data.end(), nullptr, /*allow_exceptions=*/false);
        if (!parsed.is_object()) return absl::DataLossError(absl::StrCat("an event is not JSON: ", data.substr(0, 100)));
        if (parsed.contains("error")) return ErrorFromBody(std::string(data), absl::StatusCode::kUnknown);
        if (parsed.contains("choices") && parsed["choices"].is_array() && !parsed["choices"].empty()) {
          const json& choice = parsed["choices"][0];
          const int32_t n = choice.contains("token_ids") ? static_cast<int32_t>(choice["token_ids"].size()) : 0;
          if (n > 0) {
            record.arrivals.push_back({now, n});
            record.output_tokens += n;
          }
        }
        if (parsed.contains("usage") && parsed["usage"].is_object()) {
          const json& usage = parsed["usage"];
          record.usage_completion_tokens = usage.value("completion_tokens", int64_t{0});
          if (record.prompt_tokens == 0) record.prompt_tokens = usage.value("prompt_tokens", int64_t{0});
          if (usage.contains("prompt_tokens_details") && usage["prompt_tokens_details"].is_object()) {
            record.cached_prompt_tokens = usage["prompt_tokens_details"].value("cached_tokens", int64_t{0});
          }
        }
      }
    }
    return absl::UnavailableError(broken ? "the connection broke mid-stream" : "the stream ended before [DONE]");
  }

  const TransportOptions options_;
  std::string host_;
  std::string port_;
  std::mutex mu_;
  std::condition_variable idle_;
  std::set<int> open_;   // guarded by mu_
  int threads_ = 0;      // guarded by mu_
  uint64_t epoch_ = 0;   // guarded by mu_; CancelAll calls so far
};

}  // namespace

std::unique_ptr<Transport> CreateHttpTransport(const TransportOptions& options) {
  return std::make_unique<HttpTransport>(options);
}

}  // namespace cohort::bench
