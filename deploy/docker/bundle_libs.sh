#!/usr/bin/env bash
# bundle_libs.sh OUT BIN... : copies each executable into OUT/bin and the shared libraries it links to
# into OUT/lib, except those every runtime image has (glibc, libstdc++, libgcc) and CUDA's own
# (driver, cudart, cuBLAS, NCCL: the nvidia/cuda runtime image and the node's driver provide them).
# Used by worker.Dockerfile to move a Debian 12 build onto the Ubuntu-based CUDA runtime image, whose
# gRPC, protobuf and abseil versions differ from Debian's. Run LD_LIBRARY_PATH=OUT/lib OUT/bin/...
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: bundle_libs.sh OUT BIN..." >&2; exit 2; }
out=$1
shift
mkdir -p "$out/bin" "$out/lib"
for bin in "$@"; do
  cp -L "$bin" "$out/bin/"
  ldd "$bin" | awk '/=> \// {print $3}' \
    | grep -v -E '/(ld-linux[^/]*|libc|libm|libstdc\+\+|libgcc_s|libpthread|libdl|librt|libresolv)\.so' \
    | grep -v -E '/lib(cuda|cudart|cublas|cublasLt|nccl|nvidia-[a-z-]+|nvrtc)\.so' \
    | while read -r lib; do cp -Lu "$lib" "$out/lib/"; done
done
