#include "tests/testing/server_process.h"

#include <fcntl.h>
#include <grpcpp/grpcpp.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <thread>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/safetensors_writer.h"

namespace cohort::testing {

std::unique_ptr<ServerProcess> WorkerProcess::Start(const std::string& model_dir,
                                                    const std::vector<std::string>& extra_args, int timeout_s) {
  std::vector<std::string> args = {"--model", model_dir, "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"};
  args.insert(args.end(), extra_args.begin(), extra_args.end());
  return ServerProcess::Start("cohort-worker", args, timeout_s);
}

std::unique_ptr<ServerProcess> RouterProcess::Start(const std::vector<std::string>& workers,
                                                    const std::vector<std::string>& extra_args, int timeout_s) {
  std::string list;
  for (const auto& w : workers) list += (list.empty() ? "" : ",") + w;
  std::vector<std::string> args = {"--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--http-port", "0"};
  if (!list.empty()) args.insert(args.end(), {"--workers", list});
  args.insert(args.end(), extra_args.begin(), extra_args.end());
  return ServerProcess::Start("cohort-router", args, timeout_s);
}

std::unique_ptr<ServerProcess> ServerProcess::Start(const std::string& binary, const std::vector<std::string>& args,
                                                    int timeout_s) {
  std::unique_ptr<ServerProcess> w(new ServerProcess());
  const std::string port_file = w->dir_.Join("ports.json");
  std::vector<std::string> argv = {BinaryPath(binary)};
  argv.insert(argv.end(), args.begin(), args.end());
  argv.insert(argv.end(), {"--port-file", port_file});
  std::vector<char*> exec_args;
  for (auto& a : argv) exec_args.push_back(a.data());
  exec_args.push_back(nullptr);
  const std::string log_path = w->dir_.Join("worker.log");

  w->pid_ = fork();
  if (w->pid_ == 0) {
    int log = open(log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    int null = open("/dev/null", O_RDONLY);
    dup2(null, 0);
    dup2(log, 1);
    dup2(log, 2);
    execv(exec_args[0], exec_args.data());
    _exit(127);
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_s);
  while (!std::filesystem::exists(port_file)) {
    int status;
    if (waitpid(w->pid_, &status, WNOHANG) == w->pid_) {
      w->pid_ = -1;
      ADD_FAILURE() << binary << " exited before serving:\n" << w->Log();
      return nullptr;
    }
    if (std::chrono::steady_clock::now() > deadline) {
      ADD_FAILURE() << binary << " did not serve within " << timeout_s << " s:\n" << w->Log();
      return nullptr;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  auto ports = nlohmann::json::parse(ReadFile(port_file));
  w->grpc_port_ = ports["grpc_port"].get<int>();
  w->metrics_port_ = ports["metrics_port"].get<int>();
  w->http_port_ = ports.value("http_port", -1);
  return w;
}

ServerProcess::~ServerProcess() {
  if (pid_ > 0) {
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
  }
}

std::shared_ptr<grpc::Channel> ServerProcess::Channel() const {
  return grpc::CreateChannel(address(), grpc::InsecureChannelCredentials());
}

void ServerProcess::Signal(int signal) const {
  if (pid_ > 0) kill(pid_, signal);
}

int ServerProcess::Wait(int timeout_s) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_s);
  while (pid_ > 0) {
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    }
    if (std::chrono::steady_clock::now() > deadline) return -1;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return -1;
}

std::string ServerProcess::Log() const {
  std::ifstream in(dir_.Join("worker.log"));
  return std::string(std::istreambuf_iterator<char>(in), {});
}

}  // namespace cohort::testing
