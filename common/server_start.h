// What both servers (cohort-worker, cohort-router) do to start listening and to say where.
#pragma once

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace cohort {

struct StartedServer {
  std::unique_ptr<grpc::Server> server;
  int port = 0;  // the one bound (chosen by the OS when 0 was asked for)
};

// Serves `service`, the standard health service and server reflection on host:port.
// Unavailable, naming the address, when it cannot listen.
absl::StatusOr<StartedServer> StartGrpcServer(const std::string& host, int port, grpc::Service& service);

// Writes `ports` as one JSON line to `path` (nothing when empty): whole, under a temporary name
// then renamed, so a reader never sees half a file. Tests and scripts wait for it.
absl::Status WritePortFile(const std::string& path, const nlohmann::json& ports);

}  // namespace cohort
