#include "common/metrics_server.h"

#include <prometheus/exposer.h>
#include <prometheus/registry.h>

#include "absl/strings/str_cat.h"

namespace cohort {

absl::StatusOr<MetricsServer> ServeMetrics(const std::string& bind_address,
                                           std::shared_ptr<prometheus::Registry> registry, const std::string& flag) {
  MetricsServer server;
  try {
    server.exposer = std::make_unique<prometheus::Exposer>(bind_address);
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrCat(flag, ": cannot serve metrics on ", bind_address, ": ", e.what()));
  }
  server.exposer->RegisterCollectable(registry);
  const auto ports = server.exposer->GetListeningPorts();
  server.port = ports.empty() ? 0 : ports.front();
  return server;
}

}  // namespace cohort
