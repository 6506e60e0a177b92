#!/usr/bin/env bash
# The batching report: starts a cohort-worker (with the worker flags given after --) and a
# cohort-router on 127.0.0.1, drives them with `cohort bench serve`, and writes every result as JSON
# plus a summary (summary.md) into the output folder:
#
#   sweep.json            one user versus many: concurrency 1, 2, 4, ... up to --max-concurrency
#   mixed_continuous.json  continuous batching on a mixed-length workload ...
#   mixed_static.json      ... and the same requests with the worker restarted as --scheduler static
#   prefix_on.json         a shared-prefix workload with the prefix cache ...
#   prefix_off.json        ... and without it (--no-prefix-caching)
#
# --only runs some of the three parts; parts run by separate invocations into the same folder add
# up in summary.md (each stays within a short time limit).
#
# Then `python3 scripts/plot_bench.py OUT` draws them (it needs matplotlib; this script does not).
# Only bash and coreutils are used, so it runs where the binaries come from a bundle (.gpu/bin).
#
#   scripts/bench_report.sh --out bench-report -- --model models/cohort-demo
#   source .gpu/env.sh && scripts/bench_report.sh --bin-dir .gpu/bin --out docs/bench -- \
#       --device cuda --model synthetic:deepseek-v2-lite
set -euo pipefail

usage() {
  cat <<'EOF'
usage: scripts/bench_report.sh [flags] -- WORKER_FLAGS...

  --bin-dir DIR               cohort, cohort-worker and cohort-router (default build/bin)
  --out DIR                   where the JSON files and summary.md go (default bench-report)
  --only LIST                 sweep,static,prefix (default: all three)
  --max-concurrency N         the sweep's last level (default 256)
  --input-len L --output-len L            the sweep's lengths (default 256, 256)
  --requests-per-user X --min-requests N  measured requests per level: max(N, X * concurrency) (default 2, 6)
  --mixed-concurrency N       continuous vs static, at this concurrency (default 64)
  --mixed-input-len L --mixed-output-len L  (default uniform:32:512, exponential:128:1024)
  --mixed-requests N          (default 128)
  --prefix-concurrency N      prefix caching on vs off, at this concurrency (default 32)
  --prefix-len N --prefix-input-len L --prefix-output-len L  (default 2048, 64, 64)
  --prefix-requests N         (default 96)
  --bench-flags "FLAGS"       more flags for every `cohort bench serve` (e.g. "--slo-tpot-ms 50")
  --router-flags "FLAGS"      more flags for cohort-router
  --start-timeout-s N         how long the worker may take to load and serve (default 600)

Lengths (L) are N, uniform:MIN:MAX, normal:MEAN:STDDEV or exponential:MEAN:MAX.
EOF
}

bin=build/bin
out=bench-report
only=sweep,static,prefix
max_concurrency=256
input_len=256
output_len=256
requests_per_user=2
min_requests=6
mixed_concurrency=64
mixed_input_len=uniform:32:512
mixed_output_len=exponential:128:1024
mixed_requests=128
prefix_concurrency=32
prefix_len=2048
prefix_input_len=64
prefix_output_len=64
prefix_requests=96
bench_flags=""
router_flags=""
start_timeout_s=600
worker_flags=()

