#!/usr/bin/env bash
# The GPU suite in two halves, for a GPU machine that lacks this project's Debian libraries.
#
#   scripts/gpu_tests.sh bundle            here: build, then copy the GPU test and benchmark binaries
#                                          with the libraries they need into .gpu/ (gpu-bundle)
#   scripts/gpu_tests.sh run [--bench]     there (carry .gpu): every GPU test, then with --bench the
#                                          kernel benchmarks, the transformers baseline and
#                                          `cohort bench step --baseline` (Cohort's speed-up over
#                                          it at the same shapes); logs and JSON under $OUT
#
# A skipped test is not a passing one: `run` fails when any test skipped or failed.
set -euo pipefail
cd "$(dirname "$0")/.."

GPU_TESTS=(kernels_test cuda_engine_test)
GPU_TOOLS=(moe_bench sampling_bench skinny_gemm_bench cohort cohort-worker cohort-router)

case "${1:-}" in
  bundle)
    cmake --build build --target "${GPU_TESTS[@]}" "${GPU_TOOLS[@]}"
    rm -rf .gpu
    # One at a time: gpu-bundle stops at a binary that needs no library beyond CUDA's (nothing to
    # copy but the binary itself), so such a binary is copied here.
    for bin in "${GPU_TESTS[@]/#/build/tests/}" "${GPU_TOOLS[@]/#/build/bin/}"; do
      ../shared/tools/gpu-bundle "$bin" >/dev/null || cp -L "$bin" .gpu/bin/
    done
    strip --strip-unneeded .gpu/bin/* .gpu/lib/* 2>/dev/null || true  # the tree that travels is capped at 64 MiB
    du -sh .gpu
    ;;
  run)
    out="${OUT:-/tmp/cohort-gpu}"
    mkdir -p "$out"
    export COHORT_SOURCE_DIR="$PWD" COHORT_BINARY_DIR="$PWD/.gpu/bin"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
    status=0
    for t in "${GPU_TESTS[@]}"; do
      echo "== $t"
      if ! ".gpu/bin/$t" --gtest_brief=1 >"$out/$t.log" 2>&1; then status=1; fi
      grep -E "^\[  (PASSED|FAILED|SKIPPED) |FAILED|Failure|error" "$out/$t.log" | head -40 || true
      if grep -q "SKIPPED" "$out/$t.log"; then echo "$t: tests skipped on a GPU machine"; status=1; fi
    done
    if [ "${2:-}" = "--bench" ]; then
      echo "== moe_bench";      .gpu/bin/moe_bench      >"$out/moe_bench.txt" 2>&1 || status=1; tail -30 "$out/moe_bench.txt"
      echo "== sampling_bench"; .gpu/bin/sampling_bench >"$out/sampling_bench.txt" 2>&1 || status=1; tail -20 "$out/sampling_bench.txt"
      echo "== skinny_gemm_bench"; .gpu/bin/skinny_gemm_bench >"$out/skinny_gemm_bench.txt" 2>&1 || status=1; tail -140 "$out/skinny_gemm_bench.txt"
      echo "== transformers baseline"
      baseline=()
      if python3 scripts/bench_transformers_baseline.py --out "$out/transformers_baseline.json" >"$out/baseline.txt" 2>&1; then
        baseline=(--baseline "$out/transformers_baseline.json")
      else
        status=1; tail -5 "$out/baseline.txt"
      fi
      echo "== cohort bench step"
      .gpu/bin/cohort bench step "${baseline[@]}" --output "$out/step_v2_lite.json" >"$out/bench_step.txt" 2>&1 || status=1
      tail -40 "$out/bench_step.txt"
    fi
    exit $status
    ;;
  *)
    sed -n '2,11p' "$0" >&2
    exit 2
    ;;
esac
