"""Shared benchmark machinery: side-by-side runs with peak memory, and a ratio
table printed at the end of the session (benchmarks/report.py).

    def test_x(bench):
        bench(lambda: op(a, b), group="op 576x2304x1024", impl="fastad cpu", role="fastad")

`--bench-size quick|full` picks the problem sizes (quick: minutes on 2 cores).

By default every implementation, fastad and peer alike, is timed over 3 rounds (5
when a call takes under a second) and reported by its median; suites that use faiss call
`tune_faiss()` first so that faiss runs at its best.
"""
from __future__ import annotations

import os
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from report import markdown_table  # noqa: E402

from fastad._memory import peak_memory  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--bench-size", choices=("quick", "full"), default="quick",
                     help="problem sizes: quick (a few minutes on 2 CPU cores) or full (the papers' sizes)")
    parser.addoption("--bench-device", default="cpu", help="device for the benchmarks (cpu or cuda)")


@pytest.fixture(scope="session")
def bench_size(request) -> str:
    return request.config.getoption("--bench-size")


@pytest.fixture(scope="session")
def bench_device(request) -> torch.device:
    dev = torch.device(request.config.getoption("--bench-device"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda but no CUDA device")
    return dev


MIN_ROUNDS = 3


def tune_faiss() -> None:
    """faiss at its best here: BLAS for every query count (faiss 1.15 only uses BLAS
    above 128,000 queries x rows by default) and as many threads as torch."""
    import faiss

    faiss.cvar.distance_compute_blas_threshold = 20
    faiss.omp_set_num_threads(torch.get_num_threads())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@pytest.fixture
def bench(benchmark, bench_device):
    """Time ``fn`` (with a warm-up call that also measures peak memory) over ``rounds``
    rounds: by default 5 when the warm-up took under a second, else 3."""

    def run(fn, *, group: str, impl: str, role: str, rounds: int | None = None, memory: bool = True, **info):
        assert role in ("fastad", "peer")
        benchmark.group = group
        benchmark.extra_info.update(impl=impl, role=role, device=str(bench_device), **info)
        start = time.perf_counter()
        if memory:
            _, peak = peak_memory(fn, bench_device)
            if peak is not None:
                benchmark.extra_info["peak_mib"] = peak / 2**20
        else:
            fn()
        _sync(bench_device)
        if rounds is None:
            rounds = 5 if time.perf_counter() - start < 1.0 else MIN_ROUNDS

        def timed():
            out = fn()
            _sync(bench_device)
            return out

        return benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=0)

    return run


def pytest_benchmark_update_machine_info(config, machine_info):
    """Record the versions that the side-by-side numbers depend on."""
    import importlib.metadata as md

    from fastad import _ext

    versions = {"torch": torch.__version__, "fastad ISA": _ext.cpu_isa() or "no _C",
                "threads": torch.get_num_threads()}
    for pkg in ("faiss-cpu", "faiss-gpu", "entmax", "anomalib", "scikit-learn", "triton"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    if torch.cuda.is_available():
        versions["gpu"] = torch.cuda.get_device_name()
    machine_info["fastad_versions"] = versions


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    rows = []
    for b in session.benchmarks:
        if not b.stats:  # benchmark disabled or errored
            continue
        rows.append({"group": b.group or b.name, "name": b.name, "median": b.stats.median, **b.extra_info})
    if rows:
        terminalreporter.write_sep("=", "fastad side by side (speed-up = peer median / fastad median)")
        terminalreporter.write_line(markdown_table(rows))
