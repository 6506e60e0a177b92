#!/usr/bin/python3
"""Checks deploy/grafana/cohort.json against the metrics the code registers.

Every metric name in any panel expression or template-variable query must be one that
worker/server/metrics.cc or router/server/metrics.cc registers (histograms as _bucket, _sum or
_count), every panel the dashboard promises must be there, and the dashboard must be well formed
(unique panel ids, grid inside 24 columns, every $variable defined). The metric names are read from
the C++ sources, so renaming a metric without the dashboard fails here.

  /usr/bin/python3 tests/deploy/dashboard_test.py
"""
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DASHBOARD = os.path.join(ROOT, "deploy", "grafana", "cohort.json")
METRICS_SOURCES = [os.path.join(ROOT, "worker", "server", "metrics.cc"),
                   os.path.join(ROOT, "router", "server", "metrics.cc")]

PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
                   "bool", "offset", "inf", "nan"}


def registered_metrics():
    """{name: kind} for every metric the two metrics.cc files register."""
    kinds = {}
    for path in METRICS_SOURCES:
        src = open(path).read()
        literals = set(re.findall(r'"(cohort_[a-z0-9_]+)"', src))
        # worker: Gauge(*registry, "name", ...), Counter(...), Hist(...)
        for kind, name in re.findall(r'\b(Gauge|Counter|Hist)\(\*registry,\s*"(cohort_[a-z0-9_]+)"', src):
            kinds[name] = {"Gauge": "gauge", "Counter": "counter", "Hist": "histogram"}[kind]
        # router: prometheus::BuildCounter().Name("name")
        for kind, name in re.findall(r'Build(Counter|Gauge|Histogram)\(\)\s*\.Name\("(cohort_[a-z0-9_]+)"\)', src):
            kinds[name] = kind.lower()
        missed = literals - set(kinds)
        assert not missed, f"{os.path.relpath(path, ROOT)}: cannot tell the kind of {sorted(missed)}"
    return kinds


def series_names(kinds):
    names = set()
    for name, kind in kinds.items():
        if kind == "histogram":
            names |= {name + "_bucket", name + "_sum", name + "_count"}
        else:
            names.add(name)
    return names


