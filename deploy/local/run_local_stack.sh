#!/usr/bin/env bash
# Runs a whole Cohort stack on this machine with one command: two CPU workers on the demo model
# (models/cohort-demo), one router in front of them, and Prometheus scraping all three. Ctrl-C (or
# SIGTERM) stops everything it started; so does any of them exiting on its own.
#
#   deploy/local/run_local_stack.sh                 # after scripts/setup.sh
#   deploy/local/run_local_stack.sh --no-prometheus
#
# Settings (environment):
#   COHORT_ROUTER_PORT=50051  router gRPC (cohort.v1.Inference)
#   COHORT_HTTP_PORT=8080     router OpenAI-style HTTP (-1: off)
#   COHORT_PROMETHEUS_PORT=9090
#   COHORT_MODEL=models/cohort-demo   COHORT_BIN_DIR=build/bin   COHORT_WORKER_THREADS=1
#   COHORT_STATE_DIR=<dir>    keep logs, port files and Prometheus data there (default: a temporary
#                             folder, removed on exit)
# Workers and metrics listen on ports the OS picks (read back from --port-file). Everything binds
# 127.0.0.1. Prometheus is Debian's package `prometheus`; for Grafana, import
# deploy/grafana/cohort.json and point its data source at the Prometheus URL printed below.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
bin_dir=${COHORT_BIN_DIR:-$root/build/bin}
model=${COHORT_MODEL:-$root/models/cohort-demo}
router_port=${COHORT_ROUTER_PORT:-50051}
http_port=${COHORT_HTTP_PORT:-8080}
prometheus_port=${COHORT_PROMETHEUS_PORT:-9090}
threads=${COHORT_WORKER_THREADS:-1}
prometheus=${PROMETHEUS:-/usr/bin/prometheus}
with_prometheus=1

for arg in "$@"; do
  case "$arg" in
    --no-prometheus) with_prometheus=0 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "run_local_stack: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done
for b in cohort-worker cohort-router; do
  [ -x "$bin_dir/$b" ] || { echo "run_local_stack: $bin_dir/$b not found: run scripts/setup.sh first" >&2; exit 1; }
done
[ -f "$model/config.json" ] || { echo "run_local_stack: $model/config.json not found (COHORT_MODEL)" >&2; exit 1; }
if [ "$with_prometheus" = 1 ] && [ ! -x "$prometheus" ]; then
  echo "run_local_stack: $prometheus not found: apt-get install prometheus, or pass --no-prometheus" >&2
  exit 1
fi

if [ -n "${COHORT_STATE_DIR:-}" ]; then
  state=$COHORT_STATE_DIR
  mkdir -p "$state"
  keep_state=1
else
  state=$(mktemp -d "${TMPDIR:-/tmp}/cohort-local.XXXXXX")
  keep_state=0
fi
: >"$state/pids"

names=()
pids=()
stopping=0
stop_all() {
  [ "$stopping" = 1 ] && return
  stopping=1
  trap '' INT TERM HUP
  echo "run_local_stack: stopping ${names[*]:-nothing}"
  local pid
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  # Workers drain for at most --drain-timeout (5 s here); then anything left is killed.
  for _ in $(seq 100); do
    local alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "$keep_state" = 0 ]; then rm -rf "$state"; else echo "run_local_stack: logs in $state"; fi
}
trap 'stop_all' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

start() {  # start NAME CMD...: runs CMD in the background, its output in $state/NAME.log
  local name=$1
  shift
  # In a session of its own, so Ctrl-C reaches only this script, which then stops the children
  # itself (instead of each of them exiting at once and looking like a crash).
  setsid "$@" >"$state/$name.log" 2>&1 </dev/null &
  names+=("$name")
  pids+=("$!")
  echo "$name $!" >>"$state/pids"
}

port_of() {  # port_of FILE KEY: a number from a --port-file JSON, e.g. {"grpc_port":50061,...}
  sed -n "s/.*\"$2\":\(-\{0,1\}[0-9]*\).*/\1/p" "$1"
}

