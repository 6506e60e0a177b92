// Real cohort-worker and cohort-router processes for integration tests: started on free ports chosen
// by the OS, reached over 127.0.0.1, and always killed when the object goes away.
#pragma once

#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

#include "tests/testing/paths.h"

namespace grpc {
class Channel;
}

namespace cohort::testing {

// A server binary of ours (cohort-worker or cohort-router) run until the test ends.
class ServerProcess {
 public:
  // Runs build/bin/<binary> with `args` plus --port-file, and waits until it has written the file.
  // Fails the current test (and returns nullptr) if it does not within `timeout_s`.
  static std::unique_ptr<ServerProcess> Start(const std::string& binary, const std::vector<std::string>& args,
                                              int timeout_s = 30);
  ~ServerProcess();

  int grpc_port() const { return grpc_port_; }
  int metrics_port() const { return metrics_port_; }
  int http_port() const { return http_port_; }  // routers only; -1 otherwise
  int pid() const { return pid_; }
  std::string address() const { return "127.0.0.1:" + std::to_string(grpc_port_); }
  std::shared_ptr<grpc::Channel> Channel() const;

  void Signal(int signal) const;
  // Waits for the process to exit; its exit code, or -1 after `timeout_s` or when killed by a signal.
  int Wait(int timeout_s);
  // Everything it logged so far (stderr and stdout).
  std::string Log() const;

 private:
  ServerProcess() = default;
  TempDir dir_;
  pid_t pid_ = -1;
  int grpc_port_ = 0;
  int metrics_port_ = 0;
  int http_port_ = -1;
};

// cohort-worker on 127.0.0.1 with OS-chosen gRPC and metrics ports.
struct WorkerProcess {
  static std::unique_ptr<ServerProcess> Start(const std::string& model_dir, const std::vector<std::string>& extra_args,
                                              int timeout_s = 30);
};

// cohort-router on 127.0.0.1 with OS-chosen ports, in front of `workers` (host:port each).
struct RouterProcess {
  static std::unique_ptr<ServerProcess> Start(const std::vector<std::string>& workers,
                                              const std::vector<std::string>& extra_args, int timeout_s = 30);
};

}  // namespace cohort::testing
