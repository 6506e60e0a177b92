#!/usr/bin/python3
"""Renders deploy/helm/cohort for every values file in tests/deploy/values/ and checks the output.

Without Helm on this machine the chart is rendered by tests/deploy/helm_render (Go text/template and
sprig, the engine Helm uses, built offline from Debian's Go packages). Each case checks that the
output is a stream of YAML documents that hold what the values asked for: replica counts, GPU
requests, the worker DNS name in the router's arguments, gRPC probes, labels and selectors that
match, the security context, the dashboard ConfigMap equal to deploy/grafana/cohort.json, and every
worker and router argument a flag that the real binaries accept (their --help). See
deploy/helm/cohort/README.md for what this does not prove.

Run with Debian's python3 (python3-yaml) and Go (golang-go, golang-github-masterminds-sprig-dev,
golang-gopkg-yaml.v2-dev):
  /usr/bin/python3 tests/deploy/helm_test.py --bin-dir build/bin [--work-dir build/tests/deploy]
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHART = os.path.join(ROOT, "deploy", "helm", "cohort")
VALUES = os.path.join(ROOT, "tests", "deploy", "values")
DASHBOARD = os.path.join(ROOT, "deploy", "grafana", "cohort.json")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class Rendered:
    def __init__(self, text, notes):
        self.text = text
        self.notes = notes
        self.docs = [d for d in yaml.safe_load_all(text) if d is not None]
        self.by_kind = {}
        for d in self.docs:
            self.by_kind.setdefault(d["kind"], []).append(d)

    def one(self, kind, name=None):
        docs = [d for d in self.by_kind.get(kind, []) if name is None or d["metadata"]["name"] == name]
        assert len(docs) == 1, f"expected one {kind} {name or ''}, found {len(docs)}"
        return docs[0]

    def none(self, kind):
        assert kind not in self.by_kind, f"unexpected {kind}: {[d['metadata']['name'] for d in self.by_kind[kind]]}"


def build_renderer(work_dir):
    exe = os.path.join(work_dir, "helm_render")
    env = dict(os.environ, GO111MODULE="off", GOPATH="/usr/share/gocode", GOFLAGS="", GOENV="off",
               GOCACHE=os.path.join(work_dir, "go-cache"))
    subprocess.run(["go", "build", "-o", exe, "./tests/deploy/helm_render"], cwd=ROOT, env=env, check=True)
    return exe


def render(renderer, values_file, tmp, release="cohort", namespace="default", kube_version="1.30.0"):
    notes = os.path.join(tmp, "NOTES.txt")
    if os.path.exists(notes):
        os.remove(notes)
    args = [renderer, "--chart", CHART, "--strict", "--release-name", release, "--namespace", namespace,
            "--notes-out", notes, "--kube-version", kube_version]
    if values_file:
        args += ["-f", os.path.join(VALUES, values_file)]
    p = subprocess.run(args, capture_output=True, text=True)
    if p.returncode != 0:
        raise RenderError(p.stderr.strip())
    return Rendered(p.stdout, open(notes).read())


class RenderError(Exception):
    pass


def binary_flags(binary):
    out = subprocess.run([binary, "--help"], capture_output=True, text=True, check=True).stdout
    return set(re.findall(r"^\s+--([a-z0-9-]+)", out, re.M))


def arg_flags(args):
    names = []
    for a in args:
        assert a.startswith("--"), f"argument {a!r} is not a --flag"
        names.append(a[2:].split("=", 1)[0])
    return names


def args_of(container):
    return dict(a[2:].split("=", 1) for a in container["args"] if "=" in a)


def container(workload, name):
    cs = [c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    assert len(cs) == 1, f"no container {name}"
    return cs[0]


def check_common(r, flags, release, namespace):
    """What must hold for every values file."""
    for d in r.docs:
        md = d["metadata"]
        assert d.get("apiVersion") and d.get("kind"), d
        assert DNS_LABEL.match(md["name"]) and len(md["name"]) <= 63, f"bad name {md['name']}"
        assert md["namespace"] == namespace, (md["name"], md.get("namespace"))
        labels = md["labels"]
        assert labels["app.kubernetes.io/instance"] == release and labels["app.kubernetes.io/name"] == "cohort", labels
        assert labels["app.kubernetes.io/managed-by"] == "Helm", labels
        for k, v in labels.items():
            assert isinstance(v, str) and len(v) <= 63, f"label {k}={v!r} is not a short string"

    deploy = r.one("Deployment")
    sts = r.one("StatefulSet")
    headless = [s for s in r.by_kind["Service"] if s["spec"].get("clusterIP") == "None"]
    assert len(headless) == 1, "one headless Service for the workers"
    headless = headless[0]
    router_svc = [s for s in r.by_kind["Service"] if s is not headless]
    assert len(router_svc) == 1
    router_svc = router_svc[0]

    for workload, component, svc in ((deploy, "router", router_svc), (sts, "worker", headless)):
        sel = workload["spec"]["selector"]["matchLabels"]
        pod_labels = workload["spec"]["template"]["metadata"]["labels"]
        assert sel["app.kubernetes.io/component"] == component, sel
        assert all(pod_labels.get(k) == v for k, v in sel.items()), (sel, pod_labels)
        assert svc["spec"]["selector"] == sel, (svc["spec"]["selector"], sel)
        pod = workload["spec"]["template"]["spec"]
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0, psc
        c = pod["containers"][0]
        csc = c["securityContext"]
        assert csc["readOnlyRootFilesystem"] is True and csc["allowPrivilegeEscalation"] is False, csc
        assert csc["capabilities"]["drop"] == ["ALL"], csc
        assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"]), "a writable /tmp"
        mounted = {m["name"] for m in c["volumeMounts"]}
        assert mounted <= {v["name"] for v in pod["volumes"]}, "every mount has a volume"
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        for sp in svc["spec"]["ports"]:
            assert sp["targetPort"] in ports, f"{svc['metadata']['name']} targets missing port {sp['targetPort']}"
        grpc_port = ports["grpc"]
        probes = ("readinessProbe", "livenessProbe") + (("startupProbe",) if component == "worker" else ())
        for probe in probes:
            assert c[probe]["grpc"]["port"] == grpc_port, f"{component} {probe} is not gRPC on {grpc_port}"
        args = args_of(c)
        assert int(args["port"]) == grpc_port and int(args["metrics-port"]) == ports["metrics"], args
        unknown = [f for f in arg_flags(c["args"]) if f not in flags[component]]
        assert not unknown, f"cohort-{component} has no flags {unknown}"

    worker_env = {e["name"]: e for e in container(sts, "worker")["env"]}
    assert worker_env["NCCL_NVLS_ENABLE"]["value"] == "0", worker_env
    assert sts["spec"]["serviceName"] == headless["metadata"]["name"]
    assert headless["spec"]["publishNotReadyAddresses"] is False
    router_ports = {p["name"]: p["port"] for p in router_svc["spec"]["ports"]}
    assert router_ports == {"grpc": 50051, "http": 8080}, router_ports
    assert r.notes.strip(), "NOTES.txt renders"
    return deploy, sts, headless


def workers_dns(deploy):
    return args_of(container(deploy, "router"))["workers-dns"]


def gpu(c, side):
    return c["resources"].get(side, {}).get("nvidia.com/gpu")


def test_defaults(r):
    deploy, sts, headless = check_common(r, FLAGS, "cohort", "default")
    assert deploy["spec"]["replicas"] == 2
    assert sts["spec"]["replicas"] == 1
    w = container(sts, "worker")
    assert gpu(w, "limits") == 1 and gpu(w, "requests") == 1
    a = args_of(w)
    assert "gpus" not in a, "one GPU is the worker's default"
    assert a["model"] == "/models/DeepSeek-V3" and a["device"] == "cuda", a
    assert a["kv-cache-bytes"] == "64424509440" and a["max-batch-tokens"] == "8192" and a["max-running"] == "256", a
    assert workers_dns(deploy) == "cohort-worker-headless.default.svc.cluster.local:50061"
    assert r.notes.count("cohort-worker-headless.default.svc.cluster.local:50061") == 1, r.notes
    claim = r.one("PersistentVolumeClaim")
    vol = [v for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == "model"][0]
    assert vol["persistentVolumeClaim"] == {"claimName": claim["metadata"]["name"], "readOnly": True}, vol
    assert claim["spec"]["resources"]["requests"]["storage"] == "2Ti"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"], "many workers mount it, a loader fills it"
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert f"PersistentVolumeClaim {claim['metadata']['name']}" in r.notes, r.notes
    assert any(m["mountPath"] == "/models" and m["readOnly"] for m in w["volumeMounts"])
    pod_ann = sts["spec"]["template"]["metadata"]["annotations"]
    assert pod_ann == {"prometheus.io/scrape": "true", "prometheus.io/port": "9091", "prometheus.io/path": "/metrics"}
    assert deploy["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == "9090"
    r.none("HorizontalPodAutoscaler")
    r.none("PodMonitor")
    cm = r.one("ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    with open(DASHBOARD) as f:
        want = f.read()
    assert cm["data"]["cohort.json"] == want.rstrip("\n"), "dashboard ConfigMap differs from deploy/grafana/cohort.json"


def test_hpa_podmonitor(r):
    deploy, sts, _ = check_common(r, FLAGS, "cohort", "default")
    assert "replicas" not in deploy["spec"], "the HPA owns the router count"
    hpa = r.one("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deploy["metadata"]["name"]}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    assert hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"] == 60
    pm = r.one("PodMonitor")
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    assert pm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    ep = pm["spec"]["podMetricsEndpoints"]
    assert ep == [{"port": "metrics", "path": "/metrics", "interval": "10s"}], ep
    sel = pm["spec"]["selector"]
    for workload in (deploy, sts):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert all(labels[k] == v for k, v in sel["matchLabels"].items())
        assert labels["app.kubernetes.io/component"] in sel["matchExpressions"][0]["values"]
        assert any(p["name"] == "metrics" for p in workload["spec"]["template"]["spec"]["containers"][0]["ports"])
    cm = r.one("ConfigMap")
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Cohort"}
    assert "autoscaled" in r.notes and "PodMonitor" in r.notes


def test_hostpath(r):
    deploy, sts, _ = check_common(r, FLAGS, "edge", "inference")
    r.none("PersistentVolumeClaim")
    vol = [v for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == "model"][0]
    assert vol == {"name": "model", "hostPath": {"path": "/mnt/weights", "type": "Directory"}}, vol
    w = container(sts, "worker")
    a = args_of(w)
    assert a["model"] == "/models/DeepSeek-V2-Lite" and a["model-name"] == "deepseek-v2-lite", a
    assert w["args"][-1] == "--max-queue=4096", "extraArgs come last and win"
    assert workers_dns(deploy) == "edge-cohort-worker-headless.inference.svc.cluster.local:50061"
    for workload in (deploy, sts):
        assert "annotations" not in workload["spec"]["template"]["metadata"], "scrape annotations are off"


def test_multi_gpu(r):
    deploy, sts, _ = check_common(r, FLAGS, "prod", "llm")
    assert deploy["spec"]["replicas"] == 3 and sts["spec"]["replicas"] == 4
    w = container(sts, "worker")
    assert gpu(w, "limits") == 8 and gpu(w, "requests") == 8
    assert w["resources"]["requests"]["cpu"] == "32" and w["resources"]["limits"]["memory"] == "1Ti"
    a = args_of(w)
    assert a["gpus"] == "8", "the worker spreads the model over the pod's GPUs"
    assert a["kv-cache-bytes"] == "137438953472", a["kv-cache-bytes"]
    assert a["max-batch-tokens"] == "16384" and a["max-running"] == "512"
    assert args_of(container(deploy, "router"))["policy"] == "least_loaded"
    assert workers_dns(deploy) == "prod-cohort-worker-headless.llm.svc.example.internal:50061"
    env = {e["name"]: e.get("value") for e in w["env"]}
    assert env["NCCL_DEBUG"] == "WARN" and env["NCCL_NVLS_ENABLE"] == "0"
    r.none("PersistentVolumeClaim")
    vol = [v for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == "model"][0]
    assert vol["persistentVolumeClaim"]["claimName"] == "deepseek-weights"
    assert "8 GPU(s) each" in r.notes


def test_cpu_only(r):
    deploy, sts, headless = check_common(r, FLAGS, "cohort", "default")
    assert deploy["metadata"]["name"] == "demo-router" and headless["metadata"]["name"] == "demo-worker-headless"
    w = container(sts, "worker")
    assert gpu(w, "limits") is None and gpu(w, "requests") is None, w["resources"]
    a = args_of(w)
    assert a["device"] == "cpu" and a["threads"] == "4" and a["model"] == "/models/cohort-demo", a
    assert "tolerations" not in sts["spec"]["template"]["spec"]
    shm = [v for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == "dshm"][0]
    assert shm["emptyDir"] == {"medium": "Memory"}, shm
    r.none("ConfigMap")
    assert r.one("PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_rendered_args_start_a_real_worker(r, worker_bin, tmp):
    """The default worker arguments, pointed at a fixture, are accepted by the real binary: it loads,
    serves and writes its port file (only --model, --device and the ports differ from the chart)."""
    sts = r.one("StatefulSet")
    args = []
    for a in container(sts, "worker")["args"]:
        name = a[2:].split("=", 1)[0]
        if name in ("model", "device", "port", "metrics-port", "host", "worker-id", "kv-cache-bytes"):
            continue
        args.append(a)
    port_file = os.path.join(tmp, "worker.json")
    cmd = [worker_bin, "--model", os.path.join(ROOT, "tests/fixtures/models/v3_plain"), "--device=cpu",
           "--host=127.0.0.1", "--port=0", "--metrics-port=-1", "--worker-id=test-worker",
           "--kv-cache-bytes=16777216", "--port-file", port_file] + args
    log = open(os.path.join(tmp, "worker.log"), "w+")
    p = subprocess.Popen(cmd, stdout=log, stderr=log)
    try:
        deadline = time.time() + 30
        while not os.path.exists(port_file):
            assert p.poll() is None, "worker refused the chart's arguments: " + open(log.name).read()
            assert time.time() < deadline, "worker did not start"
            time.sleep(0.05)
    finally:
        p.terminate()
        p.wait(timeout=20)


def expect_failure(renderer, tmp, values_file, message):
    try:
        render(renderer, values_file, tmp)
    except RenderError as e:
        assert message in str(e), f"error {e} does not mention {message!r}"
        return
    raise AssertionError(f"{values_file} rendered but must fail")


def expect_kube_refused(renderer, tmp):
    try:
        render(renderer, None, tmp, kube_version="1.23.9")
    except RenderError as e:
        assert "kubeVersion" in str(e), e
        return
    raise AssertionError("rendered for Kubernetes 1.23")


FLAGS = {}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin-dir", default=os.path.join(ROOT, "build", "bin"))
    ap.add_argument("--work-dir", help="keep the renderer and Go's build cache here (default: a temporary folder)")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="cohort_helm_")
    work = args.work_dir or tmp
    os.makedirs(work, exist_ok=True)
    renderer = build_renderer(work)
    FLAGS["worker"] = binary_flags(os.path.join(args.bin_dir, "cohort-worker"))
    FLAGS["router"] = binary_flags(os.path.join(args.bin_dir, "cohort-router"))

    covered = {"defaults.yaml", "hpa_podmonitor.yaml", "hostpath.yaml", "multi_gpu.yaml", "cpu_only.yaml",
               "bad_source.yaml", "bad_autoscaling.yaml"}
    cases = [
        ("defaults", lambda: test_defaults(render(renderer, "defaults.yaml", tmp))),
        ("hpa+podmonitor", lambda: test_hpa_podmonitor(render(renderer, "hpa_podmonitor.yaml", tmp))),
        ("hostPath storage", lambda: test_hostpath(render(renderer, "hostpath.yaml", tmp, "edge", "inference"))),
        ("8 GPUs x 4 workers", lambda: test_multi_gpu(render(renderer, "multi_gpu.yaml", tmp, "prod", "llm"))),
        ("cpu only", lambda: test_cpu_only(render(renderer, "cpu_only.yaml", tmp))),
        ("bad model.source fails", lambda: expect_failure(renderer, tmp, "bad_source.yaml", "model.source")),
        ("minReplicas > maxReplicas fails",
         lambda: expect_failure(renderer, tmp, "bad_autoscaling.yaml", "minReplicas")),
        ("Kubernetes older than 1.24 (no gRPC probes) is refused",
         lambda: expect_kube_refused(renderer, tmp)),
        ("every values file is tested", lambda: check_all_values_covered(covered)),
        ("chart arguments start a real worker",
         lambda: test_rendered_args_start_a_real_worker(render(renderer, None, tmp), os.path.join(
             args.bin_dir, "cohort-worker"), tmp)),
    ]
    passed = failed = 0
    for name, fn in cases:
        try:
            fn()
            passed += 1
            print(f"ok   {name}")
        except Exception as e:  # report every case, then fail
            failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {e}")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


def check_all_values_covered(covered):
    present = {f for f in os.listdir(VALUES) if f.endswith(".yaml")}
    assert present == covered, f"values files without a case: {sorted(present - covered)}"


if __name__ == "__main__":
    main()
