# syntax=docker/dockerfile:1
# cohort-worker: built on Debian 12 with exactly the packages scripts/setup.sh installs plus NVIDIA's
# CUDA compiler and libraries, run on the CUDA runtime image (Ubuntu 24.04) with the build's other
# libraries bundled in /opt/cohort/lib, as the non-root user 10001. The model is mounted at /models.
# From the repository root:
#
#   docker build -f deploy/docker/worker.Dockerfile -t cohort-worker .
#   docker run --rm --gpus all -v /data/models/DeepSeek-V3:/models:ro -p 50061:50061 -p 9091:9091 \
#     cohort-worker --model=/models --device=cuda
#
# --build-arg COHORT_CUDA=OFF builds the CPU backend only (no NVIDIA repository needed).
# worker.Dockerfile.dockerignore keeps build/ and .git out of the context.

ARG CUDA_RUNTIME_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04

FROM debian:12 AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG DEBIAN_FRONTEND=noninteractive
# The package list is read from scripts/setup.sh, so the image and a developer machine cannot drift
# (tests/deploy/dockerfile_packages_test.py runs this step with apt-get stubbed and compares).
COPY scripts/setup.sh /tmp/setup.sh
RUN eval "$(sed -n '/^PACKAGES=(/,/^)/p' /tmp/setup.sh)" \
 && [ "${#PACKAGES[@]}" -gt 0 ] \
 && apt-get update \
 && apt-get install -y --no-install-recommends "${PACKAGES[@]}" \
 && rm -rf /var/lib/apt/lists/*
# CUDA for Debian 12 from NVIDIA's repository: nvcc, cudart, cuBLAS, NCCL (headers and libraries).
ARG COHORT_CUDA=ON
ARG CUDA_VERSION=13.0
RUN if [ "$COHORT_CUDA" = ON ]; then \
      v="${CUDA_VERSION/./-}" \
      && apt-get update \
      && apt-get install -y --no-install-recommends ca-certificates wget \
      && wget -q -O /tmp/cuda-keyring.deb \
           https://developer.download.nvidia.com/compute/cuda/repos/debian12/x86_64/cuda-keyring_1.1-1_all.deb \
      && dpkg -i /tmp/cuda-keyring.deb \
      && apt-get update \
      && apt-get install -y --no-install-recommends "cuda-nvcc-$v" "cuda-cudart-dev-$v" "libcublas-dev-$v" \
           libnccl-dev \
      && rm -rf /var/lib/apt/lists/* /tmp/cuda-keyring.deb; \
    fi
WORKDIR /src
COPY . .
RUN cuda_args=(-DCOHORT_CUDA="$COHORT_CUDA") \
 && if [ "$COHORT_CUDA" = ON ]; then cuda_args+=(-DCMAKE_CUDA_COMPILER="/usr/local/cuda-$CUDA_VERSION/bin/nvcc"); fi \
 && cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release "${cuda_args[@]}" \
 && cmake --build build --target cohort-worker \
 && strip build/bin/cohort-worker \
 && deploy/docker/bundle_libs.sh /out build/bin/cohort-worker

FROM ${CUDA_RUNTIME_IMAGE}
RUN groupadd --system --gid 10001 cohort \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin cohort \
 && mkdir -p /models
COPY --from=build /out/bin/ /opt/cohort/bin/
COPY --from=build /out/lib/ /opt/cohort/lib/
ENV PATH=/opt/cohort/bin:${PATH} \
    LD_LIBRARY_PATH=/opt/cohort/lib:${LD_LIBRARY_PATH} \
    NCCL_NVLS_ENABLE=0
USER 10001:10001
# gRPC (cohort.worker.v1.Worker), Prometheus /metrics.
EXPOSE 50061 9091
ENTRYPOINT ["/opt/cohort/bin/cohort-worker"]
CMD ["--model=/models", "--device=cuda"]
