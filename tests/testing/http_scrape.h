// Minimal HTTP GET over a loopback socket, and Prometheus text parsing, for tests that read
// /metrics from the real servers.
#pragma once

#include <string>

namespace cohort::testing {

// The whole response (status line, headers, body); empty when the connection fails.
std::string HttpGet(const std::string& ip, int port, const std::string& path);
// Value of the first sample of `name` whose labels contain `label_filter` (empty: the unlabelled
// sample); -1 when absent.
double MetricValue(const std::string& text, const std::string& name, const std::string& label_filter = "");

}  // namespace cohort::testing
