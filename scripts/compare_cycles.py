#!/usr/bin/env python3
"""Kernel cycles of two builds from Nsight Compute CSV, launch by launch.

  scripts/compare_cycles.py --base b1.csv b2.csv ... --new n1.csv n2.csv ...
  scripts/compare_cycles.py --new n1.csv n2.csv ...        (one build alone)

Each file is the standard output of `ncu --csv --clock-control base --metrics
sm__cycles_elapsed.max,sm__cycles_active.min,sm__cycles_active.avg,sm__cycles_active.max -k
regex:NAME --launch-count N` over the same program (scripts/gpu_tests.sh cycles runs it so); the
program's own lines in it are skipped. Clocks locked at the base clock take the GPU's power limit
out of the comparison: a prefill step at the H200's 700 W moved by several per cent between runs,
its kernels' cycles by under one (docs/cuda_backend_rounds.md, twentieth round).

For the i-th profiled launch of every file (the same kernels in the same order in each) it prints
the kernel, each build's elapsed cycles as min-max over its runs, the change of the medians (~ where
the two ranges overlap), and the new build's SMs' active cycles, min / average / max over the SMs
(medians over its runs): SMs that end far apart point at the launch's last wave. When the files
disagree on their launches, or one is missing or holds no profiled launch, it prints one line and
exits with 2. Standard library only: the GPU machine's python has nothing of ours.
"""
import argparse
import csv
import re
import statistics
import sys

ELAPSED = "sm__cycles_elapsed.max"
ACTIVE = ("sm__cycles_active.min", "sm__cycles_active.avg", "sm__cycles_active.max")


class Unusable(Exception):
    pass


def short_kernel(name):
    """'void (anonymous namespace)::Kernel<(anonymous namespace)::Tiles<128, 256>, 1>(Params)' ->
    'Kernel<Tiles<128, 256>, 1>'."""
    name = re.sub(r"^void ", "", name)
    name = re.sub(r"\(anonymous namespace\)::|unnamed>::|cohort::|kernels::", "", name)
    depth = 0
    for i, c in enumerate(name):  # drop the parameter list: the first '(' outside template brackets
        depth += c == "<"
        depth -= c == ">"
        if c == "(" and depth == 0:
            return name[:i]
    return name


def load(path):
    """[(kernel, {metric: value})] in launch order, from one ncu CSV."""
    try:
        with open(path, newline="") as f:
            lines = [line for line in f if line.startswith('"')]
    except OSError as e:
        raise Unusable(f"{path}: {e}")
    rows = list(csv.reader(lines))
    if not rows or "Metric Name" not in rows[0]:
        raise Unusable(f"{path}: no Nsight Compute CSV in it")
    header = rows[0]
    launches = {}
    for row in rows[1:]:
        record = dict(zip(header, row))
        try:
            launch = int(record["ID"])
            value = float(record["Metric Value"].replace(",", ""))
        except (KeyError, ValueError):
            continue  # a metric the GPU could not give ("n/a")
        kernel, metrics = launches.setdefault(launch, (short_kernel(record.get("Kernel Name", "?")), {}))
        metrics[record["Metric Name"]] = value
    if not launches:
        raise Unusable(f"{path}: no profiled launch")
    result = [launches[i] for i in sorted(launches)]
    for i, (kernel, metrics) in enumerate(result):
        if ELAPSED not in metrics:
            raise Unusable(f"{path}: launch {i} ({kernel}) has no {ELAPSED}")
    return result


def load_build(paths, label):
    runs = [load(p) for p in paths]
    kernels = [k for k, _ in runs[0]]
    for path, run in zip(paths[1:], runs[1:]):
        if [k for k, _ in run] != kernels:
            raise Unusable(f"{path}: its launches differ from {paths[0]}'s ({label} build)")
    return kernels, runs


def thousands(x):
    return f"{x / 1000:.1f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", nargs="+", default=[], help="the base build's CSV files, one a run")
    parser.add_argument("--new", nargs="+", required=True, help="the new build's CSV files, one a run")
    args = parser.parse_args()
    try:
        kernels, new = load_build(args.new, "new")
        base = None
        if args.base:
            base_kernels, base = load_build(args.base, "base")
            if base_kernels != kernels:
                raise Unusable(f"the base build profiled {len(base_kernels)} launches ({', '.join(base_kernels)}), "
                               f"the new one {len(kernels)} ({', '.join(kernels)})")
    except Unusable as e:
        print(f"compare_cycles: {e}", file=sys.stderr)
        return 2

    width = max(len(k) for k in kernels)
    print("cycles (K) at the base clock, min-max over the runs; change of the medians (~: the ranges overlap);")
    print("the new build's SMs' active cycles (K), min / average / max over the SMs, medians over its runs")
    columns = f"{'launch':>6}  {'kernel':<{width}}"
    if base is not None:
        columns += f"  {'base':>15}"
    columns += f"  {'new':>15}"
    if base is not None:
        columns += f"  {'change':>8}"
    print(columns + "  SMs active (new)")
    for i, kernel in enumerate(kernels):
        new_cycles = [run[i][1][ELAPSED] for run in new]
        line = f"{i:>6}  {kernel:<{width}}"
        if base is not None:
            base_cycles = [run[i][1][ELAPSED] for run in base]
            line += f"  {thousands(min(base_cycles)) + '-' + thousands(max(base_cycles)):>15}"
        line += f"  {thousands(min(new_cycles)) + '-' + thousands(max(new_cycles)):>15}"
        if base is not None:
            change = 100.0 * (statistics.median(new_cycles) / statistics.median(base_cycles) - 1.0)
            overlap = min(new_cycles) <= max(base_cycles) and min(base_cycles) <= max(new_cycles)
            line += f"  {change:>+7.1f}%" + ("~" if overlap else " ")
        active = [statistics.median(run[i][1][m] for run in new) if all(m in run[i][1] for run in new) else None
                  for m in ACTIVE]
        line += "  " + (" / ".join(thousands(a) for a in active) if None not in active else "-")
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
