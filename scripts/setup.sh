#!/usr/bin/env bash
# Installs the Debian packages Cohort builds with (only those missing), then configures and builds
# into build/ (binaries in build/bin/). Safe to run again: it does only what is left to do.
#
#   scripts/setup.sh            install what is missing, configure, build
#   BUILD_DIR=out scripts/setup.sh   build elsewhere
#   CMAKE_ARGS=-DCOHORT_CUDA=OFF scripts/setup.sh   skip CUDA even when nvcc exists
set -euo pipefail
cd "$(dirname "$0")/.."

# Keep in sync with deploy/docker/*.Dockerfile (a test compares them once those exist).
PACKAGES=(
  cmake ninja-build g++ pkg-config
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler libabsl-dev
  nlohmann-json3-dev libspdlog-dev libfmt-dev libgtest-dev prometheus-cpp-dev
  libcpp-httplib-dev libpcre2-dev libutf8proc-dev python3-grpcio python3-protobuf curl
  golang-go golang-github-masterminds-sprig-dev golang-gopkg-yaml.v2-dev prometheus python3-yaml
  python3-matplotlib
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

build_dir=${BUILD_DIR:-build}
if [ ! -f "$build_dir/build.ninja" ]; then
  # shellcheck disable=SC2086
  cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Release ${CMAKE_ARGS:-} >/dev/null
fi
echo "setup: building in $build_dir (log: $build_dir/build.log)"
if ! cmake --build "$build_dir" -j"$(nproc)" >"$build_dir/build.log" 2>&1; then
  tail -n 60 "$build_dir/build.log"
  echo "setup: build failed; the whole log is $build_dir/build.log"
  exit 1
fi
