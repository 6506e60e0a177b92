#include "common/server_start.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>

#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"

namespace cohort {

absl::StatusOr<StartedServer> StartGrpcServer(const std::string& host, int port, grpc::Service& service) {
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  StartedServer started;
  builder.AddListeningPort(absl::StrCat(host, ":", port), grpc::InsecureServerCredentials(), &started.port);
  builder.RegisterService(&service);
  started.server = builder.BuildAndStart();
  if (started.server == nullptr || started.port == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", host, ":", port, " (port in use?)"));
  }
  return started;
}

absl::Status WritePortFile(const std::string& path, const nlohmann::json& ports) {
  if (path.empty()) return absl::OkStatus();
  const std::string tmp = path + ".tmp";
  std::ofstream(tmp) << ports.dump() << "\n";
  std::error_code error;
  std::filesystem::rename(tmp, path, error);
  if (error) return absl::PermissionDeniedError(absl::StrCat("--port-file: cannot write ", path, ": ", error.message()));
  return absl::OkStatus();
}

}  // namespace cohort
