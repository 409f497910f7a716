"""One call for the day a GPU is lent (``make gpu-check`` / ``make gpu-check-quick``).

1. the CUDA-only tests (Triton kernels compiled for the device, checked against the
   reference), at most 150 / 240 s;
2. the GPU benchmarks side by side in one process, fastad and its peers alternating
   round by round: nn_distance (fastad Triton vs torch bf16 / fp32 mm + max, faiss-gpu
   when installed) at the papers' sizes, 43,808 x 1,000,000 x 1,024 included; SAA+'s
   saliency (top-400 mean); dict_lookup sparsemax (vs the dense reference and entmax);
   k-center (vs the plain torch loop);
3. the four models end to end (backend="fastad" vs "reference") with bf16 backbones:
   benchmarks/bench_models_*.py run under bfloat16 autocast;

then writes benchmarks/results/gpu-<card>.md: time, TFLOP/s and the speed-up over the
row's baseline peer, and whether each target of issue 19 is met. Progress goes to
stdout. Without a CUDA device it says so and exits 0. ``--dry-run`` builds and runs
every case at a tiny size on the CPU (Triton in the interpreter): the CPU-side
self-check of tests/test_gpu_check.py.

    python benchmarks/gpu_check.py [--quick] [--dry-run] [--out DIR] [--skip-tests] [--skip-models]
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # this checkout's fastad, not an installed one

# Targets kept from issue 19 (checked against the measured rows; "not met" is reported, not hidden).
TARGETS = [
    ("nn_distance k=1 43,808x1,000,000x1,024", "fastad triton bf16", "tflops", 650.0,
     "exact nn_distance >= 650 TFLOP/s on an H100"),
    ("nn_distance k=1 43,808x1,000,000x1,024", "fastad triton bf16", "speedup", 1.3,
     ">= 1.3x torch bf16 mm + max"),
    ("dict_lookup sparsemax 1x576x23,040x1,024", "fastad triton", "speedup", 5.0,
     "sparsemax lookup >= 5x the dense reference"),
    ("kcenter iCAS 32x1,369x1,024 -> 200", "fastad triton", "speedup", 30.0,
     "batched k-center >= 30x the torch loop"),
]

CUDA_TESTS = ["tests/test_nn_distance_triton.py", "tests/test_kcenter.py", "tests/test_sparsemax.py",
              "tests/test_mask_pool.py", "tests/test_metrics.py::test_cuda_inputs_use_the_reference_on_the_gpu"]
MODEL_BENCHES = ["benchmarks/bench_models_clip.py", "benchmarks/bench_models_saa_icas.py"]


@dataclass
class Impl:
    name: str
    role: str  # "fastad" or "peer"
    make: Callable[[], Callable[[], object]]  # builds inputs, returns the timed call
    baseline: bool = False  # the peer that the speed-up column compares with


@dataclass
class Group:
    name: str
    flops: float  # 0: no TFLOP/s column
    impls: list[Impl]
    rounds: int = 3
    rows: list[dict] = field(default_factory=list)


def _fmt(n: int) -> str:
    return f"{n:,}"


def build_plan(device, quick: bool, tiny: bool) -> list[Group]:
    """The benchmark groups. ``tiny``: the same cases at toy sizes (CPU self-check)."""
    import torch

    sys.path.insert(0, str(HERE))
    import bench_kcenter as bk
    import bench_nn_distance_gpu as bn
    import bench_sparsemax as bs

    from fastad import ops

    def size(*full):
        return tuple(min(v, t) for v, t in zip(full, (9, 40, 32, 16))) if tiny else full

    groups: list[Group] = []
    nn_sizes = [(1369, 5476, 1024), (43808, 5476, 1024), (43808, 1_000_000, 1024)]
    for N, M, C in nn_sizes:
        n, m, c = size(N, M, C)
        name = f"nn_distance k=1 {_fmt(N)}x{_fmt(M)}x{_fmt(C)}"

        def fastad_nn(dt, n=n, m=m, c=c):
            q, b = bn._data(n, m, c, dt, device)
            return lambda: ops.nn_distance(q, b, k=1, metric="cosine", backend="triton")

        def torch_nn(dt, n=n, m=m, c=c):
            q, b = bn._data(n, m, c, dt, device)
            return lambda: bn._torch_mm_max(q, b)

        impls = [Impl("fastad triton bf16", "fastad", lambda f=fastad_nn: f(torch.bfloat16)),
                 Impl("fastad triton fp32", "fastad", lambda f=fastad_nn: f(torch.float32)),
                 Impl("torch bf16 mm+max", "peer", lambda f=torch_nn: f(torch.bfloat16), baseline=True),
                 Impl("torch fp32 mm+max", "peer", lambda f=torch_nn: f(torch.float32))]
        faiss = bn._faiss_gpu()
        if faiss is not None and not tiny:
            def faiss_nn(n=n, m=m, c=c):
                q, b = bn._data(n, m, c, torch.float32, device)
                index = faiss.GpuIndexFlatIP(faiss.StandardGpuResources(), c)
                index.add(b.cpu().numpy())
                qn = q.cpu().numpy()
                return lambda: index.search(qn, 1)
            impls.append(Impl("faiss-gpu IndexFlatIP", "peer", faiss_nn))
        groups.append(Group(name, 2.0 * N * M * C, impls, rounds=1 if M > 100_000 or quick else 3))

    N, C, k = 4096, 1792, 400
    n, _, c = size(N, N, C)
    kk = min(k, n) if tiny else k

    def saa_data(dt, n=n, c=c):
        return bn._data(n, 8, c, dt, device)[0]

    groups.append(Group(f"nn_distance SAA+ {_fmt(N)}x{_fmt(N)}x{_fmt(C)} top-{k} mean", 2.0 * N * N * C, [
        Impl("fastad triton fp32", "fastad", lambda: (lambda x=saa_data(torch.float32): ops.nn_distance(
            x, x, k=kk, metric="cosine", scale=0.5, reduce="mean_largest", backend="triton"))),
        Impl("torch fp32 mm+topk", "peer", lambda: (lambda x=saa_data(torch.float32): (
            0.5 * (1.0 - x @ x.T)).topk(kk, dim=-1).values.mean(-1)), baseline=True),
    ], rounds=1 if quick else 3))

    lookups = [(1, 576, 2304, 1024), (1, 576, 23040, 1024)] + ([] if quick else [(32, 576, 2304, 1024)])
    for B, N, M, C in lookups:
        b_, n, m, c = (min(B, 2), *size(N, M, C)[:2], 16) if tiny else (B, N, M, C)

        def lookup_in(b_=b_, n=n, m=m, c=c):
            return bs.inputs(b_, n, m, c, device)

        peers = bs.PEERS["sparsemax"]
        impls = [Impl("fastad triton", "fastad", lambda: (lambda t=lookup_in(): ops.dict_lookup(
            *t, mode="sparsemax", backend="triton")))]
        for i, (pname, fn) in enumerate(peers.items()):
            impls.append(Impl(pname, "peer", lambda fn=fn: (lambda t=lookup_in(): fn(*t)), baseline=i == 0))
        groups.append(Group(f"dict_lookup sparsemax {B}x{_fmt(N)}x{_fmt(M)}x{_fmt(C)}", 4.0 * B * N * M * C,
                            impls, rounds=1 if quick else 3))

    kc = [("iCAS", 32, 1369, 1024, 200)] + ([] if quick else [("PatchCore coreset", 1, 163_840, 128, 1638)])
    for label, B, N, C, picks in kc:
        b_, n, c, p = (2, 40, 16, 5) if tiny else (B, N, C, picks)

        def kc_data(b_=b_, n=n, c=c):
            return bk.patch_like(b_ * n, c, seed=1).reshape(b_, n, c).to(device)

        groups.append(Group(f"kcenter {label} {B}x{_fmt(N)}x{_fmt(C)} -> {picks}", 0.0, [
            Impl("fastad triton", "fastad", lambda p=p: (lambda x=kc_data(): ops.kcenter_greedy(
                x, p, backend="triton").indices)),
            Impl("torch loop (fp32, batched)", "peer", lambda p=p: (lambda x=kc_data(): bk.torch_loop(x, p)),
                 baseline=True),
        ], rounds=1))
    return groups


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_group(group: Group, device, log: Callable[[str], None]) -> None:
    """Warm-up (compile, autotune) then rounds with the implementations alternating."""
    calls, times = {}, {}
    for impl in group.impls:
        try:
            fn = impl.make()
            fn()
            _sync(device)
            calls[impl.name] = fn
            times[impl.name] = []
        except Exception as exc:  # a peer may be missing or run out of memory: the row says so
            group.rows.append(dict(impl=impl.name, role=impl.role, error=f"{type(exc).__name__}: {exc}"[:200]))
            log(f"  {impl.name}: {type(exc).__name__}: {str(exc)[:200]}")
    for _ in range(group.rounds):
        for impl in group.impls:
            if impl.name in calls:
                t0 = time.perf_counter()
                calls[impl.name]()
                _sync(device)
                times[impl.name].append(time.perf_counter() - t0)
    base = next((statistics.median(times[i.name]) for i in group.impls if i.baseline and i.name in times), None)
    for impl in group.impls:
        if impl.name not in times:
            continue
        t = statistics.median(times[impl.name])
        row = dict(impl=impl.name, role=impl.role, ms=1e3 * t,
                   tflops=group.flops / t / 1e12 if group.flops else None,
                   speedup=base / t if base is not None else None, baseline=impl.baseline)
        group.rows.append(row)
        tf = f", {row['tflops']:.1f} TFLOP/s" if row["tflops"] else ""
        sp = f", {row['speedup']:.2f}x" if row["speedup"] is not None else ""
        log(f"  {impl.name}: {row['ms']:.2f} ms{tf}{sp}")
    calls.clear()


def run_tests(quick: bool, log) -> tuple[int, str]:
    """pytest on the CUDA-only tests, compiled for the device. Bounded in time (kernel
    compiles and autotuning dominate a first run): a timeout is reported, not fatal."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CUDA_TESTS, "-k", "cuda or gpu"]
    limit = 150 if quick else 240
    log("$ " + " ".join(args[2:]) + f"  (at most {limit} s)")
    try:
        done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        log(f"  timed out after {limit} s")
        return -1, f"timed out after {limit} s"
    summary = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
    log(f"  {summary}")
    return done.returncode, summary


