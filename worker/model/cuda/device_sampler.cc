// Sampling on the device: filled in by the CUDA backend work.
