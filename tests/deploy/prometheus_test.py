#!/usr/bin/python3
"""The real Prometheus server scrapes a real router and two real workers.

Starts two cohort-workers on a fixture model and a cohort-router in front of them (ports picked by
the OS, read from --port-file), and Prometheus (/usr/bin/prometheus, Debian package `prometheus`)
with deploy/prometheus/prometheus.yml's scrape job: its relabelling rules run as written, only the
Kubernetes pod discovery (not built into Debian's Prometheus) is replaced by a file listing the three
processes as pods would appear, annotations included, plus two decoys the rules must drop. The
scrape interval is 1 s. Ten greedy requests go through the router with Python stubs generated from
proto/. Then Prometheus' HTTP API must show: generated tokens, router requests with code OK and
time-to-first-token observations in the exact numbers sent; the batching-economics metrics observed
on every step, with bandwidth and FLOP fractions in (0, 1.5) and a positive cost per token; every
metric that deploy/grafana/cohort.json names among the scraped series; and every panel and variable
query of the dashboard answering with data. All processes are killed on exit.

  /usr/bin/python3 tests/deploy/prometheus_test.py --bin-dir build/bin
"""
import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

import yaml

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dashboard_test  # noqa: E402  (metric-name extraction shared with the static check)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REQUESTS = 10
MAX_TOKENS = 8


def wait_for(what, predicate, timeout_s, procs=()):
    deadline = time.time() + timeout_s
    while True:
        for name, p, log in procs:
            if p.poll() is not None:
                raise AssertionError(f"{name} exited with {p.returncode} while waiting for {what}:\n"
                                     + open(log).read()[-3000:])
        value = predicate()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.1)


