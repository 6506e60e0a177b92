// Serves a Prometheus registry on /metrics (prometheus-cpp's civetweb exposer).
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace prometheus {
class Exposer;
class Registry;
}  // namespace prometheus

namespace cohort {

struct MetricsServer {
  std::unique_ptr<prometheus::Exposer> exposer;
  int port = 0;  // the port it listens on (the one chosen when 0 was asked for)
};

// `bind_address` is "host:port"; `flag` names the flag in the error when the port cannot be bound.
absl::StatusOr<MetricsServer> ServeMetrics(const std::string& bind_address,
                                           std::shared_ptr<prometheus::Registry> registry, const std::string& flag);

}  // namespace cohort