wait_for_file() {  # wait_for_file NAME FILE: until FILE exists, or NAME's process died (60 s at most)
  local name=$1 file=$2 pid i
  pid=${pids[$((${#pids[@]} - 1))]}
  for i in $(seq 600); do
    [ -s "$file" ] && return 0
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "run_local_stack: $name exited; last lines of $state/$name.log:" >&2
      tail -n 20 "$state/$name.log" >&2
      exit 1
    fi
    sleep 0.1
  done
  echo "run_local_stack: $name did not start within 60 s (see $state/$name.log)" >&2
  exit 1
}

worker_targets=()
worker_metrics=()
for i in 1 2; do
  start "worker$i" "$bin_dir/cohort-worker" --model "$model" --device cpu --threads "$threads" \
    --host 127.0.0.1 --port 0 --metrics-port 0 --drain-timeout 5 --worker-id "local-worker$i" \
    --port-file "$state/worker$i.json"
  wait_for_file "worker$i" "$state/worker$i.json"
  worker_targets+=("127.0.0.1:$(port_of "$state/worker$i.json" grpc_port)")
  worker_metrics+=("127.0.0.1:$(port_of "$state/worker$i.json" metrics_port)")
done

start router "$bin_dir/cohort-router" --workers "$(IFS=,; echo "${worker_targets[*]}")" --host 127.0.0.1 \
  --port "$router_port" --http-port "$http_port" --metrics-port 0 --shutdown-timeout 5 \
  --port-file "$state/router.json"
wait_for_file router "$state/router.json"
router_metrics="127.0.0.1:$(port_of "$state/router.json" metrics_port)"
router_grpc=$(port_of "$state/router.json" grpc_port)
router_http=$(port_of "$state/router.json" http_port)

if [ "$with_prometheus" = 1 ]; then
  cat >"$state/prometheus.yml" <<EOF
# Written by deploy/local/run_local_stack.sh; deploy/prometheus/prometheus.yml is the Kubernetes one.
global:
  scrape_interval: 2s
  evaluation_interval: 2s
scrape_configs:
  - job_name: cohort
    static_configs:
      - targets: ["$router_metrics"]
        labels: {component: router}
      - targets: ["${worker_metrics[0]}", "${worker_metrics[1]}"]
        labels: {component: worker}
EOF
  start prometheus "$prometheus" --config.file="$state/prometheus.yml" --storage.tsdb.path="$state/prometheus" \
    --web.listen-address="127.0.0.1:$prometheus_port"
  for i in $(seq 600); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$prometheus_port") 2>/dev/null; then break; fi
    if ! kill -0 "${pids[$((${#pids[@]} - 1))]}" 2>/dev/null; then
      echo "run_local_stack: prometheus exited (port $prometheus_port in use? set COHORT_PROMETHEUS_PORT):" >&2
      tail -n 5 "$state/prometheus.log" >&2
      exit 1
    fi
    sleep 0.1
  done
fi

cat <<EOF
Cohort is running on 127.0.0.1 (model $(basename "$model")); Ctrl-C stops everything.
  router gRPC     127.0.0.1:$router_grpc   (cohort.v1.Inference; e.g. grpcurl -plaintext 127.0.0.1:$router_grpc list)
EOF
[ "$router_http" != "-1" ] && echo "  router HTTP     http://127.0.0.1:$router_http/v1/models"
echo "  workers         ${worker_targets[*]}"
echo "  metrics         http://$router_metrics/metrics  http://${worker_metrics[0]}/metrics  http://${worker_metrics[1]}/metrics"
[ "$with_prometheus" = 1 ] && echo "  prometheus      http://127.0.0.1:$prometheus_port   (Grafana: import deploy/grafana/cohort.json)"
echo "  logs            $state/*.log"
echo "run_local_stack: ready"

# Until Ctrl-C, or until one of them exits on its own.
while true; do
  wait -n || true
  for idx in "${!pids[@]}"; do
    if ! kill -0 "${pids[$idx]}" 2>/dev/null; then
      echo "run_local_stack: ${names[$idx]} exited; last lines of its log:" >&2
      tail -n 10 "$state/${names[$idx]}.log" >&2
      exit 1
    fi
  done
done
