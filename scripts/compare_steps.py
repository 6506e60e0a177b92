#!/usr/bin/env python3
"""The step times of two builds from `cohort bench step --output` files, shape by shape.

  scripts/compare_steps.py --base b1.json b2.json ... --new n1.json n2.json ...

Two builds timed in turn on one machine (`scripts/gpu_tests.sh ab` runs them so): machines differ by
a few per cent, runs on one machine by well under one, so only such pairs say what a change did. For
every decode and prefill shape it prints each build's step times as min-max over its runs and the
change of the medians, marked ~ where the two ranges overlap: such a change is not told apart from
the runs' noise (on an H200, two builds running the same kernels differed by up to 0.7% at batch 1,
docs/cuda_backend.md). All files must hold the same shapes; when they do not, or a file is missing
or is not such JSON, it prints one line and exits with 2. Standard library only: the GPU machine's
python has nothing of ours.
"""
import argparse
import json
import statistics
import sys


class Unusable(Exception):
    pass


def load(path):
    """{shape: step ms} and the copy bandwidth of one bench step JSON; shapes are ('decode', context,
    batch, long context or 0, spread or not) and ('prefill', sequences, tokens)."""
    try:
        with open(path) as f:
            run = json.load(f)
    except (OSError, ValueError) as e:
        raise Unusable(f"{path}: {e}")
    try:
        steps = {}
        for row in run["decode"]:
            shape = ("decode", int(row["context"]), int(row["batch"]), int(row.get("long_context", 0)),
                     bool(row.get("spread", False)))
            steps[shape] = float(row["step_ms"])
        for row in run.get("prefill", []):
            steps[("prefill", int(row["sequences"]), int(row["tokens_per_sequence"]))] = float(row["step_ms"])
        bandwidth = float(run["copy_bandwidth_gb_per_s"])
    except (KeyError, TypeError, ValueError) as e:
        raise Unusable(f"{path}: not the JSON of `cohort bench step --output` ({type(e).__name__}: {e})")
    if not steps:
        raise Unusable(f"{path}: no step times")
    return steps, bandwidth


def load_build(paths):
    """Every run of one build: [{shape: ms}], [bandwidth]; all runs must hold the same shapes."""
    runs, bandwidths = [], []
    for path in paths:
        steps, bandwidth = load(path)
        if runs and steps.keys() != runs[0].keys():
            raise Unusable(f"{path}: other shapes than {paths[0]}")
        runs.append(steps)
        bandwidths.append(bandwidth)
    return runs, bandwidths


def span(values, digits):
    return f"{min(values):.{digits}f}-{max(values):.{digits}f}"


def change(base, new):
    return 100.0 * (statistics.median(new) / statistics.median(base) - 1.0)


def overlap(base, new):
    """Whether the two builds' min-max ranges share a value."""
    return min(base) <= max(new) and min(new) <= max(base)


def report(base_paths, new_paths):
    base_runs, base_bw = load_build(base_paths)
    new_runs, new_bw = load_build(new_paths)
    if base_runs[0].keys() != new_runs[0].keys():
        raise Unusable(f"{new_paths[0]}: other shapes than {base_paths[0]}")
    lines = [f"step ms, min-max over {len(base_runs)} runs of the base and {len(new_runs)} of this build; "
             "change of the medians (~: the ranges overlap, so the runs do not tell it from noise)"]
    for kind, header in (("decode", " context  batch"), ("prefill", f"{'prefill':>15}")):
        shapes = sorted(s for s in base_runs[0] if s[0] == kind)
        if not shapes:
            continue
        lines.append(f"{header}             base             this   change")
        for shape in shapes:
            base = [run[shape] for run in base_runs]
            new = [run[shape] for run in new_runs]
            if kind == "prefill":
                label = f"{f'{shape[1]}x{shape[2]}':>15}"
            else:  # "1024", "1024+32768" with one long sequence (--long-context), "~1024" (--spread-contexts)
                context = f"{shape[1]}+{shape[3]}" if shape[3] else f"~{shape[1]}" if shape[4] else str(shape[1])
                label = f"{context:>8} {shape[2]:6d}"
            mark = " ~" if overlap(base, new) else ""
            lines.append(f"{label} {span(base, 3):>16} {span(new, 3):>16} {change(base, new):+7.1f}%{mark}")
    lines.append(f"copy bandwidth GB/s: base {span(base_bw, 0)}, this {span(new_bw, 0)}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", nargs="+", required=True, help="the base build's JSON files")
    parser.add_argument("--new", nargs="+", required=True, help="this build's JSON files")
    args = parser.parse_args()
    try:
        print(report(args.base, args.new))
    except Unusable as e:
        print(f"compare_steps: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
