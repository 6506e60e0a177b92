# syntax=docker/dockerfile:1
# cohort-router: built on Debian 12 with exactly the packages scripts/setup.sh installs, run on
# debian:12-slim with only the runtime libraries, as the non-root user 10001. From the repository root:
#
#   docker build -f deploy/docker/router.Dockerfile -t cohort-router .
#   docker run --rm -p 50051:50051 -p 8080:8080 -p 9090:9090 cohort-router --workers-dns WORKERS:50061
#
# router.Dockerfile.dockerignore keeps build/ and .git out of the context.

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
WORKDIR /src
COPY . .
RUN cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DCOHORT_CUDA=OFF \
 && cmake --build build --target cohort-router \
 && strip build/bin/cohort-router

FROM debian:12-slim
ARG DEBIAN_FRONTEND=noninteractive
# The runtime halves of the build's -dev packages: one for each library build/bin/cohort-router links
# to (the test checks them against ldd on a Debian 12 build).
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      libabsl20220623 libbrotli1 libc-ares2 libcivetweb1 libcpp-httplib0.11 libfmt9 libgrpc++1.51 \
      libgrpc29 libprometheus-cpp-core1.0 libprometheus-cpp-pull1.0 libprotobuf32 libre2-9 \
      libspdlog1.10 libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 cohort \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin cohort
COPY --from=build /src/build/bin/cohort-router /usr/local/bin/cohort-router
USER 10001:10001
# gRPC (cohort.v1.Inference), OpenAI-style HTTP, Prometheus /metrics.
EXPOSE 50051 8080 9090
ENTRYPOINT ["/usr/local/bin/cohort-router"]
