#!/usr/bin/env bash
# The GPU suite in two halves, for a GPU machine that lacks this project's Debian libraries.
#
#   scripts/gpu_tests.sh bundle [--base REV]
#       here: build, then copy the GPU test and benchmark binaries with the libraries they need into
#       .gpu/ (gpu-bundle), and the kernel timeline library (tools/kernel_trace/kernel_trace.cc says
#       how to use it); with --base, also REV's `cohort` and kernels library, built in
#       build-base/, into .gpu/base/ (xz: the tree that travels is capped at 64 MiB)
#   scripts/gpu_tests.sh run [--bench]
#       there (carry .gpu): every GPU test, then with --bench the kernel benchmarks, the transformers
#       baseline and `cohort bench step --baseline` (Cohort's speed-up over it at the same shapes;
#       each decode shape also with one long request among short ones and with contexts spread);
#       under $OUT the test summary, the step table and its JSON, and logs.tar.gz with every log
#   scripts/gpu_tests.sh ab [ROUNDS] [--variant 'NAME VAR=VALUE...']... [BENCH FLAGS...]
#       there: `cohort bench step` ROUNDS times (3) for REV's build and this one in turn, then each
#       shape's change (scripts/compare_steps.py); machines differ by a few per cent, so a change is
#       measured against its base on one machine. Each --variant runs this build once more a round
#       with VAR=VALUE... in its environment (the switches of an experiment, read with getenv in the
#       build under test and removed before it is committed) and is compared with the base as well:
#       many settings in one device call. Under $OUT/ab: compare.txt, and runs.tar.gz with every
#       run's JSON and log
#   scripts/gpu_tests.sh cycles KERNEL_REGEX [--launch-count N] [BENCH FLAGS...]
#       there: Nsight Compute at the locked base clock over `cohort bench step` (by default one
#       1 x 4096 prefill step), the first N (4) launches whose kernel name matches KERNEL_REGEX, for
#       REV's build and this one in turn, twice each (this one alone when no base was bundled); per
#       launch its cycles, the change, and how far apart the SMs end (scripts/compare_cycles.py).
#       Kernel changes that a step's time cannot show (prefill runs at the GPU's power limit and
#       moves by several per cent between calls) show here within 1%. Under $OUT/cycles:
#       compare.txt, and runs.tar.gz with every CSV and log
#   scripts/gpu_tests.sh sanitize GTEST_FILTER [TOOL...]
#       there: the kernel tests the filter names under compute-sanitizer, once a tool (memcheck,
#       synccheck, racecheck unless named): out-of-bounds and misaligned accesses, barriers that
#       not all threads reach, shared-memory races. Slow (racecheck runs a kernel many times over),
#       so name a few tests; under $OUT/sanitize: summary.txt and the logs
#   scripts/gpu_tests.sh trace CONTEXTxBATCH... [BENCH FLAGS...]
#       there: one `cohort bench step` a shape (e.g. 1024x512) under the kernel timeline library, and
#       its last whole step summed by kernel (scripts/kernel_trace_step.py --by-kernel) and as a
#       timeline; under $OUT/trace: summary.txt, and traces.tar.gz with every CSV and log. The
#       tracer slows a step (about a quarter at batch 1): compare traces with traces. With
#       COHORT_KERNEL_TRACE_HOST=1 the host's CUDA calls are traced too, and each step's graph
#       launch is shown: at 512 rows CUPTI slows it enough to leave a hole mid-step
#
# A skipped test is not a passing one: `run` fails when any test skipped or failed.
set -euo pipefail
cd "$(dirname "$0")/.."

# A usage error: one line, exit 2.
usage_error() {
  echo "gpu_tests: $*" >&2
  exit 2
}

