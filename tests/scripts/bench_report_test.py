#!/usr/bin/python3
"""scripts/bench_report.sh end to end on null-device workers with tiny sizes (in two invocations
whose summaries add up), then scripts/plot_bench.py on what it wrote.

The report runs with a PATH holding only bash and coreutils, as on a GPU machine whose binaries come
from a bundle (.gpu/bin) and which has none of our Debian packages.

  /usr/bin/python3 tests/scripts/bench_report_test.py --bin-dir build/bin
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REPORT = os.path.join(ROOT, "scripts", "bench_report.sh")
PLOT = os.path.join(ROOT, "scripts", "plot_bench.py")
TINY = ["--max-concurrency", "4", "--input-len", "8", "--output-len", "6", "--requests-per-user", "2",
        "--min-requests", "4", "--mixed-concurrency", "4", "--mixed-input-len", "uniform:2:16",
        "--mixed-output-len", "exponential:6:24", "--mixed-requests", "8", "--prefix-concurrency", "2",
        "--prefix-len", "32", "--prefix-input-len", "4", "--prefix-output-len", "4", "--prefix-requests", "6"]
WORKER = ["--", "--model", os.path.join(ROOT, "tests", "fixtures", "models", "v3_plain"), "--device", "null"]


def bash_and_coreutils_only(tmp):
    """A PATH folder with bash and the coreutils programs, nothing else."""
    path = os.path.join(tmp, "path")
    os.mkdir(path)
    files = subprocess.run(["dpkg", "-L", "coreutils"], capture_output=True, text=True, check=True).stdout.split()
    for f in files + ["/bin/bash"]:
        if os.path.dirname(f) in ("/bin", "/usr/bin") and os.path.isfile(f) and os.access(f, os.X_OK):
            target = os.path.join(path, os.path.basename(f))
            if not os.path.exists(target):
                os.symlink(f, target)
    return path


def run_report(bin_dir, out, env, extra=()):
    return subprocess.run(["bash", REPORT, "--bin-dir", bin_dir, "--out", out, *TINY, *extra, *WORKER],
                          capture_output=True, text=True, env=env, timeout=100)


def check_results(out):
    results = {}
    for name in ("sweep", "mixed_continuous", "mixed_static", "prefix_on", "prefix_off"):
        with open(os.path.join(out, name + ".json")) as f:
            results[name] = json.load(f)
        assert results[name]["label"] == name, results[name]["label"]
        for run in results[name]["runs"]:
            assert run["completed"] == run["num_requests"] and run["failed"] == 0, (name, run["errors"])
            for r in run["requests"]:
                assert r["output_tokens"] == r["max_tokens"], (name, r)
    sweep = results["sweep"]["runs"]
    assert [r["concurrency"] for r in sweep] == [1, 2, 4], [r["concurrency"] for r in sweep]
    assert [r["num_requests"] for r in sweep] == [4, 4, 8], [r["num_requests"] for r in sweep]
    assert results["mixed_static"]["runs"][0]["concurrency"] == 4
    # The same requests for both schedulers: same seed, same workload.
    lengths = [[(r["prompt_tokens"], r["max_tokens"]) for r in results[n]["runs"][0]["requests"]]
               for n in ("mixed_continuous", "mixed_static")]
    assert lengths[0] == lengths[1], lengths
    assert results["prefix_on"]["runs"][0]["cached_prompt_tokens"] > 0
    assert results["prefix_off"]["runs"][0]["cached_prompt_tokens"] == 0

    summary = open(os.path.join(out, "summary.md")).read()
    for heading in ("## One user versus many", "## Continuous versus static batching", "## Prefix caching on versus off"):
        assert heading in summary, summary
    for line in ("output tokens/s at concurrency 4 / at concurrency 1: ", "output tokens/s, continuous / static: ",
                 "cached prompt tokens: on "):
        assert line in summary, summary
    assert "n/a" not in summary, summary
    for row in ("\ncontinuous ", "\nstatic ", "\non ", "\noff "):
        assert row in summary, summary


def check_plots(out):
    plots = os.path.join(out, "plots")
    result = subprocess.run(["/usr/bin/python3", PLOT, out, "--out-dir", plots, "--gpu-hour-cost", "2.5"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    expected = {"concurrency_sweep.png", "cost_per_million_tokens.png", "continuous_vs_static.png", "prefix_cache.png"}
    assert set(os.listdir(plots)) == expected, os.listdir(plots)
    for name in expected:
        with open(os.path.join(plots, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
        assert os.path.getsize(os.path.join(plots, name)) > 10000, name
    assert sorted(os.path.basename(p) for p in result.stdout.split()) == sorted(expected), result.stdout

    empty = os.path.join(out, "empty")
    os.mkdir(empty)
    result = subprocess.run(["/usr/bin/python3", PLOT, empty], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "no `cohort bench serve` results" in result.stderr, result.stderr


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin-dir", required=True)
    args = parser.parse_args()
    bin_dir = os.path.abspath(args.bin_dir)
    with tempfile.TemporaryDirectory() as tmp:
        env = {"PATH": bash_and_coreutils_only(tmp), "HOME": tmp, "TMPDIR": tmp}
        out = os.path.join(tmp, "report")
        # In two parts, as within a time limit per command: the summary joins them.
        for part in ("sweep", "static,prefix"):
            result = run_report(bin_dir, out, env, ["--only", part])
            assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
        check_results(out)
        check_plots(out)

        # Flags it does not know, and a worker that cannot start, end it with one clear line.
        bad = run_report(bin_dir, os.path.join(tmp, "bad"), env, ["--max-concurency", "4"])
        assert bad.returncode == 2 and "unknown flag --max-concurency" in bad.stderr, bad.stderr
        broken = subprocess.run(["bash", REPORT, "--bin-dir", bin_dir, "--out", os.path.join(tmp, "broken"),
                                 "--", "--model", os.path.join(tmp, "no-such-model")],
                                capture_output=True, text=True, env=env, timeout=60)
        assert broken.returncode == 1 and "cohort-worker exited before serving" in broken.stderr, broken.stderr
    print("bench_report_test: ok")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        sys.exit(f"bench_report_test: FAILED: {e}")
