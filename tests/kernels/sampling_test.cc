// Filled in with the CUDA backend.
