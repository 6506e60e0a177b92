#!/usr/bin/python3
"""scripts/compare_cycles.py on real Nsight Compute output: ncu_cycles/ holds the four CSVs of one
`scripts/gpu_tests.sh cycles MoeGroupedGemmWs` call on an H200 (base 640c8b3, new 5912044: the
expert products' work queue; two runs each of the first four launches of a 1 x 4096 prefill step,
with the program's own lines that ncu mixes in). Checked: each launch's readable kernel name, both
builds' cycle ranges, the change of the medians marked ~ only where the ranges overlap, the new
build's SMs' active cycles; one build alone; and one clear line with exit 2 for files whose launches
differ or that hold no Nsight Compute CSV.

  /usr/bin/python3 tests/scripts/compare_cycles_test.py
"""
import glob
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "compare_cycles.py")
DATA = os.path.join(ROOT, "tests", "scripts", "ncu_cycles")


def run(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=60)


def launch_rows(stdout):
    return [l for l in stdout.splitlines() if re.match(r"\s+\d+\s", l)]


def main():
    failures = []
    base = sorted(glob.glob(os.path.join(DATA, "base.*.csv")))
    new = sorted(glob.glob(os.path.join(DATA, "this.*.csv")))
    if len(base) != 2 or len(new) != 2:
        print(f"FAIL: want two base and two new CSVs in {DATA}, found {base} and {new}")
        return 1

    result = run("--base", *base, "--new", *new)
    if result.returncode != 0:
        failures.append(f"two builds: exit {result.returncode}: {result.stderr}")
    rows = launch_rows(result.stdout)
    gate_up = "MoeGroupedGemmWsKernel<WsTiles<128, 256, 4, 1>, 1, 1, 0>"
    down = "MoeGroupedGemmWsKernel<WsTiles<128, 256, 4, 1>, 0, 0, 1>"
    want = [
        # launch, kernel, base range, new range, change, overlapping, SMs active
        (0, gate_up, "753.9-754.4", "738.7-741.5", "-1.9%", False, "689.9 / 713.7 / 735.7"),
        (1, down, "447.9-450.7", "434.7-436.8", "-3.0%", False, "395.8 / 414.7 / 432.5"),
        (2, gate_up, "737.7-745.7", "738.2-739.6", "-0.4%", True, "686.8 / 716.6 / 732.9"),
        (3, down, "447.6-450.2", "440.8-442.8", "-1.6%", False, "397.7 / 418.3 / 438.4"),
    ]
    if len(rows) != len(want):
        failures.append(f"two builds: {len(rows)} launch rows, want {len(want)}:\n{result.stdout}")
    for row, (launch, kernel, base_range, new_range, change, overlap, active) in zip(rows, want):
        m = re.match(r"\s+(\d+)\s+(.+?)\s+(\S+)\s+(\S+)\s+([+-]\d+\.\d%)(~?)\s+(.+)$", row)
        if not m:
            failures.append(f"two builds: unreadable row {row!r}")
            continue
        got = (int(m.group(1)), m.group(2), m.group(3), m.group(4), m.group(5), m.group(6) == "~", m.group(7))
        if got != (launch, kernel, base_range, new_range, change, overlap, active):
            failures.append(f"two builds, launch {launch}: got {got}")

    result = run("--new", *new)
    rows = launch_rows(result.stdout)
    if result.returncode != 0 or len(rows) != 4 or any("%" in r for r in rows):
        failures.append(f"one build: exit {result.returncode}, want four rows and no change:\n{result.stdout}")
    elif not rows[1].endswith("434.7-436.8  395.8 / 414.7 / 432.5"):
        failures.append(f"one build: launch 1 is {rows[1]!r}")

    with tempfile.TemporaryDirectory() as tmp:
        # The same program profiled for two launches only: the builds no longer line up.
        short = os.path.join(tmp, "short.csv")
        with open(new[0]) as f:
            lines = f.readlines()
        with open(short, "w") as f:
            f.writelines(l for l in lines if not re.match(r'"[23]",', l))
        result = run("--base", *base, "--new", short)
        if result.returncode != 2 or len(result.stderr.strip().splitlines()) != 1 or "launches" not in result.stderr:
            failures.append(f"launches differ: exit {result.returncode}, stderr {result.stderr!r}")
        # A run whose profiler printed nothing (ncu missing the kernel name, say).
        empty = os.path.join(tmp, "empty.csv")
        with open(empty, "w") as f:
            f.writelines(l for l in lines if not l.startswith('"'))
        result = run("--new", empty)
        if result.returncode != 2 or len(result.stderr.strip().splitlines()) != 1:
            failures.append(f"no CSV: exit {result.returncode}, stderr {result.stderr!r}")

    for f in failures:
        print("FAIL:", f)
    print("compare_cycles_test:", "FAILED" if failures else "passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
