// The CUDA engine: filled in by the CUDA backend work.