while [ $# -gt 0 ]; do
  case "$1" in
    --) shift; worker_flags=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    --bin-dir|--out|--only|--max-concurrency|--input-len|--output-len|--requests-per-user|--min-requests|\
    --mixed-concurrency|--mixed-input-len|--mixed-output-len|--mixed-requests|--prefix-concurrency|--prefix-len|\
    --prefix-input-len|--prefix-output-len|--prefix-requests|--bench-flags|--router-flags|--start-timeout-s)
      [ $# -ge 2 ] || { echo "bench_report: $1 needs a value" >&2; exit 2; }
      name=${1#--}
      name=${name//-/_}
      [ "$name" = bin_dir ] && name=bin
      printf -v "$name" '%s' "$2"
      shift 2 ;;
    *) echo "bench_report: unknown flag $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ ${#worker_flags[@]} -gt 0 ] || { echo "bench_report: give the worker's flags after --, e.g. -- --model models/cohort-demo" >&2; exit 2; }
for b in cohort cohort-worker cohort-router; do
  [ -x "$bin/$b" ] || { echo "bench_report: $bin/$b is missing (build first, or pass --bin-dir)" >&2; exit 2; }
done
for part in ${only//,/ }; do
  case "$part" in sweep|static|prefix) ;; *) echo "bench_report: --only: '$part' is not sweep, static or prefix" >&2; exit 2 ;; esac
done
wants() { [[ ",$only," == *",$1,"* ]]; }

mkdir -p "$out"
work=$(mktemp -d)
worker_pid=""
router_pid=""
stop_stack() {
  for pid in $router_pid $worker_pid; do
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  router_pid=""
  worker_pid=""
}
cleanup() {
  stop_stack
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The value of "key" in a one-line port file: {"grpc_port":123,"metrics_port":-1}.
port_of() {
  local text
  text=$(<"$1")
  text=${text#*\""$2"\":}
  echo "${text%%[,\}]*}"
}

# wait_for FILE PID NAME LOG TIMEOUT_S: until the server wrote its port file.
wait_for() {
  local deadline=$((SECONDS + $5))
  until [ -s "$1" ]; do
    if ! kill -0 "$2" 2>/dev/null; then
      echo "bench_report: $3 exited before serving; its log ($4) ends:" >&2
      tail -n 20 "$4" >&2
      exit 1
    fi
    if [ $SECONDS -ge $deadline ]; then
      echo "bench_report: $3 did not serve within $5 s; its log ($4) ends:" >&2
      tail -n 20 "$4" >&2
      exit 1
    fi
    sleep 0.2
  done
}

# start_stack NAME EXTRA_WORKER_FLAGS...: a worker (the user's flags, then these) and a router.
router_address=""
start_stack() {
  local name=$1
  shift
  stop_stack
  rm -f "$work/worker.json" "$work/router.json"
  echo "bench_report: starting the worker ($name): ${worker_flags[*]} $*"
  "$bin/cohort-worker" "${worker_flags[@]}" "$@" --host 127.0.0.1 --port 0 --metrics-port -1 \
    --port-file "$work/worker.json" >"$out/worker_$name.log" 2>&1 &
  worker_pid=$!
  wait_for "$work/worker.json" "$worker_pid" cohort-worker "$out/worker_$name.log" "$start_timeout_s"
  # shellcheck disable=SC2086
  "$bin/cohort-router" --workers "127.0.0.1:$(port_of "$work/worker.json" grpc_port)" --host 127.0.0.1 --port 0 \
    --metrics-port -1 --port-file "$work/router.json" $router_flags >"$out/router_$name.log" 2>&1 &
  router_pid=$!
  wait_for "$work/router.json" "$router_pid" cohort-router "$out/router_$name.log" 60
  router_address="127.0.0.1:$(port_of "$work/router.json" grpc_port)"
}

# bench NAME FLAGS...: one `cohort bench serve` through the router; NAME.json and NAME.txt.
bench() {
  local name=$1
  shift
  echo "bench_report: $name"
  # shellcheck disable=SC2086
  "$bin/cohort" bench serve --target "$router_address" --connect-timeout-s 60 --label "$name" \
    --output "$out/$name.json" "$@" $bench_flags | tee "$out/$name.txt"
}

# Values of a run-level field (or of a field of a run-level object, e.g. tpot_ms p50) in a results
# file, one per run in order. The JSON is indented by 2 per level: run fields sit at 6 spaces.
run_values() {
  local file=$1 key=$2 sub=${3:-} line inside=0
  while IFS= read -r line; do
    if [ -z "$sub" ]; then
      [[ "$line" == "      \"$key\": "* ]] && { line=${line#*: }; echo "${line%,}"; }
    elif [[ "$line" == "      \"$key\": {" ]]; then
      inside=1
    elif [ $inside = 1 ] && [[ "$line" == "        \"$sub\": "* ]]; then
      line=${line#*: }
      echo "${line%,}"
      inside=0
    fi
  done <"$file"
}

# table_rows FILE LABEL [HEADER]: the rows of the table `cohort bench serve` printed, the load
# column renamed LABEL (and with HEADER, the header line first, its first column renamed HEADER).
table_rows() {
  local line
  while IFS= read -r line; do
    if [ -n "${3:-}" ] && [[ "$line" == "load "* ]]; then
      printf '%-16s%s\n' "$3" "${line:16}"
    elif [[ "$line" == "concurrency "* ]]; then
      printf '%-16s%s\n' "$2" "${line:16}"
    fi
  done <"$1"
}

# A decimal as an integer count of thousandths (tiny values in exponent form count as 0).
milli() {
  local v=$1 whole frac
  [[ "$v" == *[eE]* || "$v" == null ]] && { echo 0; return; }
  whole=${v%%.*}
  frac=000
  [[ "$v" == *.* ]] && frac="${v#*.}000"
  echo $((10#${whole:-0} * 1000 + 10#${frac:0:3}))
}

# ratio A B: A / B with two decimals ("n/a" when B is 0).
ratio() {
  local a b
  a=$(milli "$1")
  b=$(milli "$2")
  [ "$b" -gt 0 ] || { echo n/a; return; }
  local hundredths=$((a * 100 / b))
  printf '%d.%02d' $((hundredths / 100)) $((hundredths % 100))
}

levels=""
for ((c = 1; c < max_concurrency; c *= 2)); do levels+="$c,"; done
levels+=$max_concurrency

# Each part writes its own section (summary_PART.md); summary.md joins those present, so parts run
# by separate invocations into one --out (e.g. --only sweep, then --only static,prefix) add up.
section_header() {
  echo
  echo "_$(date -u +%Y-%m-%dT%H:%M:%SZ); worker flags: \`${worker_flags[*]}\`; binaries: \`$bin\`_"
}

start_stack continuous
if wants sweep; then
  bench sweep --concurrency "$levels" --input-len "$input_len" --output-len "$output_len" \
    --num-requests "$min_requests" --num-requests-per-user "$requests_per_user"
  mapfile -t tput < <(run_values "$out/sweep.json" output_throughput)
  mapfile -t tpot < <(run_values "$out/sweep.json" tpot_ms p50)
  last=$((${#tput[@]} - 1))
  {
    echo
    echo "## One user versus many (input $input_len, output $output_len tokens)"
    section_header
    echo
    echo '```'
    while IFS= read -r line; do
      [[ "$line" == "cohort bench serve"* || "$line" == "results:"* ]] || echo "$line"
    done <"$out/sweep.txt"
    echo '```'
    echo
    echo "- output tokens/s at concurrency $max_concurrency / at concurrency 1: $(ratio "${tput[$last]}" "${tput[0]}")x"
    echo "- TPOT p50 at concurrency $max_concurrency / at concurrency 1: $(ratio "${tpot[$last]}" "${tpot[0]}")x"
  } >"$out/summary_sweep.md"
fi
mixed_flags=(--concurrency "$mixed_concurrency" --input-len "$mixed_input_len" --output-len "$mixed_output_len"
  --num-requests "$mixed_requests")
prefix_flags=(--concurrency "$prefix_concurrency" --shared-prefix-len "$prefix_len" --input-len "$prefix_input_len"
  --output-len "$prefix_output_len" --num-requests "$prefix_requests")
wants static && bench mixed_continuous "${mixed_flags[@]}"
wants prefix && bench prefix_on "${prefix_flags[@]}"
if wants static; then
  start_stack static --scheduler static
  bench mixed_static "${mixed_flags[@]}"
  {
    echo
    echo "## Continuous versus static batching (concurrency $mixed_concurrency, input $mixed_input_len, output $mixed_output_len)"
    section_header
    echo
    echo '```'
    table_rows "$out/mixed_continuous.txt" continuous scheduler
    table_rows "$out/mixed_static.txt" static
    echo '```'
    echo
    echo "- output tokens/s, continuous / static: $(ratio "$(run_values "$out/mixed_continuous.json" output_throughput)" \
      "$(run_values "$out/mixed_static.json" output_throughput)")x"
  } >"$out/summary_static.md"
fi
if wants prefix; then
  start_stack no-prefix-caching --no-prefix-caching
  bench prefix_off "${prefix_flags[@]}"
  {
    echo
    echo "## Prefix caching on versus off (shared prefix $prefix_len tokens, then $prefix_input_len; output $prefix_output_len; concurrency $prefix_concurrency)"
    section_header
    echo
    echo '```'
    table_rows "$out/prefix_on.txt" on "prefix cache"
    table_rows "$out/prefix_off.txt" off
    echo '```'
    echo
    echo "- cached prompt tokens: on $(run_values "$out/prefix_on.json" cached_prompt_tokens), off $(run_values "$out/prefix_off.json" cached_prompt_tokens)"
    echo "- TTFT p50, off / on: $(ratio "$(run_values "$out/prefix_off.json" ttft_ms p50)" "$(run_values "$out/prefix_on.json" ttft_ms p50)")x"
    echo "- output tokens/s, on / off: $(ratio "$(run_values "$out/prefix_on.json" output_throughput)" "$(run_values "$out/prefix_off.json" output_throughput)")x"
  } >"$out/summary_prefix.md"
fi
stop_stack

summary="$out/summary.md"
{
  echo "# Cohort batching report"
  for part in sweep static prefix; do
    if [ -f "$out/summary_$part.md" ]; then cat "$out/summary_$part.md"; fi
  done
} >"$summary"

echo
cat "$summary"
echo
echo "bench_report: results in $out; plots: python3 scripts/plot_bench.py $out"
