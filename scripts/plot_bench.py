#!/usr/bin/python3
"""Draws `cohort bench serve` results (JSON) as PNG plots.

Give result files, or folders of them (scripts/bench_report.sh writes one). It draws what the
results hold:

  concurrency_sweep.png      output tokens/s and time per output token (p50, p90) against
                             concurrency, one line per result file with two or more closed-loop levels
  cost_per_million_tokens.png  dollars per million output tokens against concurrency, at
                             --gpu-hour-cost for --gpus devices
  continuous_vs_static.png   throughput and latency of the results labelled mixed_continuous and
                             mixed_static (continuous against static batching)
  prefix_cache.png           the same for prefix_on and prefix_off (prefix caching on and off)

  python3 scripts/plot_bench.py bench-report --out-dir docs/bench --gpu-hour-cost 3.5

Needs Debian's python3-matplotlib (scripts/setup.sh installs it).
"""
import argparse
import glob
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402

COMPARISONS = [
    # file name, title, (label, legend name) pairs
    ("continuous_vs_static.png", "Continuous vs static batching",
     [("mixed_continuous", "continuous"), ("mixed_static", "static")]),
    ("prefix_cache.png", "Prefix caching", [("prefix_on", "prefix cache on"), ("prefix_off", "prefix cache off")]),
]


def load(paths):
    """{name: result} for every `cohort bench serve` JSON among `paths` (files or folders)."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += sorted(glob.glob(os.path.join(path, "*.json")))
        else:
            files.append(path)
    results = {}
    for path in files:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            sys.exit(f"plot_bench: cannot read {path}: {e}")
        if not isinstance(data, dict) or data.get("tool") != "cohort bench serve":
            continue
        name = data.get("label") or os.path.splitext(os.path.basename(path))[0]
        results[name] = data
    return results


def closed_runs(result):
    runs = [r for r in result["runs"] if r["mode"] == "closed" and r["completed"] > 0]
    return sorted(runs, key=lambda r: r["concurrency"])


def model_note(result):
    model = result.get("model", {}).get("name", "")
    workload = result.get("workload", {}).get("description", "")
    return f"{model}: {workload}" if model else workload


def concurrency_axis(ax, levels):
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels)
    ax.set_xticklabels([str(c) for c in levels])
    ax.set_xlabel("concurrent requests (closed loop)")
    ax.grid(True, which="both", alpha=0.3)


def plot_sweep(sweeps, out_dir):
    fig, (tput_ax, tpot_ax) = plt.subplots(1, 2, figsize=(12, 4.8))
    levels = set()
    for name, result in sweeps.items():
        runs = closed_runs(result)
        c = [r["concurrency"] for r in runs]
        levels.update(c)
        tput_ax.plot(c, [r["output_throughput"] for r in runs], "o-", label=name)
        line, = tpot_ax.plot(c, [r["tpot_ms"]["p50"] for r in runs], "o-", label=f"{name} p50")
        tpot_ax.plot(c, [r["tpot_ms"]["p90"] for r in runs], "--", color=line.get_color(), alpha=0.6,
                     label=f"{name} p90")
    levels = sorted(levels)
    tput_ax.set_ylabel("output tokens/s")
    tput_ax.set_title("Throughput")
    tpot_ax.set_ylabel("time per output token (ms)")
    tpot_ax.set_title("Time per output token")
    for ax in (tput_ax, tpot_ax):
        concurrency_axis(ax, levels)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    fig.suptitle(f"One user versus many ({model_note(next(iter(sweeps.values())))})", fontsize=10)
    fig.tight_layout()
    return save(fig, out_dir, "concurrency_sweep.png")


def plot_cost(sweeps, out_dir, gpu_hour_cost, gpus):
    fig, ax = plt.subplots(figsize=(7, 4.8))
    levels = set()
    for name, result in sweeps.items():
        runs = [r for r in closed_runs(result) if r["output_throughput"] > 0]
        c = [r["concurrency"] for r in runs]
        levels.update(c)
        cost = [gpu_hour_cost * gpus / (r["output_throughput"] * 3600) * 1e6 for r in runs]
        ax.plot(c, cost, "o-", label=name)
        for x, y in zip(c, cost):
            ax.annotate(f"${y:.2f}" if y < 100 else f"${y:.0f}", (x, y), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize=7)
    concurrency_axis(ax, sorted(levels))
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"${y:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylabel("dollars per million output tokens")
    ax.set_title(f"Cost per million output tokens at ${gpu_hour_cost:g} per GPU-hour, {gpus} GPU(s)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save(fig, out_dir, "cost_per_million_tokens.png")


def plot_comparison(results, out_dir, file_name, title, pairs):
    present = [(results[label], legend) for label, legend in pairs if label in results]
    if len(present) < 2:
        return None
    runs = [(result["runs"][0], legend) for result, legend in present]
    metrics = [("output tokens/s", lambda r: r["output_throughput"]),
               ("requests/s", lambda r: r["request_throughput"]),
               ("TTFT p50 (ms)", lambda r: r["ttft_ms"]["p50"]),
               ("TPOT p50 (ms)", lambda r: r["tpot_ms"]["p50"]),
               ("end-to-end p50 (ms)", lambda r: r["e2e_ms"]["p50"])]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3 * len(metrics), 3.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (metric, value) in zip(axes, metrics):
        values = [value(r) for r, _ in runs]
        bars = ax.bar(range(len(runs)), values, color=colors[:len(runs)])
        ax.set_xticks(range(len(runs)))
        ax.set_xticklabels([legend for _, legend in runs], fontsize=8)
        ax.set_title(metric, fontsize=9)
        ax.bar_label(bars, labels=[number(v) for v in values], fontsize=8)
        ax.margins(y=0.15)
    first = runs[0][0]
    load = f"concurrency {first['concurrency']}" if first["mode"] == "closed" else f"rate {first['request_rate']}/s"
    fig.suptitle(f"{title}: {load}, {model_note(present[0][0])}", fontsize=10)
    fig.tight_layout()
    return save(fig, out_dir, file_name)


def number(v):
    """A bar's label: thousands grouped, small values with three significant digits."""
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def save(fig, out_dir, name):
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="result JSON files or folders of them")
    parser.add_argument("--out-dir", help="where the PNGs go (default: the first folder given, else .)")
    parser.add_argument("--gpu-hour-cost", type=float, default=3.5, help="dollars per GPU-hour (default 3.5)")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs the measured server used (default 1)")
    args = parser.parse_args()
    if args.gpu_hour_cost <= 0 or args.gpus < 1:
        parser.error("--gpu-hour-cost must be positive and --gpus at least 1")
    out_dir = args.out_dir or next((p for p in args.paths if os.path.isdir(p)), ".")
    os.makedirs(out_dir, exist_ok=True)

    results = load(args.paths)
    if not results:
        sys.exit(f"plot_bench: no `cohort bench serve` results in {' '.join(args.paths)}")
    written = []
    sweeps = {name: r for name, r in results.items() if len(closed_runs(r)) >= 2}
    if sweeps:
        written.append(plot_sweep(sweeps, out_dir))
        written.append(plot_cost(sweeps, out_dir, args.gpu_hour_cost, args.gpus))
    for file_name, title, pairs in COMPARISONS:
        path = plot_comparison(results, out_dir, file_name, title, pairs)
        if path:
            written.append(path)
    if not written:
        sys.exit("plot_bench: nothing to draw: no result has two or more concurrency levels, and no "
                 "mixed_continuous/mixed_static or prefix_on/prefix_off pair was found")
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
