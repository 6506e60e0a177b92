#!/usr/bin/python3
"""Checks deploy/docker/{router,worker}.Dockerfile against scripts/setup.sh and the built binaries.

No Docker daemon is needed: the Dockerfiles are parsed, and the steps that can run here do.
- The build stage installs exactly setup.sh's PACKAGES: its install RUN step is executed by bash with
  apt-get and rm stubbed, and the packages it would install are compared with the PACKAGES array
  that bash reads out of setup.sh.
- The router's runtime stage installs, for every shared library build/bin/cohort-router links to,
  the Debian 12 package that provides it (this machine is Debian 12 too), and no -dev package.
- The worker's bundle step (deploy/docker/bundle_libs.sh) run on build/bin/cohort-worker gives a
  folder that runs the worker with LD_LIBRARY_PATH set, without glibc, libstdc++ or CUDA libraries.
- Both final stages: the expected base image, a numeric non-root USER, EXPOSEd default ports, an
  ENTRYPOINT that is the copied binary; the worker keeps NCCL_NVLS_ENABLE=0 and /models.

  /usr/bin/python3 tests/deploy/dockerfile_packages_test.py --bin-dir build/bin
"""
import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SETUP = os.path.join(ROOT, "scripts", "setup.sh")
DOCKER = os.path.join(ROOT, "deploy", "docker")
# Libraries every Debian and Ubuntu base image has (Priority: required, or what apt needs).
BASE_PACKAGES = {"libc6", "libgcc-s1", "libstdc++6", "zlib1g", "libzstd1", "liblzma5", "libbz2-1.0"}


def setup_packages():
    """setup.sh's PACKAGES array, as bash itself reads it."""
    script = 'eval "$(sed -n "/^PACKAGES=(/,/^)/p" "$1")"; printf "%s\\n" "${PACKAGES[@]}"'
    out = subprocess.run(["bash", "-c", script, "bash", SETUP], capture_output=True, text=True, check=True).stdout
    packages = out.split()
    assert len(packages) >= 10, f"read only {packages} from {SETUP}"
    return packages


def parse_dockerfile(path):
    """[(stage name or None, base image, [(instruction, text)])], continuation lines joined."""
    lines = []
    pending = ""
    for raw in open(path):
        line = raw.rstrip("\n")
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if pending and line.lstrip().startswith("#"):
            continue  # comments inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    stages = []
    for line in lines:
        instr, _, text = line.strip().partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            m = re.match(r"(\S+)(?:\s+AS\s+(\S+))?", text.strip(), re.I)
            stages.append((m.group(2), m.group(1), []))
        elif stages:
            stages[-1][2].append((instr, text.strip()))
    return stages


def args_of(path):
    """ARG defaults declared before the first FROM (for ${VAR} in FROM)."""
    defaults = {}
    for line in open(path):
        if line.startswith("FROM"):
            break
        m = re.match(r"ARG\s+(\w+)=(\S+)", line)
        if m:
            defaults[m.group(1)] = m.group(2)
    return defaults


def run_install_step(run_text, copy_dest):
    """Runs a RUN step with apt-get and rm stubbed; returns what `apt-get install` was given."""
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "installed")
        stubs = (f'apt-get() {{ if [ "$1" = install ]; then shift; printf "%s\\n" "$@" >> {shlex.quote(log)}; fi; }}\n'
                 'rm() { :; }\n')
        script = stubs + run_text.replace(copy_dest, SETUP)
        subprocess.run(["bash", "-o", "pipefail", "-e", "-c", script], check=True, capture_output=True, text=True)
        args = open(log).read().split() if os.path.exists(log) else []
    return [a for a in args if not a.startswith("-")]


def final_stage_checks(stages, name, base_pattern, binary, ports):
    _, base, instrs = stages[-1]
    assert re.fullmatch(base_pattern, base), f"{name}: runtime base {base} is not {base_pattern}"
    users = [t for i, t in instrs if i == "USER"]
    assert users, f"{name}: the runtime stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"{name}: USER {users[-1]} must be a numeric non-root id"
    exposed = {int(p) for i, t in instrs if i == "EXPOSE" for p in t.split()}
    assert exposed == set(ports), f"{name}: EXPOSE {exposed}, want {ports}"
    entry = [t for i, t in instrs if i == "ENTRYPOINT"]
    assert entry and binary in entry[-1], f"{name}: ENTRYPOINT {entry} does not run {binary}"
    copies = [t for i, t in instrs if i == "COPY"]
    assert any(t.startswith("--from=build") for t in copies), f"{name}: nothing copied from the build stage"
    runs = " ".join(t for i, t in instrs if i == "RUN")
    assert not re.search(r"\S+-dev\b", runs), f"{name}: a -dev package in the runtime stage"
    return instrs


def build_stage_checks(stages, name, packages):
    build = [s for s in stages if s[0] == "build"]
    assert len(build) == 1, f"{name}: one stage named build"
    _, base, instrs = build[0]
    assert base == "debian:12", f"{name}: build stage on {base}, not debian:12"
    copy_dest = None
    for i, t in instrs:
        if i == "COPY" and t.split()[0] == "scripts/setup.sh":
            copy_dest = t.split()[1]
    assert copy_dest, f"{name}: the build stage does not copy scripts/setup.sh"
    install_runs = [t for i, t in instrs if i == "RUN" and copy_dest in t]
    assert len(install_runs) == 1, f"{name}: one RUN step reads {copy_dest}"
    got = run_install_step(install_runs[0], copy_dest)
    assert got == packages, f"{name}: build stage installs {got}, setup.sh has {packages}"
    other = [t for i, t in instrs if i == "RUN" and "apt-get install" in t and copy_dest not in t]
    for t in other:  # only the CUDA toolchain (and what fetches its keyring) may come on top
        for group in re.findall(r"apt-get install ([^&;]+)", t):
            for pkg in shlex.split(group):
                if pkg.startswith("-"):
                    continue
                assert pkg in ("ca-certificates", "wget") or pkg.startswith(("cuda-", "libcublas", "libnccl")), \
                    f"{name}: the build stage installs {pkg} beyond setup.sh"
    return instrs


