#!/usr/bin/python3
"""deploy/local/run_local_stack.sh starts the whole stack with one command, and Ctrl-C stops it all.

Runs the script in a process group of its own on free ports, waits for its "ready" line, checks that
the router's HTTP front lists the demo model and that Prometheus scrapes all three processes, then
sends SIGINT to the group, as a terminal's Ctrl-C does. The script must exit 130 within the bound and
leave none of the processes it started (listed in its state folder) running.

  /usr/bin/python3 tests/deploy/local_stack_test.py --bin-dir build/bin
"""
import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "deploy", "local", "run_local_stack.sh")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes; only the script (its parent) could reap it.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin-dir", default=os.path.join(ROOT, "build", "bin"))
    args = ap.parse_args()
    # A test started in the background by a shell inherits SIGINT ignored, and so would the script,
    # whose Ctrl-C trap is the point here; with a handler of our own, exec resets it to the default.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    tmp = tempfile.mkdtemp(prefix="cohort_local_")
    state = os.path.join(tmp, "state")
    ports = {"COHORT_ROUTER_PORT": free_port(), "COHORT_HTTP_PORT": free_port(), "COHORT_PROMETHEUS_PORT": free_port()}
    env = dict(os.environ, COHORT_BIN_DIR=args.bin_dir, COHORT_STATE_DIR=state,
               **{k: str(v) for k, v in ports.items()})
    out_path = os.path.join(tmp, "out.log")
    out = open(out_path, "w")
    script = subprocess.Popen(["bash", SCRIPT], env=env, stdout=out, stderr=subprocess.STDOUT,
                              start_new_session=True)
    pids = []
    ok = False
    try:
        deadline = time.time() + 90
        while "run_local_stack: ready" not in open(out_path).read():
            assert script.poll() is None, "script exited before ready:\n" + open(out_path).read()
            assert time.time() < deadline, "not ready in 90 s:\n" + open(out_path).read()
            time.sleep(0.1)
        pids = [(line.split()[0], int(line.split()[1])) for line in open(os.path.join(state, "pids"))]
        assert [n for n, _ in pids] == ["worker1", "worker2", "router", "prometheus"], pids

        models = http_json(f"http://127.0.0.1:{ports['COHORT_HTTP_PORT']}/v1/models")
        assert [m["id"] for m in models["data"]] == ["cohort-demo"], models
        prom = f"http://127.0.0.1:{ports['COHORT_PROMETHEUS_PORT']}"
        deadline = time.time() + 30
        while True:
            up = http_json(prom + "/api/v1/query?query=up")["data"]["result"]
            if len(up) == 3 and all(r["value"][1] == "1" for r in up):
                break
            assert time.time() < deadline, f"Prometheus does not scrape the three processes: {up}"
            time.sleep(0.5)
        assert {r["metric"]["component"] for r in up} == {"router", "worker"}, up

        os.killpg(script.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends
        code = script.wait(timeout=30)
        assert code == 130, f"exit code {code} after Ctrl-C:\n" + open(out_path).read()
        left = [(n, p) for n, p in pids if alive(p)]
        assert not left, f"still running after Ctrl-C: {left}"
        assert "stopping worker1 worker2 router prometheus" in open(out_path).read()
        ok = True
    finally:
        if script.poll() is None:
            os.killpg(script.pid, signal.SIGKILL)
            script.wait()
        for _, pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if not ok:
            print(open(out_path).read()[-3000:])
        shutil.rmtree(tmp, ignore_errors=True)
    print("ok   run_local_stack.sh starts router, two workers and Prometheus; Ctrl-C stops them all")
    print("1 passed, 0 failed")


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # a failure outside the listed checks: still one closing line
        import traceback
        traceback.print_exc()
        print(f"FAIL {type(e).__name__}: {e}")
        print("0 passed, 1 failed")
        sys.exit(1)