class _Bf16Backbones:
    """pytest plugin: every benchmark runs under CUDA bfloat16 autocast (bf16 backbones)."""

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(self, item):
        import torch

        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield


def run_models(quick: bool, dry_run: bool, out_json: Path, log) -> list[dict]:
    """The four models end to end (fastad vs reference backend); rows from pytest-benchmark's JSON."""
    import json

    args = [*[str(ROOT / f) for f in MODEL_BENCHES], "-q", "-p", "no:cacheprovider", "--benchmark-only",
            f"--bench-size={'quick' if quick else 'full'}", f"--benchmark-json={out_json}",
            "-k", "end_to_end or test_head or saa_plus or icas"]
    if dry_run:
        args = [*[str(ROOT / f) for f in MODEL_BENCHES], "-q", "--collect-only", "-p", "no:cacheprovider"]
    else:
        args.append("--bench-device=cuda")
    log("$ pytest " + " ".join(a.replace(str(ROOT) + "/", "") for a in args))
    rc = pytest.main(args, plugins=[] if dry_run else [_Bf16Backbones()])
    if dry_run:
        if rc != 0:
            raise RuntimeError(f"model benchmarks do not collect (pytest exit {rc})")
        return []
    if not out_json.exists():
        return []
    rows = []
    for b in json.loads(out_json.read_text())["benchmarks"]:
        info = b.get("extra_info", {})
        rows.append(dict(group=b.get("group") or b["name"], impl=info.get("impl", b["name"]), role=info.get("role"),
                         ms=1e3 * b["stats"]["median"]))
    return rows


