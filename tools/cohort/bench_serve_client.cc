// The gRPC transports of `cohort bench serve`: one reactor per stream on gRPC's callback API.
//
// Locking: `mu_` guards the set of live calls only; it is never held while calling into gRPC.
#include "tools/cohort/bench_serve_client.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <thread>
#include <unordered_map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "cohort/v1/inference.grpc.pb.h"
#include "cohort/worker/v1/worker.grpc.pb.h"

namespace cohort::bench {
namespace {

using cohort::v1::GenerateRequest;
using cohort::v1::GenerateResponse;

absl::Status FromGrpc(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
}

GenerateRequest ToProto(const TransportOptions& options, const BenchRequest& request) {
  GenerateRequest proto;
  proto.set_model(options.model);
  if (request.prompt_text.empty()) {
    proto.mutable_token_ids()->mutable_ids()->Assign(request.prompt_ids.begin(), request.prompt_ids.end());
  } else {
    proto.set_text(request.prompt_text);
  }
  proto.mutable_sampling()->set_temperature(static_cast<float>(options.temperature));
  proto.mutable_stopping()->set_max_tokens(static_cast<uint32_t>(request.max_tokens));
  proto.mutable_stopping()->set_ignore_eos(options.ignore_eos);
  return proto;
}

class GrpcTransport;

// One Generate stream; deletes itself after gRPC is done with it and the record is handed back.
class GrpcStream final : public grpc::ClientReadReactor<GenerateResponse> {
 public:
  GrpcStream(GrpcTransport* transport, RequestRecord* record, Transport::DoneFn done,
             std::shared_ptr<grpc::ClientContext> context)
      : transport_(transport), record_(record), done_(std::move(done)), context_(std::move(context)) {}

  template <typename Stub>
  void Begin(Stub& stub, const GenerateRequest& request) {
    request_ = request;
    stub.async()->Generate(context_.get(), &request_, this);
    StartRead(&response_);
    StartCall();
  }

  void OnReadDone(bool ok) override {
    if (!ok) return;  // the stream ended; OnDone follows
    const Clock::time_point now = Clock::now();
    if (response_.has_chunk()) {
      const int32_t n = response_.chunk().token_ids_size();
      if (n > 0) {
        record_->arrivals.push_back({now, n});
        record_->output_tokens += n;
      }
    } else if (response_.has_final()) {
      const cohort::v1::Usage& usage = response_.final().usage();
      record_->usage_completion_tokens = usage.completion_tokens();
      record_->cached_prompt_tokens = usage.cached_prompt_tokens();
      if (record_->prompt_tokens == 0) record_->prompt_tokens = usage.prompt_tokens();
    }
    StartRead(&response_);
  }

  void OnDone(const grpc::Status& status) override;

 private:
  GrpcTransport* transport_;
  RequestRecord* record_;
  Transport::DoneFn done_;
  std::shared_ptr<grpc::ClientContext> context_;  // shared with CancelAll, which may outlive the stream
  GenerateRequest request_;
  GenerateResponse response_;
};

class GrpcTransport final : public Transport {
 public:
  explicit GrpcTransport(const TransportOptions& options) : options_(options) {
    for (int i = 0; i < std::max(1, options.channels); ++i) {
      grpc::ChannelArguments args;
      args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);  // a connection of its own per channel
      args.SetInt("cohort.bench.channel", i);
      channels_.push_back(grpc::CreateCustomChannel(options.target, grpc::InsecureChannelCredentials(), args));
      if (options.api == Api::kWorker) {
        worker_stubs_.push_back(cohort::worker::v1::Worker::NewStub(channels_.back()));
      } else {
        stubs_.push_back(cohort::v1::Inference::NewStub(channels_.back()));
      }
    }
  }

  absl::StatusOr<ServerModel> Connect(Clock::time_point deadline) override {
    const auto system_deadline =
        std::chrono::system_clock::now() + std::chrono::duration_cast<std::chrono::system_clock::duration>(
                                                deadline - Clock::now());
    for (const auto& channel : channels_) {
      if (!channel->WaitForConnected(system_deadline)) {
        return absl::UnavailableError(absl::StrCat("cannot connect to ", options_.target,
                                                   " (gRPC): is the server running and the address right?"));
      }
    }
    // A router answers once it has a worker's first load report; until then, ask again.
    absl::Status last;
    while (true) {
      absl::StatusOr<ServerModel> model = AskModel(system_deadline);
      if (model.ok() || model.status().code() != absl::StatusCode::kUnavailable) return model;
      last = model.status();
      if (Clock::now() + std::chrono::milliseconds(50) >= deadline) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return absl::UnavailableError(
        absl::StrCat(options_.target, " is up but serves no model yet (", last.message(), ")"));
  }

  void Start(const BenchRequest& request, RequestRecord* record, DoneFn done) override {
    auto context = std::make_shared<grpc::ClientContext>();
    if (options_.request_timeout_s > 0) {
      context->set_deadline(std::chrono::system_clock::now() +
                            std::chrono::milliseconds(static_cast<int64_t>(options_.request_timeout_s * 1000)));
    }
    auto* stream = new GrpcStream(this, record, std::move(done), context);
    const size_t channel = next_channel_++ % channels_.size();
    {
      std::lock_guard<std::mutex> lock(mu_);
      live_.emplace(stream, std::move(context));
    }
    const GenerateRequest proto = ToProto(options_, request);
    record->sent = Clock::now();
    if (options_.api == Api::kWorker) {
      stream->Begin(*worker_stubs_[channel], proto);
    } else {
      stream->Begin(*stubs_[channel], proto);
    }
  }

  void CancelAll() override {
    std::vector<std::shared_ptr<grpc::ClientContext>> contexts;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (const auto& [stream, context] : live_) contexts.push_back(context);
    }
    for (const auto& context : contexts) context->TryCancel();
  }