# out = $OUT/NAME (/tmp/cohort-gpu/NAME without $OUT), emptied; work = a scratch folder for the logs.
# The GPU machine sends back at most eight files, so out gets the results and one archive of work.
fresh_out() {
  out="${OUT:-/tmp/cohort-gpu}/$1"
  rm -rf "$out"
  mkdir -p "$out"
  work=$(mktemp -d)
}

# REV's `cohort` and kernels library from .gpu/base into $1 (xz may be missing there; python has lzma).
unpack_base() {
  mkdir -p "$1"
  python3 -c 'import lzma, os, shutil, sys
for name in ("cohort", "libcohort_kernels.so"):
    target = os.path.join(sys.argv[1], name)
    with lzma.open(f".gpu/base/{name}.xz") as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.chmod(target, 0o755)' "$1"
}

# The `cohort` of build $1 (base: REV's, unpacked in $work/base; any other: this one) into `bin`, and
# the library path it runs with into `library_path`.
select_build() {
  bin=.gpu/bin/cohort
  library_path=${LD_LIBRARY_PATH:-}
  if [ "$1" = base ]; then
    bin=$work/base/cohort
    library_path=$work/base${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  fi
}

GPU_TESTS=(kernels_test cuda_engine_test worker_group_test)
GPU_TOOLS=(moe_bench attention_bench sampling_bench skinny_gemm_bench memory_latency_bench handoff_bench cohort cohort-worker cohort-router)

case "${1:-}" in
  bundle)
    cmake --build build --target "${GPU_TESTS[@]}" "${GPU_TOOLS[@]}"
    rm -rf .gpu
    # One at a time: gpu-bundle stops at a binary that needs no library beyond CUDA's (nothing to
    # copy but the binary itself), so such a binary is copied here.
    for bin in "${GPU_TESTS[@]/#/build/tests/}" "${GPU_TOOLS[@]/#/build/bin/}"; do
      ../shared/tools/gpu-bundle "$bin" >/dev/null || cp -L "$bin" .gpu/bin/
    done
    # The kernel timeline library (tools/kernel_trace), where CUPTI was found to build it.
    [ -f build/lib/libcohort_kernel_trace.so ] && cp -L build/lib/libcohort_kernel_trace.so .gpu/lib/
    strip --strip-unneeded .gpu/bin/* .gpu/lib/* 2>/dev/null || true  # the tree that travels is capped at 64 MiB
    # What was built, for the logs there (the checkout that travels need not carry its history).
    revision=$(git rev-parse HEAD)
    git diff --quiet HEAD -- . || revision="$revision with uncommitted changes"
    echo "$revision" >.gpu/REVISION
    if [ "${2:-}" = "--base" ]; then
      rev=$(git rev-parse --verify "${3:?bundle --base needs a revision}^{commit}")
      # A worktree and build folder kept between bundles, so a second base build is incremental.
      if [ -d build-base/src ]; then
        git -C build-base/src checkout -q --detach "$rev"
      else
        git worktree add -q --detach build-base/src "$rev"
      fi
      cmake -S build-base/src -B build-base/build -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
      if ! cmake --build build-base/build --target cohort >build-base/build.log 2>&1; then
        tail -20 build-base/build.log
        echo "gpu_tests: the base build of $rev failed (build-base/build.log)" >&2
        exit 1
      fi
      mkdir -p .gpu/base
      for file in build-base/build/bin/cohort build-base/build/lib/libcohort_kernels.so; do
        cp -L "$file" .gpu/base/
        strip --strip-unneeded ".gpu/base/${file##*/}"
        xz -9 -f ".gpu/base/${file##*/}"
      done
      echo "$rev" >.gpu/base/REVISION
      echo "base: $(git log -1 --format='%h %s' "$rev")"
    fi
    du -sh .gpu
    ;;
  run)
    out="${OUT:-/tmp/cohort-gpu}"
    mkdir -p "$out"
    # Every log and result goes to $work; $out gets the results of record and one archive of the rest
    # (the GPU machine sends back at most eight files).
    work=$(mktemp -d)
    export COHORT_SOURCE_DIR="$PWD" COHORT_BINARY_DIR="$PWD/.gpu/bin"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$work/gpu.txt"
    echo "build $(cat .gpu/REVISION)" | tee -a "$work/gpu.txt"
    status=0
    for t in "${GPU_TESTS[@]}"; do
      echo "== $t"
      if ! ".gpu/bin/$t" --gtest_brief=1 >"$work/$t.log" 2>&1; then status=1; fi
      summary=$(grep -E "^\[  (PASSED|FAILED|SKIPPED) |FAILED|Failure|error" "$work/$t.log" | head -40 || true)
      echo "$summary"
      printf '== %s\n%s\n' "$t" "$summary" >>"$work/tests.txt"
      if grep -q "SKIPPED" "$work/$t.log"; then echo "$t: tests skipped on a GPU machine"; status=1; fi
    done
    if [ "${2:-}" = "--bench" ]; then
      echo "== moe_bench";      .gpu/bin/moe_bench      >"$work/moe_bench.txt" 2>&1 || status=1; tail -30 "$work/moe_bench.txt"
      echo "== attention_bench"; .gpu/bin/attention_bench >"$work/attention_bench.txt" 2>&1 || status=1; tail -8 "$work/attention_bench.txt"
      echo "== sampling_bench"; .gpu/bin/sampling_bench >"$work/sampling_bench.txt" 2>&1 || status=1; tail -20 "$work/sampling_bench.txt"
      echo "== skinny_gemm_bench"; .gpu/bin/skinny_gemm_bench >"$work/skinny_gemm_bench.txt" 2>&1 || status=1; tail -140 "$work/skinny_gemm_bench.txt"
      echo "== memory_latency_bench"
      .gpu/bin/memory_latency_bench >"$work/memory_latency_bench.txt" 2>&1 || status=1; tail -12 "$work/memory_latency_bench.txt"
      echo "== handoff_bench"; .gpu/bin/handoff_bench >"$work/handoff_bench.txt" 2>&1 || status=1; tail -6 "$work/handoff_bench.txt"
      echo "== transformers baseline"
      baseline=()
      if python3 scripts/bench_transformers_baseline.py --out "$work/transformers_baseline.json" >"$work/baseline.txt" 2>&1; then
        baseline=(--baseline "$work/transformers_baseline.json")
      else
        status=1; tail -5 "$work/baseline.txt"
      fi
      echo "== cohort bench step"
      # The table of record, then its decode shapes with one long request among short ones and with
      # their contexts spread, as a server's batches are.
      .gpu/bin/cohort bench step "${baseline[@]}" --long-context 32768 --spread-contexts \
        --output "$work/step_v2_lite.json" >"$work/bench_step.txt" 2>&1 || status=1
      tail -90 "$work/bench_step.txt"
    fi
    for file in gpu.txt tests.txt bench_step.txt step_v2_lite.json transformers_baseline.json; do
      if [ -f "$work/$file" ]; then cp "$work/$file" "$out/"; fi
    done
    tar -czf "$out/logs.tar.gz" -C "$work" .
    echo "results in $out: $(ls "$out" | tr '\n' ' ')"
    exit $status
    ;;
  ab)
    shift
    rounds=3
    if [[ "${1:-}" =~ ^[0-9]+$ ]]; then
      rounds=$1
      shift
    fi
    builds=(base this)
    declare -A variant_env=()
    while [ "${1:-}" = "--variant" ]; do
      [ $# -ge 2 ] || usage_error "--variant needs 'NAME VAR=VALUE...'"
      read -r -a words <<<"$2"
      name=${words[0]:-}
      if [[ ! "$name" =~ ^[A-Za-z][A-Za-z0-9_-]*$ || "$name" = base || "$name" = this || -n "${variant_env[$name]+x}" ]]; then
        usage_error "a variant needs a new name of letters, digits, _ and - (not base or this): '$name'"
      fi
      for word in "${words[@]:1}"; do
        if [[ ! "$word" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]]; then
          usage_error "variant $name: '$word' is not VAR=VALUE"
        fi
      done
      variant_env[$name]="${words[*]:1}"
      builds+=("$name")
      shift 2
    done
    [ -f .gpu/base/cohort.xz ] || usage_error "no base build in .gpu/base (scripts/gpu_tests.sh bundle --base REV)"
    # The base build and every run's JSON and log go to $work; $out gets the comparison and one
    # archive of the runs.
    fresh_out ab
    unpack_base "$work/base"
    echo "base $(cat .gpu/base/REVISION), this build $(cat .gpu/REVISION)"
    echo "$rounds rounds of: cohort bench step $*"
    for round in $(seq "$rounds"); do
      for build in "${builds[@]}"; do
        select_build "$build"
        # NAME.ROUND: names hold no dot, so no build's files match another's pattern.
        read -r -a environment <<<"${variant_env[$build]:-}"
        if ! env "${environment[@]}" LD_LIBRARY_PATH="$library_path" "$bin" bench step "$@" \
            --output "$work/$build.$round.json" >"$work/$build.$round.txt" 2>&1; then
          tail -5 "$work/$build.$round.txt"
          tar -czf "$out/runs.tar.gz" -C "$work" --exclude=./base .
          exit 1
        fi
      done
    done
    for build in "${builds[@]:1}"; do
      [ "$build" = this ] || echo "== variant $build: ${variant_env[$build]}" | tee -a "$out/compare.txt"
      python3 scripts/compare_steps.py --base "$work"/base.[0-9]*.json --new "$work/$build".[0-9]*.json |
        tee -a "$out/compare.txt"
    done
    tar -czf "$out/runs.tar.gz" -C "$work" --exclude=./base .
    ;;
  cycles)
    regex=${2:-}
    [ -n "$regex" ] || usage_error "cycles needs a kernel name pattern, e.g. 'MoeGroupedGemmWs'"
    shift 2
    count=4
    if [ "${1:-}" = "--launch-count" ]; then
      [[ "${2:-}" =~ ^[1-9][0-9]*$ ]] || usage_error "--launch-count needs a positive number"
      count=$2
      shift 2
    fi
    [ $# -gt 0 ] || set -- --batch-sizes 1 --contexts 1024 --prefill 1x4096 --iterations 1 --warmup 0
    ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1 || true)
    [ -n "$ncu" ] || usage_error "no ncu (Nsight Compute) on this machine"
    fresh_out cycles
    builds=(this)
    if [ -f .gpu/base/cohort.xz ]; then
      unpack_base "$work/base"
      builds=(base this)
      echo "base $(cat .gpu/base/REVISION), this build $(cat .gpu/REVISION)" | tee "$out/compare.txt"
    else
      echo "this build $(cat .gpu/REVISION) (no base bundled)" | tee "$out/compare.txt"
    fi
    echo "ncu -k regex:$regex --launch-count $count over: cohort bench step $*" | tee -a "$out/compare.txt"
    for round in 1 2; do
      for build in "${builds[@]}"; do
        select_build "$build"
        if ! LD_LIBRARY_PATH="$library_path" "$ncu" --clock-control base --csv -k "regex:$regex" \
            --launch-count "$count" \
            --metrics sm__cycles_elapsed.max,sm__cycles_active.min,sm__cycles_active.avg,sm__cycles_active.max \
            "$bin" bench step "$@" >"$work/$build.$round.csv" 2>"$work/$build.$round.log"; then
          tail -5 "$work/$build.$round.log"
          tar -czf "$out/runs.tar.gz" -C "$work" --exclude=./base .
          exit 1
        fi
      done
    done
    base_args=()
    [ "${builds[0]}" = base ] && base_args=(--base "$work"/base.[0-9].csv)
    status=0
    python3 scripts/compare_cycles.py "${base_args[@]}" --new "$work"/this.[0-9].csv | tee -a "$out/compare.txt" ||
      status=1
    tar -czf "$out/runs.tar.gz" -C "$work" --exclude=./base .
    exit $status
    ;;
  sanitize)
    filter=${2:-}
    [ -n "$filter" ] || usage_error "sanitize needs a gtest filter, e.g. 'MoeGroupedGemmTest.*OnlyMultiplesOfEight'"
    shift 2
    tools=("$@")
    [ ${#tools[@]} -gt 0 ] || tools=(memcheck synccheck racecheck)
    sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1 || true)
    [ -n "$sanitizer" ] || usage_error "no compute-sanitizer on this machine"
    fresh_out sanitize
    echo "build $(cat .gpu/REVISION), $sanitizer, tests $filter" | tee "$out/summary.txt"
    status=0
    for tool in "${tools[@]}"; do
      if "$sanitizer" --tool "$tool" --error-exitcode 3 .gpu/bin/kernels_test --gtest_filter="$filter" \
          >"$work/$tool.log" 2>&1; then
        result=passed
        if grep -q '^\[  PASSED  \] 0 tests' "$work/$tool.log"; then
          result="FAILED (the filter names no test)"
          status=1
        fi
      else
        result="FAILED (exit $?)"
        status=1
      fi
      echo "== $tool: $result; $(grep -E '^\[  (PASSED|FAILED) ' "$work/$tool.log" | tr '\n' ' ')" | tee -a "$out/summary.txt"
      grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$work/$tool.log" | tee -a "$out/summary.txt" || true
    done
    tar -czf "$out/logs.tar.gz" -C "$work" .
    exit $status
    ;;
  trace)
    shift
    shapes=()
    while [[ "${1:-}" =~ ^[0-9]+x[0-9]+$ ]]; do
      shapes+=("$1")
      shift
    done
    [ ${#shapes[@]} -gt 0 ] || usage_error "trace needs at least one CONTEXTxBATCH shape, e.g. 1024x512"
    [ -f .gpu/lib/libcohort_kernel_trace.so ] ||
      usage_error "no kernel timeline library in .gpu/lib (was CUPTI found where it was bundled?)"
    cupti=$(find / -name 'libcupti.so*' -path '*lib*' 2>/dev/null | head -1 || true)
    [ -n "$cupti" ] || usage_error "no libcupti.so on this machine"
    fresh_out trace
    echo "build $(cat .gpu/REVISION), CUPTI $cupti" | tee "$out/summary.txt"
    status=0
    for shape in "${shapes[@]}"; do
      context=${shape%x*} batch=${shape#*x}
      echo "== context $context, batch $batch" | tee -a "$out/summary.txt"
      if LD_LIBRARY_PATH="$(dirname "$cupti")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
          CUDA_INJECTION64_PATH="$PWD/.gpu/lib/libcohort_kernel_trace.so" COHORT_KERNEL_TRACE="$work/$shape.csv" \
          .gpu/bin/cohort bench step --contexts "$context" --batch-sizes "$batch" --prefill '' "$@" \
          >"$work/$shape.log" 2>&1; then
        grep -E "^ +$context +$batch " "$work/$shape.log" | tee -a "$out/summary.txt" || true
        { python3 scripts/kernel_trace_step.py "$work/$shape.csv" --by-kernel &&
          python3 scripts/kernel_trace_step.py "$work/$shape.csv"; } >>"$out/summary.txt" 2>&1 || status=1
      else
        status=1
        tail -5 "$work/$shape.log" | tee -a "$out/summary.txt"
      fi
    done
    tar -czf "$out/traces.tar.gz" -C "$work" .
    exit $status
    ;;
  *)
    sed -n '2,/^# A skipped test/p' "$0" >&2
    exit 2
    ;;
esac
