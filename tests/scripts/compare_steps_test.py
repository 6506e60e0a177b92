#!/usr/bin/python3
"""scripts/compare_steps.py on the JSON of real `cohort bench step` runs (CPU backend, the 3-layer
fixture, each decode shape also with one long sequence and with its contexts spread): one row per
shape with the change of the medians, marked ~ where the builds' ranges overlap, and one line and
exit 2 for files it cannot compare.

  /usr/bin/python3 tests/scripts/compare_steps_test.py --bin-dir build/bin
"""
import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMPARE = os.path.join(ROOT, "scripts", "compare_steps.py")
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "models", "v3_plain")


def bench(bin_dir, out, batch_sizes):
    subprocess.run([os.path.join(bin_dir, "cohort"), "bench", "step", "--device", "cpu", "--model", FIXTURE,
                    "--copy-bandwidth-gbs", "10", "--contexts", "16,32", "--batch-sizes", batch_sizes, "--long-context", "48",
                    "--spread-contexts", "--prefill", "1x8", "--iterations", "2", "--warmup", "0", "--threads", "1", "--output", out],
                   check=True, capture_output=True, timeout=120)
    with open(out) as f:
        return json.load(f)


def step_times(run):
    """{shape: step ms} of one run, shapes keyed as the rows of the comparison are read."""
    times = {("decode", x["context"], x["batch"], x.get("long_context", 0), x.get("spread", False)): x["step_ms"]
             for x in run["decode"]}
    times.update({("prefill", x["sequences"], x["tokens_per_sequence"]): x["step_ms"] for x in run["prefill"]})
    return times


def scaled(run, factor, path):
    """A copy of a run at `path` whose step times are `factor` times its own."""
    copy = json.loads(json.dumps(run))
    for row in copy["decode"] + copy["prefill"]:
        row["step_ms"] *= factor
    with open(path, "w") as f:
        json.dump(copy, f)
    return path


def parse_rows(stdout):
    """{shape: [base lo, base hi, new lo, new hi, change %, marked]} from a comparison's rows."""
    rows = {}  # decode rows read "[~]context[+long] batch ...", prefill rows "SEQUENCESxTOKENS ..."
    for line in stdout.splitlines():
        m = re.fullmatch(r"\s*(~?)(\d+)(?:\+(\d+))?(x|\s+)(\d+)\s+([\d.]+)-([\d.]+)\s+([\d.]+)-([\d.]+)\s+([+-][\d.]+)%( ~)?",
                         line)
        if m:
            if m[4] == "x":
                shape = ("prefill", int(m[2]), int(m[5]))
            else:
                shape = ("decode", int(m[2]), int(m[5]), int(m[3] or 0), m[1] == "~")
            rows[shape] = [float(v) for v in m.groups()[5:10]] + [m[11] is not None]
    return rows


def compare(base, new):
    return subprocess.run([sys.executable, COMPARE, "--base", *base, "--new", *new], capture_output=True,
                          text=True, timeout=60)


def expect(condition, message):
    if not condition:
        print(f"FAILED: {message}")
        sys.exit(1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin-dir", required=True)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = [os.path.join(tmp, f"run{i}.json") for i in range(4)]
        runs = [bench(args.bin_dir, path, "1,2") for path in paths]

        # Two runs a build: a row per decode shape and per prefill shape, min-max and medians' change.
        r = compare(paths[:2], paths[2:])
        expect(r.returncode == 0 and r.stderr == "", f"compare failed: {r.returncode} {r.stderr}")
        rows = parse_rows(r.stdout)
        shapes = {("decode", c, b, long, spread) for c in (16, 32) for b in (1, 2)
                  for long, spread in ((0, False), (48, False), (0, True))} | {("prefill", 1, 8)}
        expect(set(rows) == shapes, f"rows {sorted(rows)} for shapes {sorted(shapes)}:\n{r.stdout}")

        steps = [step_times(run) for run in runs]
        for shape, (base_lo, base_hi, new_lo, new_hi, change, marked) in rows.items():
            base, new = [t[shape] for t in steps[:2]], [t[shape] for t in steps[2:]]
            expect(abs(base_lo - min(base)) < 6e-4 and abs(base_hi - max(base)) < 6e-4, f"{shape}: base span")
            expect(abs(new_lo - min(new)) < 6e-4 and abs(new_hi - max(new)) < 6e-4, f"{shape}: new span")
            want = 100.0 * (statistics.median(new) / statistics.median(base) - 1.0)
            expect(abs(change - want) < 0.051, f"{shape}: change {change} against {want:.3f}")
            expect(marked == (min(base) <= max(new) and min(new) <= max(base)), f"{shape}: ~ mark {marked}")
        expect(f"over 2 runs of the base and 2 of this build" in r.stdout, r.stdout)

        # A build far slower than its base is apart from it at every shape: slower by a power of ten
        # at least ten times the base runs' own spread (on a loaded machine one run can take 16
        # times another). The same runs on both sides overlap at every shape, with no change.
        spread = max(max(t[shape] for t in steps[:2]) / min(t[shape] for t in steps[:2]) for shape in shapes)
        factor = 10.0 ** (1 + math.ceil(math.log10(spread)))
        slow = [scaled(run, factor, os.path.join(tmp, f"slow{i}.json")) for i, run in enumerate(runs[:2])]
        r = compare(paths[:2], slow)
        rows = parse_rows(r.stdout)
        expect(r.returncode == 0 and set(rows) == shapes, f"{factor:g} times as slow:\n{r.stdout}{r.stderr}")
        for shape, row in rows.items():
            expect(abs(row[4] - 100.0 * (factor - 1.0)) < 0.051 and not row[5],
                   f"{shape}, {factor:g} times as slow: {row}")
        r = compare(paths[:2], paths[:2])
        rows = parse_rows(r.stdout)
        expect(r.returncode == 0 and set(rows) == shapes, f"the same runs:\n{r.stdout}{r.stderr}")
        for shape, row in rows.items():
            expect(abs(row[4]) < 0.051 and row[5], f"{shape}, the same runs: {row}")

        # Files it cannot compare: one line on stderr, nothing on stdout, exit 2.
        other = os.path.join(tmp, "other.json")
        bench(args.bin_dir, other, "1,3")
        not_bench = os.path.join(tmp, "not_bench.json")
        with open(not_bench, "w") as f:
            json.dump({"decode": [{"batch": 1}]}, f)
        broken = os.path.join(tmp, "broken.json")
        with open(broken, "w") as f:
            f.write('{"decode": [')
        for base, new, says in (([paths[0]], [other], "other shapes"),
                                ([paths[0], other], [paths[1]], "other shapes"),
                                ([paths[0]], [not_bench], "not the JSON of `cohort bench step --output`"),
                                ([broken], [paths[1]], "broken.json"),
                                ([paths[0]], [os.path.join(tmp, "missing.json")], "missing.json")):
            r = compare(base, new)
            lines = r.stderr.splitlines()
            expect(r.returncode == 2 and r.stdout == "" and len(lines) == 1 and says in lines[0],
                   f"{base} {new}: exit {r.returncode}, stdout {r.stdout!r}, stderr {r.stderr!r}")
    print("compare_steps_test: passed")


if __name__ == "__main__":
    main()
