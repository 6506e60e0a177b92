// Measured ceilings of the GPU a benchmark runs on, to report achieved rates as fractions of what
// the device really does rather than of its datasheet.
#pragma once

#include <cstdint>

#include "absl/status/statusor.h"

namespace cohort::cuda {

// Device-to-device copy bandwidth in bytes/s (bytes read plus bytes written), the median of several
// copies of `bytes` on GPU `device_id`.
absl::StatusOr<double> MeasureCopyBandwidth(int device_id, int64_t bytes = int64_t{1} << 30);

}  // namespace cohort::cuda
