#!/usr/bin/python3
"""scripts/kernel_trace_step.py on a kernel_trace CSV written here in the library's format (two
forward passes of mangled kernel names, one kernel overlapping the one before it): the chosen
step's kernels in start order with their readable names, offsets, durations and gaps (negative
where a kernel started before the latest end), the step's span, and one clear line with exit 1
for a trace without two passes.

  /usr/bin/python3 tests/scripts/kernel_trace_step_test.py
"""
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "kernel_trace_step.py")

EMBED = "_ZN6cohort7kernels12_GLOBAL__N_115EmbeddingKernelEPK13__nv_bfloat16PKiiiPf"
SKINNY = "_ZN6cohort7kernels12_GLOBAL__N_116SkinnyGemmKernelINS1_4TileILi1ELi1ELi1ELi2EEELb1EEEvNS1_4ArgsE"
ROUTE = "_ZN6cohort7kernels12_GLOBAL__N_114MoeRouteKernelEv"


def line(start, end, stream, grid, cluster, smem, name):
    # start_ns,end_ns,stream,grid,block,cluster,dynamic_smem,smem_executed,name
    return f"{start},{end},{stream},{grid},256,{cluster},0,{smem},{name}\n"


def run(trace, *args):
    return subprocess.run([sys.executable, SCRIPT, trace, *args], capture_output=True, text=True, timeout=60)


def main():
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        trace = os.path.join(tmp, "trace.csv")
        with open(trace, "w") as f:
            # Out of order on purpose: the script sorts by start.
            f.write(line(10_000, 11_000, 7, 1, 0, 16384, EMBED))       # pass 1
            f.write(line(12_000, 20_000, 7, 132, 2, 32768, SKINNY))
            f.write(line(50_000, 52_000, 7, 1, 0, 16384, EMBED))       # pass 2
            f.write(line(55_000, 58_000, 20, 1, 0, 65536, ROUTE))      # its own stream, overlapped
            f.write(line(53_000, 60_000, 7, 132, 2, 32768, SKINNY))
            f.write(line(90_000, 91_000, 7, 1, 0, 16384, EMBED))       # pass 3, cut off
        result = run(trace)  # default: the pass before the last
        if result.returncode != 0:
            failures.append(f"exit {result.returncode}: {result.stderr}")
        rows = [l.split() for l in result.stdout.splitlines() if re.match(r"\s*\d", l)]
        names = [r[-1] for r in rows]
        if names != ["EmbeddingKernel", "SkinnyGemmKernel", "MoeRouteKernel"]:
            failures.append(f"kernels of the second pass: {names}")
        else:
            start, duration, gap = (float(v) for v in rows[2][:3])
            if (start, duration, gap) != (5.0, 3.0, -5.0):
                failures.append(f"route kernel: start {start} us, {duration} us, gap {gap} us (want 5, 3, -5)")
            if rows[1][4:7] != ["132", "2", "32"]:
                failures.append(f"skinny kernel's grid, cluster, smem KB: {rows[1][4:7]}")
            if rows[0][5] != "1":
                failures.append(f"a launch without a cluster shows cluster {rows[0][5]} (want 1)")
        if "step: 10.00 us, 3 kernels" not in result.stdout:
            failures.append(f"span line missing: {result.stdout}")
        first = run(trace, "--step", "0", "--first-kernels", "1")
        if [l.split()[-1] for l in first.stdout.splitlines() if re.match(r"\s*\d", l)] != ["EmbeddingKernel"]:
            failures.append(f"--step 0 --first-kernels 1: {first.stdout}")

        one_pass = os.path.join(tmp, "one.csv")
        with open(one_pass, "w") as f:
            f.write(line(10_000, 11_000, 7, 1, 0, 16384, EMBED))
        refused = run(one_pass)
        if refused.returncode != 1 or "fewer than two forward passes" not in refused.stderr:
            failures.append(f"one pass: exit {refused.returncode}, stderr {refused.stderr!r}")
    for failure in failures:
        print("FAIL:", failure)
    print("kernel_trace_step_test:", "failed" if failures else "passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
