#!/usr/bin/env bash
# Starts a CPU cohort-worker with the bundled demo model and a cohort-router in front of it, streams
# one completion through the router's OpenAI-style HTTP front to the terminal, then stops both.
#
#   scripts/demo.sh ["prompt text"]     (run scripts/setup.sh first; the README's first command does)
set -euo pipefail
cd "$(dirname "$0")/.."
prompt=${1:-"The meaning of life is"}
bin=${BIN_DIR:-build/bin}
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

wait_for() {  # a port file written by a server once it serves
  for _ in $(seq 300); do [ -s "$1" ] && return 0; sleep 0.05; done
  echo "demo: $2 did not start; its log:" >&2; cat "$3" >&2; exit 1
}
port_of() { /usr/bin/python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$1" "$2"; }

"$bin/cohort-worker" --model models/cohort-demo --host 127.0.0.1 --port 0 --metrics-port -1 \
  --kv-cache-bytes 64000000 --port-file "$work/worker.json" >"$work/worker.log" 2>&1 &
pids+=($!)
wait_for "$work/worker.json" cohort-worker "$work/worker.log"
"$bin/cohort-router" --workers "127.0.0.1:$(port_of "$work/worker.json" grpc_port)" --host 127.0.0.1 --port 0 \
  --http-port 0 --metrics-port -1 --port-file "$work/router.json" >"$work/router.log" 2>&1 &
pids+=($!)
wait_for "$work/router.json" cohort-router "$work/router.log"
http=$(port_of "$work/router.json" http_port)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$http/ready" >/dev/null && break; sleep 0.05; done

echo "cohort demo: a 3.7M-parameter DeepSeek-V3-architecture model trained on Debian's fortunes,"
echo "served by a CPU worker behind the router. Prompt: $prompt"
echo
body=$(/usr/bin/python3 -c 'import json,sys; print(json.dumps({"model": "cohort-demo", "prompt": sys.argv[1],
  "max_tokens": 60, "temperature": 0.8, "top_p": 0.95, "seed": 7, "stream": True}))' "$prompt")
printf '%s' "$prompt"
curl -sN "http://127.0.0.1:$http/v1/completions" -H 'Content-Type: application/json' -d "$body" |
  /usr/bin/python3 -u -c '
import json, sys
for line in sys.stdin:
    if not line.startswith("data: ") or line.strip() == "data: [DONE]":
        continue
    event = json.loads(line[6:])
    if "error" in event:
        sys.exit("\ndemo: " + event["error"]["message"])
    for choice in event.get("choices", []):
        sys.stdout.write(choice.get("text", ""))
    sys.stdout.flush()
print()'
