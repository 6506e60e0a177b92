// The CPU backend's own peak rates, measured: what its economics metrics are fractions of when no
// --peak-memory-bandwidth / --peak-tflops is given.
//
//   const MeasuredPeaks measured = cpu::MeasureCpuPeaks();  // 0.2-0.6 s, all OpenMP threads
//
// Memory bandwidth: the best of three parallel read passes over a 128 MiB buffer (larger than most
// last-level caches, so it streams from DRAM; on a machine whose cache holds it the figure is the
// cache's, and the flags should be given; 0 when the buffer cannot be mapped, which leaves the
// bandwidth fraction unobserved). FLOP rate: the best of three runs of a float32
// multiply-add loop that stays in registers, on every thread, compiled with the same flags as the
// engine: the rate this build's float32 code can reach on this machine, which the engine's own
// matrix products approach only when they are compute-bound. Both use omp_get_max_threads()
// threads, the engine's, so call it after the engine is created.
#pragma once

#include "worker/model/step_cost.h"

namespace cohort::cpu {

struct MeasuredPeaks {
  DevicePeaks peaks;
  int threads = 0;
  double seconds = 0;  // how long measuring took
};

MeasuredPeaks MeasureCpuPeaks();

}  // namespace cohort::cpu