def promql_metric_names(expr):
    """Metric names in a PromQL expression: identifiers that are not functions, keywords or labels."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)        # string literals
    e = re.sub(r"\{[^}]*\}", "", e)                       # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)                      # range selectors
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\$\{?\w+\}?", " 1 ", e)                  # Grafana variables
    names = []
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)", e):
        ident = m.group(1)
        rest = e[m.end():].lstrip()
        if rest.startswith("(") or ident.lower() in PROMQL_KEYWORDS:
            continue
        names.append(ident)
    return names


def panels_of(dashboard):
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def expressions(dashboard):
    """(where, PromQL) for every panel target and every query variable."""
    exprs = []
    for p in panels_of(dashboard):
        for t in p.get("targets", []):
            exprs.append((f"panel '{p['title']}' {t['refId']}", t["expr"]))
    for v in dashboard["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", q.strip())
            assert m, f"variable {v['name']}: unexpected query {q}"
            exprs.append((f"variable {v['name']}", m.group(1)))
    return exprs


def test_parser_sees_metric_names():
    got = promql_metric_names('histogram_quantile(0.99, sum by (le, instance) (rate(cohort_a_bucket{x=~"$w"}[$__rate_interval]))) '
                              '/ on (instance) cohort_b * $kv_block_size + up offset 5m')
    assert got == ["cohort_a_bucket", "cohort_b", "up"], got


def test_sources_read(kinds):
    assert kinds.get("cohort_worker_batch_tokens") == "histogram", kinds
    assert kinds.get("cohort_router_requests_total") == "counter", kinds
    assert kinds.get("cohort_worker_requests_waiting") == "gauge", kinds
    assert len([k for k in kinds if k.startswith("cohort_router_")]) >= 10, kinds


def test_every_metric_exists(dashboard, kinds):
    valid = series_names(kinds)
    used = set()
    for where, expr in expressions(dashboard):
        names = promql_metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        unknown = [n for n in names if n not in valid]
        assert not unknown, f"{where}: {unknown} are not registered by the metrics.cc files"
        used |= set(names)
    return used


def test_promised_panels(dashboard):
    exprs = [e for _, e in expressions(dashboard)]
    joined = "\n".join(exprs)
    needs = {
        "generated tokens/s": r"rate\(cohort_worker_generated_tokens_total",
        "TTFT p50": r"histogram_quantile\(0\.5, [^\n]*cohort_worker_time_to_first_token_seconds_bucket",
        "TTFT p99": r"histogram_quantile\(0\.99, [^\n]*cohort_worker_time_to_first_token_seconds_bucket",
        "TPOT p50": r"histogram_quantile\(0\.5, [^\n]*cohort_worker_time_per_output_token_seconds_bucket",
        "TPOT p99": r"histogram_quantile\(0\.99, [^\n]*cohort_worker_time_per_output_token_seconds_bucket",
        "batch tokens per step": r"cohort_worker_batch_tokens_(bucket|sum)",
        "queue depth": r"cohort_worker_requests_waiting",
        "KV occupancy": r"cohort_worker_kv_blocks_used\{[^}]*\}\) / sum by \(instance\) \(cohort_worker_kv_blocks_total",
        "prefix-cache hit rate": r"cohort_worker_prefix_cache_hit_blocks_total",
        "preemptions": r"rate\(cohort_worker_preemptions_total",
        "router decisions by decision": r"sum by \(decision\) \(rate\(cohort_router_route_decisions_total",
        "retries": r"rate\(cohort_router_retries_total",
        "worker health": r"cohort_router_worker_up",
        "router requests by code": r"sum by \(code\) \(rate\(cohort_router_requests_total",
        "weight bytes per step": r"rate\(cohort_worker_step_weight_read_bytes_sum",
        "KV bytes per step": r"rate\(cohort_worker_step_kv_read_bytes_sum",
        "memory bandwidth fraction": r"/ sum by \(instance\) \(cohort_worker_peak_memory_bandwidth_bytes_per_second",
        "FLOP fraction": r"/ sum by \(instance\) \(cohort_worker_peak_flops_per_second",
        "$ per million output tokens": r"1e6 \* sum\(rate\(cohort_worker_step_cost_dollars_total",
    }
    missing = [k for k, pattern in needs.items() if not re.search(pattern, joined)]
    assert not missing, f"no panel for {missing}"


def test_well_formed(dashboard):
    assert dashboard["uid"] == "cohort" and dashboard["title"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "model", "worker"} <= variables, variables
    ids = [p["id"] for p in panels_of(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for p in panels_of(dashboard):
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, (p["title"], g)
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"], f"panel {p['title']} has no query"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            for var in re.findall(r"\$\{?(\w+)\}?", t["expr"]):
                assert var.startswith("__") or var in variables, f"{p['title']}: ${var} is not a variable"
    # Overlapping panels: no two cells share a grid square.
    cells = set()
    for p in panels_of(dashboard):
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['title']} overlaps another at {(x, y)}"
                cells.add((x, y))


def main():
    dashboard = json.load(open(DASHBOARD))
    kinds = registered_metrics()
    cases = [
        ("the PromQL scan finds metric names", test_parser_sees_metric_names),
        ("metrics.cc files are read", lambda: test_sources_read(kinds)),
        ("every dashboard metric is registered", lambda: test_every_metric_exists(dashboard, kinds)),
        ("every promised panel is there", lambda: test_promised_panels(dashboard)),
        ("the dashboard is well formed", lambda: test_well_formed(dashboard)),
    ]
    passed = failed = 0
    for name, fn in cases:
        try:
            fn()
            passed += 1
            print(f"ok   {name}")
        except Exception as e:
            failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {e}")
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
