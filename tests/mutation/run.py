"""Mutation check: does the default test suite notice small, realistic bugs?

Each mutation in ``tests/mutation/mutations.py`` replaces one snippet of one file in
a scratch copy of the repository, rebuilds the C++ extension there when the file is
C++ (incrementally: the copy and its CMake build folder persist between runs), runs
the tests the mutation names, and records whether they fail ("caught") or pass
("SURVIVED"). The unmutated copy must pass those tests first, else the verdict would
mean nothing ("baseline failed").

    python tests/mutation/run.py                 # every mutation
    python tests/mutation/run.py --only nn_cpu_tie_screen aupro_fpr_limit
    python tests/mutation/run.py --list
    make mutation

Exit status 0 when every mutation is caught, 1 when one survives or cannot be
applied. Not part of the default pytest run (pytest collects only test_*.py).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

from mutations import MUTATIONS, Mutation  # noqa: E402

C_SUFFIXES = (".cpp", ".h", ".cu", ".cuh", ".txt")


def repo_files(root: Path) -> list[str]:
    """Tracked files plus untracked ones git does not ignore (what a commit would hold)."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root, check=True,
                         capture_output=True).stdout.decode()
    return sorted(p for p in out.split("\0") if p and (root / p).is_file())


def sync(root: Path, dest: Path, files: list[str]) -> None:
    """Make dest hold root's files, rewriting only those whose bytes differ (a rewrite
    gets a fresh mtime, so CMake recompiles exactly the files that changed, a
    restored original included)."""
    for rel in files:
        src, dst = root / rel, dest / rel
        data = src.read_bytes()
        if dst.is_file() and dst.read_bytes() == data:
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(data)
        shutil.copymode(src, dst)


def build(scratch: Path, build_dir: Path, log: Path) -> bool:
    cmd = [sys.executable, "setup.py", "-q", "build_ext", "--inplace", "--build-temp", str(build_dir)]
    with open(log, "ab") as fh:
        rc = subprocess.run(cmd, cwd=scratch, stdout=fh, stderr=subprocess.STDOUT).returncode
    return rc == 0


def run_tests(scratch: Path, tests: tuple[str, ...], log: Path, timeout: float) -> int:
    env = dict(os.environ, PYTHONPATH=str(scratch), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-o", "addopts=", *tests]
    with open(log, "ab") as fh:
        fh.write(("\n$ " + " ".join(cmd) + "\n").encode())
        fh.flush()
        try:
            return subprocess.run(cmd, cwd=scratch, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            fh.write(b"\n[timeout]\n")
            return -1


def check_fastad_path(scratch: Path) -> None:
    """The tests must import the scratch copy, not an installed fastad."""
    env = dict(os.environ, PYTHONPATH=str(scratch))
    where = subprocess.run([sys.executable, "-c", "import fastad; print(fastad.__file__)"], cwd=scratch, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    if not Path(where).resolve().is_relative_to(scratch.resolve()):
        raise SystemExit(f"mutation: the scratch copy imports fastad from {where}, not from {scratch}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutations")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--scratch", type=Path, default=ROOT / "build" / "mutation",
                    help="work folder (kept between runs for incremental C++ builds; default build/mutation)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per pytest run")
    args = ap.parse_args(argv)

    todo = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.only and len(todo) != len(set(args.only)):
        unknown = sorted(set(args.only) - {m.name for m in MUTATIONS})
        ap.error(f"unknown mutation(s): {', '.join(unknown)} (see --list)")
    if args.list:
        for m in todo:
            print(f"{m.name:28s} {m.file}: {m.why}")
        return 0

    scratch = args.scratch.resolve() / "src"
    build_dir = args.scratch.resolve() / "cmake"
    log = args.scratch.resolve() / "log.txt"
    scratch.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    files = repo_files(ROOT)
    originals = {m.file: (ROOT / m.file).read_text() for m in todo}
    bad = [m.name for m in todo if originals[m.file].count(m.old) != 1]
    if bad:
        print("mutation: these snippets no longer occur exactly once (update tests/mutation/mutations.py): "
              + ", ".join(bad))
        return 1

    print(f"mutation: scratch copy {scratch} (log: {log})", flush=True)
    sync(ROOT, scratch, files)
    t0 = time.time()
    if not build(scratch, build_dir, log):
        print("mutation: the unmutated copy does not build; see the log")
        return 1
    print(f"mutation: unmutated build ready ({time.time() - t0:.0f} s)", flush=True)
    check_fastad_path(scratch)

    results: list[tuple[Mutation, str, float]] = []
    baseline_ok: dict[tuple[str, ...], bool] = {}
    dirty = False  # the built extension is from a mutated source

    def ensure_built() -> bool:
        nonlocal dirty
        if dirty:
            dirty = not build(scratch, build_dir, log)
        return not dirty

    # Baselines first, on the clean build: the named tests must pass unmutated.
    for m in todo:
        if m.tests not in baseline_ok:
            baseline_ok[m.tests] = run_tests(scratch, m.tests, log, args.timeout) == 0
    # C++ mutations first: a restore and the next mutation then share one build.
    todo.sort(key=lambda m: not m.file.endswith(C_SUFFIXES))
    for m in todo:
        t0 = time.time()
        native = m.file.endswith(C_SUFFIXES)
        if not baseline_ok[m.tests]:
            verdict = "baseline failed"
        else:
            (scratch / m.file).write_text(originals[m.file].replace(m.old, m.new))
            # rebuild for a C++ mutation, or when the extension still holds the previous one
            if (native or dirty) and not build(scratch, build_dir, log):
                verdict, dirty = "build failed", True
            else:
                dirty = native
                rc = run_tests(scratch, m.tests, log, args.timeout)
                verdict = "caught" if rc == 1 else ("SURVIVED" if rc == 0 else f"error (pytest rc {rc})")
            sync(ROOT, scratch, [m.file])  # restore (fresh mtime: the next build recompiles it)
        results.append((m, verdict, time.time() - t0))
        print(f"  {m.name:28s} {verdict:16s} {time.time() - t0:6.0f} s", flush=True)
    ensure_built()  # leave the copy built from the unmutated sources

    caught = sum(v == "caught" for _, v, _ in results)
    print(f"\nmutation: {caught} of {len(results)} caught")
    for m, v, _ in results:
        if v != "caught":
            print(f"  {v}: {m.name} ({m.file}) -- {m.why}; tests: {' '.join(m.tests)}")
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