  void Forget(GrpcStream* stream) {
    std::lock_guard<std::mutex> lock(mu_);
    live_.erase(stream);
  }

 private:
  absl::StatusOr<ServerModel> AskModel(std::chrono::system_clock::time_point deadline) {
    std::string name = options_.model;
    cohort::v1::ModelInfo info;
    cohort::v1::GetModelInfoRequest request;
    grpc::ClientContext context;
    context.set_deadline(deadline);
    grpc::Status status;
    if (options_.api == Api::kWorker) {
      request.set_model(name);
      status = worker_stubs_[0]->GetModelInfo(&context, request, &info);
    } else {
      if (name.empty()) {
        grpc::ClientContext list_context;
        list_context.set_deadline(deadline);
        cohort::v1::ListModelsResponse models;
        status = stubs_[0]->ListModels(&list_context, {}, &models);
        if (status.error_code() == grpc::StatusCode::UNIMPLEMENTED) return WrongService();
        if (!status.ok()) return FromGrpc(status);
        if (models.models_size() == 0) return absl::UnavailableError("no model listed");
        if (models.models_size() > 1) {
          std::vector<std::string> names;
          for (const auto& m : models.models()) names.push_back(m.name());
          return absl::InvalidArgumentError(
              absl::StrCat(options_.target, " serves ", absl::StrJoin(names, ", "), ": pass --model"));
        }
        name = models.models(0).name();
      }
      request.set_model(name);
      status = stubs_[0]->GetModelInfo(&context, request, &info);
    }
    if (status.error_code() == grpc::StatusCode::UNIMPLEMENTED) return WrongService();
    if (!status.ok()) return FromGrpc(status);
    return ServerModel{.name = info.name().empty() ? name : info.name(),
                       .vocab_size = info.vocab_size(),
                       .max_context_tokens = info.max_context_tokens(),
                       .architecture = info.architecture(),
                       .total_parameters = info.total_parameters(),
                       .active_parameters_per_token = info.active_parameters_per_token()};
  }

  // The target serves the other API: a worker asked as a router, or the other way round.
  absl::Status WrongService() const {
    return absl::FailedPreconditionError(absl::StrCat(
        options_.target, " does not serve ",
        options_.api == Api::kWorker ? "cohort.worker.v1.Worker (a worker): for a router, leave out --api worker"
                                     : "cohort.v1.Inference (a router): for a worker directly, pass --api worker"));
  }

  const TransportOptions options_;
  std::vector<std::shared_ptr<grpc::Channel>> channels_;
  std::vector<std::unique_ptr<cohort::v1::Inference::Stub>> stubs_;
  std::vector<std::unique_ptr<cohort::worker::v1::Worker::Stub>> worker_stubs_;
  std::atomic<uint64_t> next_channel_{0};
  std::mutex mu_;
  std::unordered_map<GrpcStream*, std::shared_ptr<grpc::ClientContext>> live_;  // guarded by mu_
};

void GrpcStream::OnDone(const grpc::Status& status) {
  record_->done = Clock::now();
  record_->status = FromGrpc(status);
  transport_->Forget(this);
  RequestRecord* record = record_;
  Transport::DoneFn done = std::move(done_);
  delete this;
  done(record);
}

}  // namespace

absl::StatusOr<Api> ParseApi(absl::string_view name) {
  if (name == "grpc") return Api::kGrpc;
  if (name == "worker") return Api::kWorker;
  if (name == "http") return Api::kHttp;
  return absl::InvalidArgumentError(absl::StrCat("--api: '", name, "' is not grpc, worker or http"));
}

const char* ApiName(Api api) {
  switch (api) {
    case Api::kGrpc:
      return "grpc";
    case Api::kWorker:
      return "worker";
    case Api::kHttp:
      return "http";
  }
  return "";
}

std::unique_ptr<Transport> CreateGrpcTransport(const TransportOptions& options) {
  return std::make_unique<GrpcTransport>(options);
}

absl::StatusOr<std::unique_ptr<Transport>> Transport::Create(const TransportOptions& options) {
  if (options.target.empty() || options.target.find(':') == std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat("--target: '", options.target, "' is not host:port"));
  }
  if (options.channels < 1) return absl::InvalidArgumentError("--channels must be at least 1");
  return options.api == Api::kHttp ? CreateHttpTransport(options) : CreateGrpcTransport(options);
}

}  // namespace cohort::bench