def read_port_file(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    """Every process the test starts; stop() kills whatever is still running."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.procs = []

    def start(self, name, cmd):
        log = os.path.join(self.tmp, name + ".log")
        p = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT)
        self.procs.append((name, p, log))
        return p

    def stop(self):
        for _, p, _ in self.procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.time() + 10
        for _, p, _ in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


class PromAPI:
    def __init__(self, port):
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path, **params):
        url = self.base + path + ("?" + urllib.parse.urlencode(params) if params else "")
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr):
        data = self.get("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", data
        return data["result"]

    def scalar(self, expr):
        """The value of a one-series query, or None while it has no series."""
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def ready(self):
        try:
            with urllib.request.urlopen(self.base + "/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False


def generate_stubs(proto_dir, out):
    plugin = shutil.which("grpc_python_plugin")
    assert plugin, "grpc_python_plugin not found (Debian package protobuf-compiler-grpc)"
    subprocess.run(["protoc", f"--proto_path={proto_dir}", f"--python_out={out}", f"--grpc_out={out}",
                    f"--plugin=protoc-gen-grpc={plugin}", "cohort/v1/inference.proto",
                    "cohort/worker/v1/worker.proto"], check=True, cwd=proto_dir)
    sys.path.insert(0, out)


def prometheus_config(sd_file):
    """deploy/prometheus/prometheus.yml with file discovery in place of Kubernetes pod discovery."""
    with open(os.path.join(ROOT, "deploy", "prometheus", "prometheus.yml")) as f:
        config = yaml.safe_load(f)
    config["global"]["scrape_interval"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    (job,) = config["scrape_configs"]
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}], job
    del job["kubernetes_sd_configs"]
    job["file_sd_configs"] = [{"files": [sd_file], "refresh_interval": "1s"}]
    return config


def pod_target(pod, component, address, container_port_name, metrics_port, annotated=True):
    """A target as Kubernetes pod discovery announces one container port of a pod."""
    labels = {
        "__meta_kubernetes_namespace": "cohort-test",
        "__meta_kubernetes_pod_name": pod,
        "__meta_kubernetes_pod_phase": "Running",
        "__meta_kubernetes_pod_container_port_name": container_port_name,
        "__meta_kubernetes_pod_label_app_kubernetes_io_component": component,
        "__meta_kubernetes_pod_label_app_kubernetes_io_instance": "cohort",
    }
    if annotated:
        labels["__meta_kubernetes_pod_annotation_prometheus_io_scrape"] = "true"
        labels["__meta_kubernetes_pod_annotation_prometheus_io_port"] = str(metrics_port)
        labels["__meta_kubernetes_pod_annotation_prometheus_io_path"] = "/metrics"
    return {"targets": [address], "labels": labels}


def dashboard_queries():
    with open(os.path.join(ROOT, "deploy", "grafana", "cohort.json")) as f:
        dashboard = json.load(f)
    return dashboard, dashboard_test.expressions(dashboard)


def as_instant_query(expr):
    """A dashboard expression with Grafana's variables set as 'All' would set them."""
    return (expr.replace("$__rate_interval", "30s").replace("$worker", ".*").replace("$model", ".*")
            .replace("$kv_block_size", "16"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin-dir", default=os.path.join(ROOT, "build", "bin"))
    ap.add_argument("--model", default=os.path.join(ROOT, "tests", "fixtures", "models", "v3_plain"))
    ap.add_argument("--proto-dir", default=os.path.join(ROOT, "proto"))
    ap.add_argument("--prometheus", default="/usr/bin/prometheus")
    args = ap.parse_args()
    assert os.access(args.prometheus, os.X_OK), f"{args.prometheus} missing (Debian package prometheus)"

    tmp = tempfile.mkdtemp(prefix="cohort_prom_")
    stack = Stack(tmp)
    checks = []
    try:
        generate_stubs(args.proto_dir, tmp)
        import grpc
        from cohort.v1 import inference_pb2 as pb
        from cohort.v1 import inference_pb2_grpc

        # Two workers and a router, on ports the OS picks.
        worker_ports = []
        for i in range(2):
            pf = os.path.join(tmp, f"worker{i}.json")
            stack.start(f"worker{i}", [os.path.join(args.bin_dir, "cohort-worker"), "--model", args.model,
                                       "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
                                       "--threads", "1", "--port-file", pf])
            worker_ports.append(pf)
        worker_ports = [wait_for(f"worker{i} port file", lambda pf=pf: read_port_file(pf), 60, stack.procs)
                        for i, pf in enumerate(worker_ports)]
        router_pf = os.path.join(tmp, "router.json")
        stack.start("router", [os.path.join(args.bin_dir, "cohort-router"), "--workers",
                               ",".join(f"127.0.0.1:{w['grpc_port']}" for w in worker_ports),
                               "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--http-port", "-1",
                               "--port-file", router_pf])
        router = wait_for("router port file", lambda: read_port_file(router_pf), 30, stack.procs)
        channel = grpc.insecure_channel(f"127.0.0.1:{router['grpc_port']}")
        health = channel.unary_unary("/grpc.health.v1.Health/Check",
                                     request_serializer=lambda b: b, response_deserializer=lambda b: b)

        def router_serving():
            try:
                return health(b"", timeout=2) == b"\x08\x01"
            except grpc.RpcError:
                return False
        wait_for("router health SERVING", router_serving, 30, stack.procs)

        # Prometheus with the deployment's scrape job; discovery from a file, decoys included.
        sd_file = os.path.join(tmp, "targets.json")
        targets = [pod_target("cohort-router-0", "router", f"127.0.0.1:{router['grpc_port']}", "metrics",
                              router["metrics_port"])]
        for i, w in enumerate(worker_ports):
            # The address names the gRPC port; the prometheus.io/port annotation must redirect it.
            targets.append(pod_target(f"cohort-worker-{i}", "worker", f"127.0.0.1:{w['grpc_port']}", "metrics",
                                      w["metrics_port"]))
        targets.append(pod_target("cohort-worker-0", "worker", f"127.0.0.1:{worker_ports[0]['grpc_port']}", "grpc",
                                  worker_ports[0]["metrics_port"]))  # another port of the same pod
        targets.append(pod_target("unannotated", "other", "127.0.0.1:9", "metrics", 9, annotated=False))
        with open(sd_file, "w") as f:
            json.dump(targets, f)
        config_file = os.path.join(tmp, "prometheus.yml")
        with open(config_file, "w") as f:
            yaml.safe_dump(prometheus_config(sd_file), f)
        subprocess.run(["promtool", "check", "config", config_file], check=True, capture_output=True)
        prom_port = free_port()
        stack.start("prometheus", [args.prometheus, f"--config.file={config_file}",
                                   f"--storage.tsdb.path={os.path.join(tmp, 'tsdb')}",
                                   f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"])
        prom = PromAPI(prom_port)
        wait_for("Prometheus ready", prom.ready, 60, stack.procs)

        # Ten greedy requests through the router; half share a prompt, so the prefix cache hits.
        stub = inference_pb2_grpc.InferenceStub(channel)
        shared = list(range(3, 40))
        for i in range(REQUESTS):
            prompt = shared if i % 2 == 0 else [100 + i, 101 + i, 102 + i]
            request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt),
                                         sampling=pb.SamplingParams(temperature=0.0),
                                         stopping=pb.StoppingCriteria(max_tokens=MAX_TOKENS, ignore_eos=True))
            tokens, final = [], None
            for response in stub.Generate(request, timeout=30):
                if response.HasField("chunk"):
                    tokens.extend(response.chunk.token_ids)
                else:
                    final = response.final
            assert len(tokens) == MAX_TOKENS and final is not None, (tokens, final)

        # Scrapes: wait until Prometheus has seen all of it, and every target a few times.
        total = REQUESTS * MAX_TOKENS
        wait_for("generated tokens scraped", lambda: prom.scalar("sum(cohort_worker_generated_tokens_total)") == total,
                 30, stack.procs)
        wait_for("router requests scraped",
                 lambda: prom.scalar('sum(cohort_router_requests_total{code="OK"})') == REQUESTS, 30, stack.procs)
        wait_for("three scrapes of every target", lambda: (prom.scalar("min(count_over_time(up[1m]))") or 0) >= 3
                 and prom.scalar("count(up)") == 3, 30, stack.procs)

        def check(name, fn):
            try:
                fn()
                checks.append((name, None))
            except Exception as e:  # report every check, then fail
                checks.append((name, f"{type(e).__name__}: {e}"))

        def targets_relabelled():
            active = prom.get("/api/v1/targets", state="active")["activeTargets"]
            up = sorted((t["labels"]["pod"], t["labels"]["component"], t["labels"]["instance"], t["health"])
                        for t in active)
            want = sorted([("cohort-router-0", "router", f"127.0.0.1:{router['metrics_port']}", "up")] +
                          [(f"cohort-worker-{i}", "worker", f"127.0.0.1:{w['metrics_port']}", "up")
                           for i, w in enumerate(worker_ports)])
            assert up == want, f"scraped {up}, want {want}"
            assert all(t["labels"]["namespace"] == "cohort-test" and t["labels"]["release"] == "cohort"
                       for t in active)

        def generated_tokens():
            v = prom.scalar("sum(cohort_worker_generated_tokens_total)")
            assert v == total, v
            per_worker = prom.query("cohort_worker_generated_tokens_total")
            assert len(per_worker) == 2, per_worker

        def router_requests_ok():
            result = prom.query('cohort_router_requests_total{code="OK"}')
            assert result and sum(float(r["value"][1]) for r in result) == REQUESTS, result
            assert not prom.query('cohort_router_requests_total{code!="OK"}'), "a request failed"

        def ttft_observed():
            assert prom.scalar("sum(cohort_worker_time_to_first_token_seconds_count)") == REQUESTS
            assert prom.scalar("sum(cohort_router_time_to_first_token_seconds_count)") == REQUESTS
            assert prom.scalar('sum(cohort_worker_time_to_first_token_seconds_bucket{le="+Inf"})') == REQUESTS

        dashboard, exprs = dashboard_queries()

        def dashboard_metrics_scraped():
            scraped = set(prom.get("/api/v1/label/__name__/values"))
            named = {n for _, e in exprs for n in dashboard_test.promql_metric_names(e)}
            missing = sorted(named - scraped)
            assert not missing, f"dashboard metrics Prometheus never scraped: {missing}"
            assert len(named) >= 20, named

        def dashboard_queries_answer():
            empty = []
            for where, expr in exprs:
                if where.startswith("variable"):
                    continue
                result = prom.query(as_instant_query(expr))
                if not result:
                    empty.append(where)
            assert not empty, f"queries with no data: {empty}"
            for v in dashboard["templating"]["list"]:
                if v["type"] != "query":
                    continue
                metric, label = v["query"]["query"][len("label_values("):-1].split(",")
                values = prom.get(f"/api/v1/label/{label.strip()}/values", **{"match[]": metric.strip()})
                assert values, f"variable {v['name']} would list nothing"

        def prefix_cache_hit():
            assert prom.scalar("sum(cohort_worker_prefix_cache_hit_blocks_total)") > 0, "no prefix-cache hit"

        def economics():
            steps = prom.scalar("sum(cohort_worker_step_time_seconds_count)")
            assert steps and steps >= REQUESTS, steps
            for name in ("step_weight_read_bytes", "step_kv_read_bytes", "step_kv_write_bytes", "step_flops",
                         "memory_bandwidth_utilization_ratio", "flops_utilization_ratio"):
                count = prom.scalar(f"sum(cohort_worker_{name}_count)")
                assert count == steps, f"{name}: {count} observations for {steps} steps"
                assert prom.scalar(f"sum(cohort_worker_{name}_sum)") > 0, name
            # Time-weighted fractions of the peaks each worker measured (CPU backend), and the mean
            # over steps: busy but not beyond the hardware (a toy model's weights sit in cache, hence 1.5).
            moved = " + ".join(f"sum by (instance) (cohort_worker_step_{k}_bytes_sum)"
                               for k in ("weight_read", "kv_read", "kv_write"))
            busy = "sum by (instance) (cohort_worker_step_time_seconds_sum)"
            fractions = {
                "bandwidth": f"({moved}) / {busy} / sum by (instance) "
                             "(cohort_worker_peak_memory_bandwidth_bytes_per_second)",
                "FLOPs": f"sum by (instance) (cohort_worker_step_flops_sum) / {busy} / sum by (instance) "
                         "(cohort_worker_peak_flops_per_second)",
                "bandwidth per step": "sum by (instance) (cohort_worker_memory_bandwidth_utilization_ratio_sum) / "
                                      "sum by (instance) (cohort_worker_memory_bandwidth_utilization_ratio_count)",
                "FLOPs per step": "sum by (instance) (cohort_worker_flops_utilization_ratio_sum) / "
                                  "sum by (instance) (cohort_worker_flops_utilization_ratio_count)",
            }
            stepped = " and on (instance) sum by (instance) (cohort_worker_step_time_seconds_count) > 0"
            for what, expr in fractions.items():
                result = prom.query(f"({expr}){stepped}")  # workers the router sent work to
                assert result, (what, result)
                for r in result:
                    assert 0 < float(r["value"][1]) < 1.5, (what, r)
            # Dollars: step seconds at the default $3 per device-hour, per million generated tokens.
            dollars = prom.scalar("sum(cohort_worker_step_cost_dollars_total)")
            seconds = prom.scalar("sum(cohort_worker_step_time_seconds_sum)")
            assert abs(dollars - seconds * 3.0 / 3600) <= 1e-6 * dollars, (dollars, seconds)
            per_mtok = prom.scalar("1e6 * sum(cohort_worker_step_cost_dollars_total) / "
                                   "sum(cohort_worker_generated_tokens_total)")
            assert per_mtok > 0, per_mtok
            assert prom.scalar("min(cohort_worker_device_cost_dollars_per_hour)") == 3.0

        check("Prometheus scrapes the three processes through the deployment's relabelling", targets_relabelled)
        check(f"generated tokens counter = {total}", generated_tokens)
        check(f"router requests with code OK = {REQUESTS}", router_requests_ok)
        check("TTFT histograms counted every request", ttft_observed)
        check("every dashboard metric is among the scraped series", dashboard_metrics_scraped)
        check("every dashboard query answers with data", dashboard_queries_answer)
        check("repeated prompts hit the prefix cache", prefix_cache_hit)
        check("economics: bytes, FLOPs, utilization in (0, 1.5) and $ per million tokens", economics)
    finally:
        stack.stop()
        logs = {name: log for name, _, log in stack.procs}
        failed_any = not checks or any(err for _, err in checks)
        if failed_any:
            for name, log in logs.items():
                print(f"--- {name} log (last lines)\n" + open(log).read()[-1500:])
        shutil.rmtree(tmp, ignore_errors=True)

    failed = 0
    for name, err in checks:
        print(f"ok   {name}" if err is None else f"FAIL {name}: {err}")
        failed += err is not None
    # One test, its checks listed above.
    print("1 passed, 0 failed" if not failed else "0 passed, 1 failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # a failure outside the listed checks: still one closing line
        import traceback
        traceback.print_exc()
        print(f"FAIL {type(e).__name__}: {e}")
        print("0 passed, 1 failed")
        sys.exit(1)
