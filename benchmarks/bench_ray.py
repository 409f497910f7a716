"""fastad sweep on an embedded local Ray (2 CPUs): the demo grid's wall time with 1 vs 2
concurrent Ray workers, and the per-job overhead of Ray tasks against a plain in-process
loop over the same jobs (fastad.distributed.sweep.run_job).

Per-job overhead = (Ray with 1 worker - plain loop) / 16. Grid: dictas and inctrlv2 (tiny
random CLIP) x 2 demo categories x shots 1, 2 x seeds 0, 1
(16 jobs); quick: 32 px images with 4 test images per category, full: 64 px and 12."""
from __future__ import annotations

import itertools

import pytest

ray = pytest.importorskip("ray")

from fastad.data import synthetic  # noqa: E402
from fastad.distributed.sweep import JobOptions, plan_jobs, run_job, sweep  # noqa: E402

METHODS = ["dictas", "inctrlv2"]
SHOTS, SEEDS = [1, 2], [0, 1]


@pytest.fixture(scope="module")
def grid(tmp_path_factory, bench_size):
    size, n_good = (32, 1) if bench_size == "quick" else (64, 3)
    root = tmp_path_factory.mktemp("bench-ray") / "demo"
    synthetic.make_demo_dataset(root, categories=("brick", "grass"), size=size, n_train=2, n_test_good=n_good,
                                n_test_defect=n_good)
    tiny = dict(backbone="fastad-tiny", image_size=size, layers=(1, 2, 3, 4))
    opts = JobOptions(config={m: tiny for m in METHODS}, cache_dir=None, overlays=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield root, opts, tmp_path_factory
    ray.shutdown()


_RUN = itertools.count()


def _sweep(grid, cpus_per_task, methods=METHODS, seeds=SEEDS):
    root, opts, tmp = grid
    return sweep(methods, [root], tmp.mktemp(f"sweep{next(_RUN)}"), shots=SHOTS, seeds=seeds, options=opts,
                 cpus_per_task=cpus_per_task, progress=False)


def _loop(grid):
    root, opts, tmp = grid
    out = tmp.mktemp(f"loop{next(_RUN)}")
    return [run_job(job, str(out), opts) for job in plan_jobs(METHODS, [root], None, SHOTS, SEEDS)]


GROUP = "sweep of 16 demo jobs, 2 CPUs"


@pytest.mark.parametrize("workers", [1, 2])
def test_sweep_ray(bench, grid, workers):
    """1 worker: one task at a time with both CPUs (torch threads); 2: two tasks of one CPU."""
    _sweep(grid, 2 / workers, ["dictas"], [0])  # warm-up: Ray starts its worker processes
    res = bench(lambda: _sweep(grid, 2 / workers), group=GROUP, impl=f"Ray, {workers} worker(s)", role="fastad",
                rounds=1, memory=False)
    assert not res.failed


def test_sweep_plain_loop(bench, grid):
    """The same jobs one after the other in this process: (Ray 1 worker - loop) / 16 is Ray's
    per-job overhead."""
    bench(lambda: _loop(grid), group=GROUP, impl="plain loop", role="peer", rounds=1, memory=False)