def _card_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def write_report(path: Path, card: str, quick: bool, tests: tuple[int, str] | None, groups: list[Group],
                 models: list[dict], wall: float) -> None:
    from fastad._io import atomic_write

    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [f"# GPU check on {card}", "",
             f"`python benchmarks/gpu_check.py{' --quick' if quick else ''}`, {when}, "
             f"{wall / 60:.1f} min. Medians; fastad and peers alternate round by round in one process. "
             "Speed-up: the baseline peer's time / the row's time.", ""]
    if tests is not None:
        lines += [f"CUDA tests: exit {tests[0]}, {tests[1]}", ""]
    lines += ["| group | impl | role | ms | TFLOP/s | speed-up |", "|---|---|---|---:|---:|---:|"]
    for g in groups:
        for r in g.rows:
            if "error" in r:
                lines.append(f"| {g.name} | {r['impl']} | {r['role']} | {r['error']} | | |")
                continue
            tf = f"{r['tflops']:.1f}" if r["tflops"] else ""
            sp = "baseline" if r["baseline"] else (f"{r['speedup']:.2f}x" if r["speedup"] is not None else "")
            lines.append(f"| {g.name} | {r['impl']} | {r['role']} | {r['ms']:.2f} | {tf} | {sp} |")
    lines += ["", "## Targets (issue 19)", ""]
    by = {(g.name, r["impl"]): r for g in groups for r in g.rows if "error" not in r}
    for gname, impl, key, want, text in TARGETS:
        r = by.get((gname, impl))
        if r is None or r.get(key) is None:
            lines.append(f"- {text}: not measured")
        else:
            lines.append(f"- {text}: {r[key]:.2f} -> {'met' if r[key] >= want else 'NOT met'}")
    if models:
        lines += ["", "## Models end to end (bf16 backbones via autocast), ms per call", "",
                  "| group | impl | ms | fastad speed-up |", "|---|---|---:|---:|"]
        ref = {m["group"]: m["ms"] for m in models if m["role"] == "peer"}
        for m in models:
            sp = f"{ref[m['group']] / m['ms']:.2f}x" if m["role"] == "fastad" and m["group"] in ref else ""
            lines.append(f"| {m['group']} | {m['impl']} | {m['ms']:.1f} | {sp} |")
    with atomic_write(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer sizes and rounds (under 3 minutes on an H100)")
    p.add_argument("--dry-run", action="store_true", help="every case at a tiny size on the CPU (self-check)")
    p.add_argument("--out", type=Path, default=HERE / "results", help="folder of gpu-<card>.md")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-models", action="store_true")
    a = p.parse_args(argv)
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[gpu-check {time.time() - t0:6.1f}s] {msg}", flush=True)

    if a.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton kernels are imported
    import torch

    if not a.dry_run and not torch.cuda.is_available():
        log("no CUDA device on this machine: nothing to check (exit 0)")
        return 0
    device = torch.device("cpu" if a.dry_run else "cuda")
    card = "dry-run-cpu" if a.dry_run else torch.cuda.get_device_name(device)
    tests = None
    if not a.skip_tests and not a.dry_run:
        log("1/3 CUDA tests")
        tests = run_tests(a.quick, log)
    log("2/3 kernel benchmarks" + (" (tiny, CPU)" if a.dry_run else ""))
    groups = build_plan(device, a.quick, tiny=a.dry_run)
    for i, g in enumerate(groups):
        log(f"[{i + 1}/{len(groups)}] {g.name}")
        run_group(g, device, log)
    models: list[dict] = []
    if not a.skip_models:
        log("3/3 models end to end")
        with tempfile.TemporaryDirectory() as tmp:
            models = run_models(a.quick, a.dry_run, Path(tmp) / "models.json", log)
    path = a.out / f"gpu-{_card_slug(card)}.md"
    write_report(path, card, a.quick, tests, groups, models, time.time() - t0)
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
