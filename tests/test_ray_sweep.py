"""``fastad sweep`` on an embedded local Ray: the same metrics as sequential ``evaluate``
runs, resuming, retried and reported failures, and a killed worker."""
from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from fastad import cli  # noqa: E402
from fastad.data import synthetic  # noqa: E402
from fastad.distributed.sweep import (JobOptions, SweepJob, parse_method_options, plan_jobs, run_job,  # noqa: E402
                                      sweep)
from fastad.evaluate import build_runner, evaluate  # noqa: E402

# the injected job functions below run in Ray workers, which cannot import this test module
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

TINY = dict(backbone="fastad-tiny", image_size=32, layers=(1, 2, 3, 4))
TINY_ARGS = ["--config", "backbone=fastad-tiny", "--config", "image_size=32", "--config", "layers=(1, 2, 3, 4)"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sweep") / "demo"
    synthetic.make_demo_dataset(root, categories=("brick", "grass"), size=32, n_train=2, n_test_good=1,
                                n_test_defect=1)
    return root


def _metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())["metrics"]


def test_sweep_equals_sequential_evaluate_and_resumes(ray_local, data, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(["sweep", "--methods", "dictas,inctrlv2", "--data", str(data), "--shots", "1,2", "--seeds", "0,1",
                   "--out", str(out), "--no-cache", "--no-overlays", "--no-progress",
                   *TINY_ARGS])
    assert rc == 0, capsys.readouterr().err
    jobs = plan_jobs(["dictas", "inctrlv2"], [data], None, [1, 2], [0, 1])
    assert len(jobs) == 16
    # the same jobs run in this process without Ray: bit-identical outputs (features read back from the
    # feature cache may differ from a fresh batched encode in the last bits, so it is off here)
    for job in jobs:
        torch.manual_seed(0)
        runner = build_runner(job.method, job.category, config=TINY)
        want = evaluate(runner, data, job.category, tmp_path / "seq" / job.name, shots=job.shots, seed=job.seed,
                        overlays=False, progress=False, method=job.method)
        folder = job.folder(out)
        assert _metrics(folder) == pytest.approx(want.metrics, nan_ok=True, rel=0, abs=0), job.name
        assert (folder / "scores.csv").read_text() == (tmp_path / "seq" / job.name / "scores.csv").read_text()
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    means = [r for r in rows if r["category"] == "mean" and r["metric"] == "image_auroc"]
    assert {(r["method"], r["shots"]) for r in means} == {(m, k) for m in ("dictas", "inctrlv2") for k in ("1", "2")}
    brick = [r for r in rows if (r["method"], r["shots"], r["category"], r["metric"]) ==
             ("dictas", "1", "brick", "pixel_auroc")][0]
    vals = [_metrics(SweepJob("dictas", "demo", str(data), "brick", 1, s).folder(out))["pixel_auroc"] for s in (0, 1)]
    assert float(brick["mean"]) == pytest.approx(sum(vals) / 2, abs=1e-6) and brick["seeds"] == "2"
    md = (out / "summary.md").read_text()
    assert "## demo, 2-shot: image_auroc" in md and "16 run now" in md and "0 failed" in md
    assert (out / "summary.png").stat().st_size > 0

    # rerun: every job folder exists, so nothing is submitted (a job would fail here)
    result = sweep(["dictas", "inctrlv2"], [data], out, shots=[1, 2], seeds=[0, 1], progress=False,
                   job_fn=_must_not_run)
    assert [r["status"] for r in result.records] == ["skipped"] * 16
    assert "16 done by an earlier run (skipped)" in (out / "summary.md").read_text()


def _must_not_run(job, out, options):
    raise AssertionError(f"{job.name} ran again")


def _flaky(job: SweepJob, out: str, options: JobOptions) -> dict:
    """seed 0: fails on its first attempt only; seed 1: always fails."""
    marker = Path(out).parent / f"attempted-{job.seed}"
    if job.seed == 1 or not marker.exists():
        marker.touch()
        raise RuntimeError(f"injected failure of {job.name}")
    return run_job(job, out, options)


def _dies_once(job: SweepJob, out: str, options: JobOptions) -> dict:
    marker = Path(out).parent / f"died-{job.seed}"
    if not marker.exists():
        marker.touch()
        os._exit(1)  # the worker process dies mid-task
    return run_job(job, out, options)


def test_failed_job_is_retried_then_reported(ray_local, data, tmp_path):
    opts = JobOptions(config={"dictas": TINY}, cache_dir=None, overlays=False)
    result = sweep(["dictas"], [data], tmp_path / "out", categories=["brick"], shots=[1], seeds=[0, 1],
                   options=opts, max_retries=1, progress=False, job_fn=_flaky)
    status = {r["job"]["seed"]: r for r in result.records}
    assert status[0]["status"] == "done"  # failed once, retried
    assert status[1]["status"] == "failed" and "RuntimeError: injected failure of dictas/demo/brick/shots1/seed1" \
        in status[1]["error"]
    assert not SweepJob("dictas", "demo", str(data), "brick", 1, 1).folder(tmp_path / "out").exists()
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "1 failed" in md and "injected failure" in md and "## demo, 1-shot: image_auroc" in md


def test_killed_worker_loses_no_results(ray_local, data, tmp_path):
    opts = JobOptions(config={"inctrlv2": TINY}, cache_dir=str(tmp_path / "cache"), overlays=False)
    result = sweep(["inctrlv2"], [data], tmp_path / "out", categories=["grass"], shots=[1], seeds=[0, 1],
                   options=opts, max_retries=2, progress=False, job_fn=_dies_once)
    assert [r["status"] for r in result.records] == ["done", "done"]
    assert (tmp_path / "died-0").exists() and (tmp_path / "died-1").exists()
    # the test images of both seeds went through one node-local cache: encoded once
    n_test = 1 + len(synthetic.DEFECTS)
    assert 1 + n_test <= len(list((tmp_path / "cache").rglob("*.pt"))) <= 2 + n_test
    for r in result.records:
        assert _metrics(SweepJob(**r["job"]).folder(tmp_path / "out")) == r["metrics"]


def test_user_errors(data, tmp_path, capsys):
    with pytest.raises(ValueError, match="--categories"):
        plan_jobs(["dictas"], [data], ["nope"], [1], [0])
    with pytest.raises(ValueError, match="unknown method"):
        plan_jobs(["patchcore"], [data], None, [1], [0])
    with pytest.raises(ValueError, match="share a name"):
        plan_jobs(["dictas"], [data, data], None, [1], [0])
    assert parse_method_options(["dictas.image_size=32", "layers=(1, 2)"], [], ["dictas", "inctrlv2"])[0] == \
        {"dictas": {"image_size": 32, "layers": (1, 2)}, "inctrlv2": {"layers": (1, 2)}}
    rc = cli.main(["sweep", "--methods", "dictas", "--data", str(data), "--out", str(tmp_path),
                   "--checkpoint", "dictas=/missing.pt"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("fastad sweep: error:") and "/missing.pt" in err and len(err.splitlines()) == 1