def linked_packages(binary):
    """Debian packages providing the shared libraries a binary links to."""
    ldd = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    packages = set()
    for lib in re.findall(r"=> (/\S+)", ldd):
        real = os.path.realpath(lib)
        out = subprocess.run(["dpkg", "-S", real], capture_output=True, text=True)
        if out.returncode != 0:
            out = subprocess.run(["dpkg", "-S", lib], capture_output=True, text=True)
        assert out.returncode == 0, f"no Debian package owns {lib}"
        packages.add(out.stdout.split(":")[0])
    return packages


def test_router(packages, bin_dir):
    path = os.path.join(DOCKER, "router.Dockerfile")
    stages = parse_dockerfile(path)
    build_stage_checks(stages, "router", packages)
    instrs = final_stage_checks(stages, "router", r"debian:12-slim", "cohort-router", [50051, 8080, 9090])
    runtime = set()
    for i, t in instrs:
        m = re.search(r"apt-get install -y --no-install-recommends ([^&]+)", t) if i == "RUN" else None
        if m:
            runtime |= set(m.group(1).split())
    needed = linked_packages(os.path.join(bin_dir, "cohort-router")) - BASE_PACKAGES
    assert needed <= runtime, f"router image lacks {sorted(needed - runtime)}"
    assert runtime <= needed, f"router image installs {sorted(runtime - needed)} that it does not link to"


def test_worker(packages, bin_dir):
    path = os.path.join(DOCKER, "worker.Dockerfile")
    stages = parse_dockerfile(path)
    build_stage_checks(stages, "worker", packages)
    base = stages[-1][1]
    m = re.fullmatch(r"\$\{(\w+)\}", base)
    if m:
        base = args_of(path)[m.group(1)]
        stages[-1] = (stages[-1][0], base, stages[-1][2])
    instrs = final_stage_checks(stages, "worker", r"nvidia/cuda:13\.0\.\d+-runtime-ubuntu24\.04", "cohort-worker",
                                [50061, 9091])
    env = " ".join(t for i, t in instrs if i == "ENV")
    assert "NCCL_NVLS_ENABLE=0" in env, env
    runs = " ".join(t for i, t in instrs if i == "RUN")
    cmd = " ".join(t for i, t in instrs if i == "CMD")
    assert "/models" in runs and "--model=/models" in cmd, "the model is expected at /models"
    build_runs = " ".join(t for i, t in [s for s in stages if s[0] == "build"][0][2] if i == "RUN")
    assert "deploy/docker/bundle_libs.sh /out build/bin/cohort-worker" in build_runs


def test_bundle(bin_dir):
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([os.path.join(DOCKER, "bundle_libs.sh"), out, os.path.join(bin_dir, "cohort-worker")],
                       check=True)
        libs = os.listdir(os.path.join(out, "lib"))
        for want in ("libgrpc++", "libprotobuf", "libspdlog", "libprometheus-cpp-core", "libgomp"):
            assert any(l.startswith(want + ".so") for l in libs), f"bundle lacks {want}: {libs}"
        for unwanted in ("libc.so", "libstdc++", "libm.so", "libgcc_s", "libcuda", "libnccl", "ld-linux"):
            assert not any(l.startswith(unwanted) for l in libs), f"bundle holds {unwanted}: {libs}"
        env = dict(os.environ, LD_LIBRARY_PATH=os.path.join(out, "lib"))
        ldd = subprocess.run(["ldd", os.path.join(out, "bin", "cohort-worker")], env=env, capture_output=True,
                             text=True, check=True).stdout
        assert "not found" not in ldd, ldd
        for lib in re.findall(r"(\S+) => (/\S+)", ldd):
            name, where = lib
            if name.startswith(("libgrpc", "libprotobuf", "libabsl", "libspdlog", "libfmt", "libprometheus")):
                assert where.startswith(out), f"{name} resolves to {where}, not the bundle"
        help_out = subprocess.run([os.path.join(out, "bin", "cohort-worker"), "--help"], env=env,
                                  capture_output=True, text=True, check=True).stdout
        assert "--kv-cache-bytes" in help_out


def test_dockerignore():
    for name in ("router", "worker"):
        ignore = open(os.path.join(DOCKER, f"{name}.Dockerfile.dockerignore")).read().split()
        assert "build*" in ignore and ".git" in ignore, ignore
        # Everything the build needs stays in the context.
        for needed in ("CMakeLists.txt", "proto", "common", "worker", "router", "tools", "tests", "kernels",
                       "scripts", "deploy"):
            assert needed not in ignore and os.path.exists(os.path.join(ROOT, needed)), needed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin-dir", default=os.path.join(ROOT, "build", "bin"))
    args = ap.parse_args()
    assert shutil.which("bash") and shutil.which("ldd") and shutil.which("dpkg")
    packages = setup_packages()
    cases = [
        ("router.Dockerfile", lambda: test_router(packages, args.bin_dir)),
        ("worker.Dockerfile", lambda: test_worker(packages, args.bin_dir)),
        ("bundle_libs.sh makes a runnable worker bundle", lambda: test_bundle(args.bin_dir)),
        ("the build context keeps the sources", test_dockerignore),
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
