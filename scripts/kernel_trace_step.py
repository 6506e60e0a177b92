#!/usr/bin/env python3
"""One decode step's kernels from a kernel_trace CSV (tools/kernel_trace): when each started after
the step's first kernel, how long it ran, and the gap since the latest end of any kernel before it
(negative: it overlapped them), with its grid, cluster and shared-memory carveout.

    scripts/kernel_trace_step.py trace.csv [--step -2] [--first-kernels 40] [--by-kernel]

Steps are told apart by the embedding kernel that starts each forward pass; --step picks one
(default: the one before the last, whole even if the run stopped mid-step). --by-kernel sums the
step by kernel name instead: launches, time run (overlapping neighbours counted in both) and its
share of the step, longest first. Copies and memsets are listed like kernels ([memcpy ...]).

Where the trace holds the host's runtime calls (COHORT_KERNEL_TRACE_HOST=1), the step's graph
launch is printed too: under CUPTI a large graph takes the host long to launch, and the GPU runs its
kernels only as far as the launch has gone, so a gap that ends when the launch returns is the
tracer's (a 512-row decode graph: 0.46-0.85 ms a launch, a hole of about 0.5 ms before the dense
layer's MLP that steps without the tracer do not have).
"""
import argparse
import csv
import re
import sys


def short_name(mangled):
    """The kernel's own name out of an Itanium-mangled one (the last name ending in Kernel)."""
    names = []
    i = 0
    while i < len(mangled):
        m = re.match(r"(\d+)", mangled[i:])
        if m:
            length = int(m.group(1))
            start = i + len(m.group(1))
            names.append(mangled[start:start + length])
            i = start + length
        else:
            i += 1
    kernels = [n for n in names if n.endswith("Kernel")]
    return kernels[-1] if kernels else mangled[:60]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace")
    parser.add_argument("--step", type=int, default=-2,
                        help="which forward pass, counted like a Python index (default: the one before the last)")
    parser.add_argument("--first-kernels", type=int, default=0, help="print only this many kernels (0: all)")
    parser.add_argument("--by-kernel", action="store_true", help="one line a kernel name, summed over the step")
    args = parser.parse_args()

    rows, host = [], []
    with open(args.trace) as f:
        for r in csv.reader(f):
            if len(r) < 9:
                continue
            name = ",".join(r[8:])
            if name.startswith("[host "):
                host.append({"start": int(r[0]), "end": int(r[1]), "name": name[6:-1]})
                continue
            rows.append({"start": int(r[0]), "end": int(r[1]), "stream": int(r[2]), "grid": int(r[3]),
                         "cluster": max(1, int(r[5])), "smem": int(r[7]),
                         "name": name if name.startswith("[") else short_name(name)})
    rows.sort(key=lambda r: r["start"])
    starts = [i for i, r in enumerate(rows) if r["name"] == "EmbeddingKernel"]
    if len(starts) < 2:
        sys.exit("kernel_trace_step: fewer than two forward passes in the trace")
    index = args.step % len(starts)
    begin = starts[index]
    end = starts[index + 1] if index + 1 < len(starts) else len(rows)
    step = rows[begin:end]
    t0 = step[0]["start"]
    step_us = (max(r["end"] for r in step) - t0) / 1e3
    # The step's graph launch, if it had one: begun after the step before it started, before it did.
    t_before = rows[starts[index - 1]]["start"] if index > 0 else float("-inf")
    h = max((h for h in host if h["name"].startswith("cudaGraphLaunch") and t_before < h["start"] < t0),
            key=lambda h: h["start"], default=None)
    if h is not None:
        print(f"host: the step's graph launch began {(t0 - h['start']) / 1e3:.2f} us before its first kernel and "
              f"returned {(h['end'] - t0) / 1e3:.2f} us after it")
    if args.by_kernel:
        print_by_kernel(step, step_us)
        return
    latest_end = t0
    print(f"{'start us':>9} {'us':>7} {'gap us':>7} {'stream':>6} {'grid':>5} {'clu':>3} {'smem KB':>7}  kernel")
    for n, r in enumerate(step):
        if args.first_kernels and n >= args.first_kernels:
            break
        gap = (r["start"] - latest_end) / 1e3
        print(f"{(r['start'] - t0) / 1e3:9.2f} {(r['end'] - r['start']) / 1e3:7.2f} {gap:7.2f} {r['stream']:6d} "
              f"{r['grid']:5d} {r['cluster']:3d} {r['smem'] / 1024:7.0f}  {r['name']}")
        latest_end = max(latest_end, r["end"])
    print(f"step: {step_us:.2f} us, {len(step)} kernels")


def print_by_kernel(step, step_us):
    totals = {}
    for r in step:
        count, us = totals.get(r["name"], (0, 0.0))
        totals[r["name"]] = (count + 1, us + (r["end"] - r["start"]) / 1e3)
    print(f"{'launches':>8} {'us':>9} {'us each':>8} {'% step':>6}  kernel")
    for name, (count, us) in sorted(totals.items(), key=lambda item: -item[1][1]):
        print(f"{count:8d} {us:9.1f} {us / count:8.2f} {100 * us / step_us:6.1f}  {name}")
    print(f"step: {step_us:.2f} us, {len(step)} kernels (overlapping kernels count in full, so the shares "
          f"may sum past 100%)")


if __name__ == "__main__":
    main()
