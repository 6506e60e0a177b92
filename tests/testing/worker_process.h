// A real cohort-worker process for integration tests: started on free ports chosen by the OS,
// reached over 127.0.0.1, and always killed when the object goes away.
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

class WorkerProcess {
 public:
  // Starts `build/bin/cohort-worker --model <model_dir> <extra_args>` and waits until it serves.
  // Fails the current test (and returns nullptr) if it does not within `timeout_s`.
  static std::unique_ptr<WorkerProcess> Start(const std::string& model_dir, const std::vector<std::string>& extra_args,
                                              int timeout_s = 30);
  ~WorkerProcess();

  int grpc_port() const { return grpc_port_; }
  int metrics_port() const { return metrics_port_; }
  std::string address() const { return "127.0.0.1:" + std::to_string(grpc_port_); }
  std::shared_ptr<grpc::Channel> Channel() const;

  void Signal(int signal) const;
  // Waits for the process to exit; its exit code, or -1 after `timeout_s` or when killed by a signal.
  int Wait(int timeout_s);
  // Everything it logged so far (stderr and stdout).
  std::string Log() const;

 private:
  WorkerProcess() = default;
  TempDir dir_;
  pid_t pid_ = -1;
  int grpc_port_ = 0;
  int metrics_port_ = 0;
};

}  // namespace cohort::testing
