// cohort-worker: serves one model on this node's devices over gRPC (worker.proto), with continuous
// batching over a paged KV cache. See --help.
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/flags.h"
#include "common/program.h"
#include "common/server_start.h"
#include "common/status.h"
#include "nlohmann/json.hpp"
#include "spdlog/spdlog.h"
#include "worker/model/cpu/measure_peaks.h"
#include "worker/model/engine.h"
#include "worker/group/group.h"
#include "worker/model/synthetic.h"
#include "worker/server/engine_loop.h"
#include "worker/server/load_publisher.h"
#include "worker/server/metrics.h"
#include "worker/server/worker_service.h"

#ifdef COHORT_HAVE_CUDA
#include "worker/model/cuda/cuda_engine.h"
#include "worker/model/cuda/nccl_api.h"
#endif

namespace cohort {
namespace {

struct WorkerFlags {
  std::string model;
  std::string model_name;
  std::string host = "0.0.0.0";
  int port = 50061;
  int metrics_port = 9091;
  std::string port_file;
  std::string device = "cpu";
  int kv_block_size = 16;
  int64_t kv_cache_bytes = int64_t{1} << 30;
  bool kv_cache_bytes_given = false;  // on the command line; else the cuda backend sizes the cache
  double gpu_memory_fraction = 0.90;
  int gpu = 0;
  int gpus = 1;
  // A worker whose GPUs span processes: rank 0 serves the group; the other ranks join it.
  int world_size = 1;
  int group_port = 50070;
  std::string group_leader;
  int rank = 0;
  int64_t num_layers = 0;
  int max_batch_tokens = 2048;
  int max_running = 256;
  int max_queue = 1024;
  bool prefix_caching = true;
  std::string scheduler = "continuous";
  double drain_timeout_s = 30;
  std::string worker_id;
  int threads = 0;
  std::string log_level = "info";
  // Batching economics (worker/server/metrics.h).
  double gpu_hour_cost = 3.0;               // dollars per device-hour
  double peak_memory_bandwidth_gbs = 4800;  // H200
  double peak_tflops = 989;                 // H200, dense bf16
  bool peak_memory_bandwidth_given = false;  // on the command line; else the host backends measure it
  bool peak_tflops_given = false;
};

// SIGTERM and SIGINT are turned into a flag the main thread polls; nothing else runs in the handler.
volatile std::sig_atomic_t g_signal = 0;
void OnSignal(int signal) { g_signal = signal; }

// The peak rates the economics metrics are fractions of: the flags (H200 defaults) on a device
// backend; on the host backends (cpu, null) measured here unless both flags were given. Call after
// the engine is created, so the measurement uses its threads.
DevicePeaks ResolvePeaks(const WorkerFlags& f) {
  DevicePeaks peaks{.memory_bandwidth_bytes_per_s = f.peak_memory_bandwidth_gbs * 1e9,
                    .flops_per_s = f.peak_tflops * 1e12};
  const bool host = f.device == "cpu" || f.device == "null";
  if (host && !(f.peak_memory_bandwidth_given && f.peak_tflops_given)) {
    const cpu::MeasuredPeaks measured = cpu::MeasureCpuPeaks();
    if (!f.peak_memory_bandwidth_given) {
      peaks.memory_bandwidth_bytes_per_s = measured.peaks.memory_bandwidth_bytes_per_s;
    }
    if (!f.peak_tflops_given) peaks.flops_per_s = measured.peaks.flops_per_s;
    spdlog::info("measured this machine on {} threads in {:.2f} s: {:.1f} GB/s memory read, {:.1f} GFLOP/s float32 "
                 "(--peak-memory-bandwidth and --peak-tflops override)",
                 measured.threads, measured.seconds, measured.peaks.memory_bandwidth_bytes_per_s / 1e9,
                 measured.peaks.flops_per_s / 1e9);
  }
  spdlog::info("economics: peaks {:.4g} GB/s and {:.4g} TFLOP/s, ${:.2f} per device-hour",
               peaks.memory_bandwidth_bytes_per_s / 1e9, peaks.flops_per_s / 1e12, f.gpu_hour_cost);
  return peaks;
}

EngineOptions EngineOptionsFrom(const WorkerFlags& f) {
  EngineOptions engine_options;
  engine_options.model_dir = f.model;
  engine_options.device = f.device;
  engine_options.kv_block_size = f.kv_block_size;
  // On a GPU the cache takes what --gpu-memory-fraction leaves unless its size was given.
  engine_options.kv_cache_bytes = f.device == "cuda" && !f.kv_cache_bytes_given ? 0 : f.kv_cache_bytes;
  engine_options.num_threads = f.threads;
  engine_options.gpu_memory_fraction = f.gpu_memory_fraction;
  engine_options.device_id = f.gpu;
  engine_options.num_gpus = f.gpus;
  engine_options.num_layers = f.num_layers;
  engine_options.max_batch_tokens = f.max_batch_tokens;
  engine_options.max_sequences = f.max_running;
  return engine_options;
}

std::string ModelName(const WorkerFlags& f) {
  if (!f.model_name.empty()) return f.model_name;
  return IsSyntheticModel(f.model) ? f.model.substr(kSyntheticPrefix.size())
                                   : std::filesystem::path(f.model).lexically_normal().filename().string();
}

// A follower rank (--group-leader): joins rank 0 and runs, with this process's GPU, the commands it
// sends until rank 0 ends the group. It serves no clients.
absl::Status Follow(const WorkerFlags& f) {
#ifdef COHORT_HAVE_CUDA
  EngineOptions options = EngineOptionsFrom(f);
  COHORT_ASSIGN_OR_RETURN(const cuda::NcclApi* nccl, cuda::NcclApi::Load());
  std::unique_ptr<cuda::ShardEngine> engine;
  spdlog::info("group: rank {} joining rank 0 at {}", f.rank, f.group_leader);
  auto run = [&](const Welcome& welcome, const Command& command) -> std::optional<CommandDone> {
    CommandDone done;
    absl::Status status;
    if (command.has_prepare()) {
      // Rank 0's settings, so that every rank sizes its buffers and graphs alike.
      ApplySettings(welcome.settings(), options);
      absl::StatusOr<ModelConfig> config = cuda::CudaModelConfig(options);
      status = config.status();
      if (config.ok()) {
        auto prepared =
            cuda::ShardEngine::Prepare(*config, options, f.rank, static_cast<int>(welcome.world_size()), f.gpu);
        status = prepared.status();
        if (prepared.ok()) {
          engine = std::move(prepared).value();
          done.set_kv_blocks(engine->kv_geometry().num_blocks);
        }
      }
    } else if (engine == nullptr) {
      status = absl::FailedPreconditionError("rank 0 sent a command before the weights were loaded");
    } else if (command.has_start()) {
      ncclUniqueId id;
      if (welcome.nccl_unique_id().size() != sizeof(id.internal)) {
        status = absl::InvalidArgumentError("rank 0 sent an NCCL id of the wrong size");
      } else {
        std::copy_n(welcome.nccl_unique_id().data(), sizeof(id.internal), id.internal);
        status = engine->Start(nccl, &id);
      }
    } else if (command.has_step()) {
      const auto& step = command.step();
      std::vector<SequenceStep> part;
      for (const auto& seq : step.sequences()) {
        part.push_back({{seq.tokens().data(), static_cast<size_t>(seq.tokens_size())},
                        seq.start_position(),
                        {seq.block_table().data(), static_cast<size_t>(seq.block_table_size())},
                        seq.compute_logits()});
      }
      const cuda::ShardStep shard{static_cast<int>(step.rows()), step.decode_graph(),
                                  {step.tokens_per_rank().data(), static_cast<size_t>(step.tokens_per_rank_size())},
                                  {}};
      status = engine->ForwardAndSampleShard(part, shard, {}, {});
      done.set_routed_expert_reads(engine->last_step_stats().routed_expert_reads);
    }
    if (!status.ok()) spdlog::error("group: rank {}: {}", f.rank, std::string(status.message()));
    done.set_code(static_cast<int32_t>(status.code()));
    done.set_message(std::string(status.message()));
    return done;
  };
  COHORT_RETURN_IF_ERROR(RunFollower(f.group_leader, f.rank, ModelName(f), run));
  spdlog::info("group: rank 0 ended the group; exiting");
  return absl::OkStatus();
#else
  return absl::InvalidArgumentError("--group-leader needs the CUDA backend, and this build has none");
#endif
}

absl::Status Serve(const WorkerFlags& f) {
  if (f.max_batch_tokens <= 0 || f.max_running <= 0 || f.max_queue < 0) {
    return absl::InvalidArgumentError("--max-batch-tokens and --max-running must be positive, --max-queue >= 0");
  }
  if (f.gpu_hour_cost < 0 || f.peak_memory_bandwidth_gbs <= 0 || f.peak_tflops <= 0) {
    return absl::InvalidArgumentError("--gpu-hour-cost must be >= 0, --peak-memory-bandwidth and --peak-tflops > 0");
  }
  if (f.gpus < 1 || (f.gpus > 1 && f.device != "cuda")) {
    return absl::InvalidArgumentError(
        absl::StrCat("--gpus ", f.gpus, ": give at least 1, and more than 1 only with --device cuda"));
  }
  if (f.scheduler != "continuous" && f.scheduler != "static") {
    return absl::InvalidArgumentError(
        absl::StrCat("--scheduler: '", f.scheduler, "' is neither continuous nor static"));
  }
  if (f.world_size < 1 || (f.world_size > 1 && (f.device != "cuda" || f.gpus != 1))) {
    return absl::InvalidArgumentError(absl::StrCat("--world-size ", f.world_size,
                                                   ": give at least 1, and more than 1 only with --device cuda and "
                                                   "one GPU per process (--gpus 1)"));
  }
  if (!f.group_leader.empty()) {
    if (f.rank < 1 || f.device != "cuda" || f.gpus != 1) {
      return absl::InvalidArgumentError(absl::StrCat("--group-leader: a follower has --rank 1 or more (got ", f.rank,
                                                     "), --device cuda and one GPU (--gpu)"));
    }
    return Follow(f);
  }
  EngineOptions engine_options = EngineOptionsFrom(f);
  const std::string model_name = ModelName(f);
  // With --world-size, the other ranks join this process before the engine starts: it drives
  // them through the group (declared before the engine, which uses it, so it outlives it).
  std::unique_ptr<GroupLeader> group;
  std::unique_ptr<LeaderRanks> ranks;
  if (f.world_size > 1) {
#ifdef COHORT_HAVE_CUDA
    COHORT_ASSIGN_OR_RETURN(const std::string nccl_id, cuda::NewNcclId());
    COHORT_ASSIGN_OR_RETURN(group, GroupLeader::Start(f.host, f.group_port, f.world_size, model_name, nccl_id,
                                                      SettingsOf(engine_options)));
    spdlog::info("group: waiting on port {} for ranks 1..{} (cohort-worker --group-leader HOST:{} --rank R)",
                 group->port(), f.world_size - 1, group->port());
    COHORT_RETURN_IF_ERROR(group->AwaitRanks(absl::Minutes(10)));
    ranks = std::make_unique<LeaderRanks>(*group, f.world_size, nccl_id);
    engine_options.remote_ranks = ranks.get();
#else
    return absl::InvalidArgumentError("--world-size needs the CUDA backend, and this build has none");
#endif
  }
  COHORT_ASSIGN_OR_RETURN(auto engine, CreateEngine(engine_options));
  const ModelConfig config = engine->config();
  const KvCacheGeometry kv = engine->kv_geometry();
  spdlog::info("loaded {} '{}' from {}: {} layers, {} routed experts; KV cache {} blocks of {} tokens", 
               config.architecture_name, model_name, f.model, config.num_layers, config.n_routed_experts,
               kv.num_blocks, kv.block_size_tokens);

  std::unique_ptr<Tokenizer> tokenizer;
  if (std::filesystem::exists(std::filesystem::path(f.model) / "tokenizer.json")) {
    COHORT_ASSIGN_OR_RETURN(tokenizer, Tokenizer::Load(f.model));
    spdlog::info("tokenizer: {} tokens{}", tokenizer->vocab_size(),
                 tokenizer->chat_template().empty() ? ", no chat template" : "");
  } else {
    spdlog::warn("{} has no tokenizer.json: prompts must be token ids; text, chat and stop strings are refused",
                 f.model);
  }

  std::unique_ptr<WorkerMetrics> metrics;
  if (f.metrics_port >= 0) {
    COHORT_ASSIGN_OR_RETURN(metrics, WorkerMetrics::Create(absl::StrCat(f.host, ":", f.metrics_port), model_name));
  }
  const DevicePeaks peaks = ResolvePeaks(f);

  LoadPublisher publisher;
  EngineLoopOptions loop_options;
  loop_options.scheduler = {
      .max_batch_tokens = f.max_batch_tokens,
      .max_running = f.max_running,
      .batching = f.scheduler == "static" ? BatchingPolicy::kStatic : BatchingPolicy::kContinuous};
  loop_options.prefix_caching = f.prefix_caching;
  loop_options.max_queue = f.max_queue;
  loop_options.model_name = model_name;
  loop_options.tokenizer = tokenizer.get();
  // The worker's steps use all its GPUs at once: their bandwidth, FLOPs and cost add up.
  const int devices = f.gpus * f.world_size;
  loop_options.peaks = {.memory_bandwidth_bytes_per_s = peaks.memory_bandwidth_bytes_per_s * devices,
                        .flops_per_s = peaks.flops_per_s * devices};
  loop_options.device_cost_dollars_per_hour = f.gpu_hour_cost * devices;
  EngineLoop loop(std::move(engine), loop_options, publisher, metrics.get());
  COHORT_RETURN_IF_ERROR(loop.WarmUp());

  WorkerService service(loop, publisher);
  COHORT_ASSIGN_OR_RETURN(StartedServer started, StartGrpcServer(f.host, f.port, service));
  std::unique_ptr<grpc::Server>& server = started.server;
  const int port = started.port;
  loop.set_worker_id(f.worker_id.empty() ? absl::StrCat(f.host, ":", port) : f.worker_id);
  loop.Start();
  server->GetHealthCheckService()->SetServingStatus(true);
  spdlog::info("serving on {}:{}{}", f.host, port,
               metrics ? absl::StrCat(", metrics on :", metrics->port(), "/metrics") : std::string());
  COHORT_RETURN_IF_ERROR(
      WritePortFile(f.port_file, {{"grpc_port", port}, {"metrics_port", metrics ? metrics->port() : -1}}));

  std::signal(SIGTERM, OnSignal);
  std::signal(SIGINT, OnSignal);
  bool reported_unhealthy = false;
  while (g_signal == 0) {
    if (loop.unhealthy() && !reported_unhealthy) {
      // The engine cannot step any more (a GPU of its group failed): not ready, so that no one
      // sends work here; restarting the worker is the way back.
      server->GetHealthCheckService()->SetServingStatus(false);
      reported_unhealthy = true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }

  spdlog::info("signal {}: draining (up to {} s)", static_cast<int>(g_signal), f.drain_timeout_s);
  server->GetHealthCheckService()->SetServingStatus(false);
  loop.Drain();
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(f.drain_timeout_s);
  while (!loop.idle() && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  if (!loop.idle()) spdlog::warn("drain timeout: ending the requests still running with UNAVAILABLE");
  loop.Stop();
  // Give streams a moment to deliver their last messages, then close.
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  spdlog::info("drained; exiting");
  return absl::OkStatus();
}

}  // namespace
}  // namespace cohort

int main(int argc, char** argv) {
  using cohort::FlagSet;
  cohort::WorkerFlags f;
  FlagSet flags("cohort-worker",
                "Serves one DeepSeek-V2/V3 model over gRPC (cohort.worker.v1.Worker) with continuous batching\n"
                "over a paged KV cache. Ready (gRPC health SERVING) once the model is loaded and one forward\n"
                "pass succeeded. SIGTERM drains: new requests get UNAVAILABLE, running ones finish, then exit 0.");
  flags.Add("model", &f.model,
            "checkpoint folder (config.json and model*.safetensors), or synthetic:deepseek-v2-lite / "
            "synthetic:deepseek-v3 (random weights of the published shapes; --device cuda)",
            /*required=*/true);
  flags.Add("model-name", &f.model_name, "name clients use for the model (default: the folder's or preset's name)");
  flags.Add("host", &f.host, "address to listen on");
  flags.Add("port", &f.port, "gRPC port (0: any free port; see --port-file)");
  flags.Add("metrics-port", &f.metrics_port, "Prometheus /metrics port (0: any free port, -1: off)");
  flags.Add("port-file", &f.port_file, "write {\"grpc_port\":..,\"metrics_port\":..} here once serving");
  flags.Add("device", &f.device, "backend: cpu, cuda, or null (no compute: for overhead benchmarks)");
  flags.Add("gpu", &f.gpu, "cuda: which GPU of this machine (the first, with --gpus)");
  flags.Add("gpus", &f.gpus,
            "cuda: GPUs to spread the model over, from --gpu on: each holds a share of the experts and the rest "
            "of the model whole, and they step together over NCCL (docs/expert_parallel.md)");
  flags.Add("world-size", &f.world_size,
            "cuda: GPUs of a group that spans processes or nodes, one per process: this process is rank 0, "
            "serves the group on --group-port and waits for the others to join");
  flags.Add("group-port", &f.group_port, "rank 0's port for the other ranks of its group (--world-size)");
  flags.Add("group-leader", &f.group_leader,
            "HOST:PORT of rank 0: this process is a follower rank of its group (give --rank, --gpu and --model; "
            "the engine settings come from rank 0); it serves no clients and exits when rank 0 ends the group");
  flags.Add("rank", &f.rank, "this follower's rank, 1 .. --world-size - 1 (with --group-leader)");
  flags.Add("gpu-memory-fraction", &f.gpu_memory_fraction,
            "cuda: share of the GPU's memory for weights, workspaces and the KV cache, planned at start-up");
  flags.Add("num-layers", &f.num_layers, "synthetic models: layers to build (0: the preset's)");
  flags.Add("kv-block-size", &f.kv_block_size, "tokens per KV-cache block");
  flags.Add("kv-cache-bytes", &f.kv_cache_bytes,
            "memory for the KV cache (cuda: default what --gpu-memory-fraction leaves after weights and workspaces)");
  flags.Add("max-batch-tokens", &f.max_batch_tokens, "tokens computed per step, all requests together");
  flags.Add("max-running", &f.max_running, "requests in the running batch at most");
  flags.Add("max-queue", &f.max_queue, "waiting requests at most; more get RESOURCE_EXHAUSTED");
  flags.Add("prefix-caching", &f.prefix_caching, "reuse the KV blocks of shared prompt prefixes");
  flags.Add("scheduler", &f.scheduler,
            "continuous (requests join and leave the batch every step) or static (a baseline: a batch runs to "
            "completion before the next forms)");
  flags.Add("drain-timeout", &f.drain_timeout_s, "seconds SIGTERM waits for running requests");
  flags.Add("worker-id", &f.worker_id, "name in load reports (default host:port)");
  flags.Add("threads", &f.threads, "CPU backend threads (0: one per core)");
  flags.Add("log-level", &f.log_level, "trace, debug, info, warn, error or off");
  flags.Add("gpu-hour-cost", &f.gpu_hour_cost,
            "dollars per device-hour, for the cost-per-token metrics; 3 is a typical H200 rental");
  flags.Add("peak-memory-bandwidth", &f.peak_memory_bandwidth_gbs,
            "device memory bandwidth in GB/s, for the utilization metrics: an H200's unless given (the cpu "
            "backend measures its own)");
  flags.Add("peak-tflops", &f.peak_tflops,
            "device peak dense TFLOP/s, for the utilization metrics: an H200's bf16 unless given (the cpu "
            "backend measures its own)");
  return cohort::RunProgram(flags, argc, argv, f.log_level, [&] {
    f.peak_memory_bandwidth_given = flags.IsSet("peak-memory-bandwidth");
    f.peak_tflops_given = flags.IsSet("peak-tflops");
    f.kv_cache_bytes_given = flags.IsSet("kv-cache-bytes");
    return cohort::Serve(f);
  });
}
