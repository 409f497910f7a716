"""``fastad sweep``: the papers' grids (methods x datasets x categories x shots x seeds) as
one Ray task per job, each running ``fastad.evaluate.evaluate`` unchanged.

Every job writes ``out/<method>/<dataset>/<category>/shots<K>/seed<S>/`` (today's
metrics.json, metrics.csv, scores.csv, maps/) in one atomic rename, so a folder that exists
is complete and a rerun skips it. Failed jobs are retried by Ray (``max_retries``, also after
a worker or node dies) and then listed with their error in ``summary.md``; they never stop
the other jobs. Frozen-backbone features go through a node-local ``FeatureCache`` so jobs
that differ only in shots or seed encode each image once per node.
"""
from __future__ import annotations

import csv
import itertools
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from fastad._io import atomic_write
from fastad.evaluate import METHODS, parse_overrides

__all__ = ["SweepJob", "JobOptions", "SweepResult", "plan_jobs", "run_job", "sweep", "write_summary",
           "parse_method_options"]

PLOT_METRICS = ("image_auroc", "pixel_auroc", "aupro")


@dataclass(frozen=True)
class SweepJob:
    """One evaluation: ``method`` on ``category`` of the dataset at ``data`` (named ``dataset``)."""

    method: str
    dataset: str
    data: str
    category: str
    shots: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}/{self.dataset}/{self.category}/shots{self.shots}/seed{self.seed}"

    def folder(self, out: str | Path) -> Path:
        return Path(out) / self.name


@dataclass
class JobOptions:
    """What every job of a sweep shares. ``config`` / ``checkpoints`` / ``backbones`` (frozen
    backbone weights): per method.
    ``init_seed`` seeds torch before each model is built, so parts without trained weights
    (tiny test configs, heads without a checkpoint) are the same in every job."""

    config: dict[str, dict[str, Any]] = field(default_factory=dict)
    checkpoints: dict[str, str] = field(default_factory=dict)
    backbones: dict[str, str] = field(default_factory=dict)
    cache_dir: str | None = "~/.cache/fastad/features"
    batch_size: int = 8
    overlays: bool = True
    init_seed: int = 0


@dataclass
class SweepResult:
    """Every job's record (``status``: "done", "skipped" (done by an earlier run) or "failed",
    ``seconds``, ``error``, ``metrics``), the wall time and the files written."""

    records: list[dict[str, Any]]
    seconds: float
    files: list[Path]

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r["status"] == "failed"]


# --------------------------------------------------------------------------- options
def parse_method_options(config: Sequence[str], checkpoints: Sequence[str], methods: Sequence[str],
                         option: str = "--checkpoint") -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """``--config METHOD.KEY=VALUE`` (``KEY=VALUE``: every method) and ``--checkpoint METHOD=PATH``
    (or another ``option`` of that form) -> ({method: overrides}, {method: path})."""
    per: dict[str, dict[str, Any]] = {m: {} for m in methods}
    for item in config:
        key, sep, value = item.partition("=")
        prefix, dot, rest = key.partition(".")
        targets = [prefix] if dot and prefix in METHODS else list(methods)
        if dot and prefix in METHODS and prefix not in methods:
            raise ValueError(f"--config {item}: method {prefix!r} is not in --methods {','.join(methods)}")
        parsed = parse_overrides([f"{rest if dot and prefix in METHODS else key}{sep}{value}"])
        for m in targets:
            per[m].update(parsed)
    ckpts: dict[str, str] = {}
    for item in checkpoints:
        method, sep, path = item.partition("=")
        if not sep or method not in methods:
            raise ValueError(f"{option} expects METHOD=PATH with METHOD in --methods "
                             f"{','.join(methods)}, got {item!r}")
        if not Path(path).is_file():
            raise FileNotFoundError(f"{option} {item}: file {path} does not exist")
        ckpts[method] = str(Path(path).resolve())
    return per, ckpts


def dataset_categories(root: str | Path) -> list[str]:
    """The categories of an MVTec-layout folder, or of a VisA folder (``split_csv/1cls.csv``)."""
    from fastad.data.mvtec import mvtec_categories

    root = Path(root)
    visa_csv = root / "split_csv" / "1cls.csv"
    if visa_csv.is_file():
        with open(visa_csv, newline="") as f:
            return sorted({row["object"] for row in csv.DictReader(f) if row.get("object")})
    return mvtec_categories(root)


def plan_jobs(methods: Sequence[str], data: Sequence[str | Path], categories: Sequence[str] | None,
              shots: Sequence[int], seeds: Sequence[int]) -> list[SweepJob]:
    """Every (method, dataset, category, shots, seed); ``categories=None``: all of each dataset."""
    for name, values in (("--methods", methods), ("--data", data), ("--shots", shots), ("--seeds", seeds)):
        if not values:
            raise ValueError(f"{name} is empty")
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"--methods: unknown method {m!r}; expected some of {','.join(METHODS)}")
    if any(k < 1 for k in shots):
        raise ValueError(f"--shots must all be >= 1, got {list(shots)}")
    roots = [Path(d).resolve() for d in data]
    names = [r.name for r in roots]
    if len(set(names)) != len(names):
        raise ValueError(f"--data: two dataset folders share a name ({names}); the output layout "
                         "out/<method>/<dataset>/... needs distinct folder names")
    jobs = []
    for root in roots:
        if not root.is_dir():
            raise FileNotFoundError(f"--data {root}: dataset folder does not exist")
        found = dataset_categories(root)
        cats = found if categories is None else list(categories)
        missing = [c for c in cats if c not in found]
        if missing or not cats:
            raise ValueError(f"--categories: {missing or 'none'} not in {root} (it has {','.join(found) or 'none'})")
        for m, c, k, s in itertools.product(methods, cats, shots, seeds):
            jobs.append(SweepJob(m, root.name, str(root), c, int(k), int(s)))
    return jobs


# --------------------------------------------------------------------------- one job
def _clip_cache_key(runner: Any) -> dict[str, Any]:
    from fastad.feature_cache import weights_digest

    model = runner.model
    return {"backbone": model.backbone.name, "weights": weights_digest(model.backbone),
            "image_size": runner.size, "layers": list(model.layers), "normalisation": "openai-clip"}


def _read_record(job: SweepJob, folder: Path, status: str, seconds: float | None = None) -> dict[str, Any]:
    report = json.loads((folder / "metrics.json").read_text())
    if seconds is None:  # done by an earlier run: the sum of its stage times
        seconds = sum(v["seconds"] for v in report.get("stages", {}).values())
    return {"job": asdict(job), "status": status, "seconds": float(seconds), "error": None,
            "metrics": report["metrics"]}


def run_job(job: SweepJob, out: str, options: JobOptions) -> dict[str, Any]:
    """Evaluate one job into its folder (atomically) and return its record; a folder that
    already exists (an earlier attempt finished) is read back instead."""
    import torch

    from fastad._io import atomic_dir
    from fastad.distributed._ray import task_device
    from fastad.evaluate import CLIPRunner, build_runner, evaluate
    from fastad.feature_cache import FeatureCache

    folder = job.folder(out)
    if (folder / "metrics.json").is_file():
        return _read_record(job, folder, "skipped")
    t0 = time.perf_counter()
    device = task_device()
    torch.manual_seed(options.init_seed)
    runner = build_runner(job.method, job.category, checkpoint=options.checkpoints.get(job.method),
                          backbone=options.backbones.get(job.method), config=options.config.get(job.method, {}),
                          device=device)
    if options.cache_dir is not None and isinstance(runner, CLIPRunner):
        runner.feature_cache = FeatureCache(Path(options.cache_dir).expanduser(), _clip_cache_key(runner))
    ckpt, weights = options.checkpoints.get(job.method), options.backbones.get(job.method)
    recorded = {"checkpoint": ckpt, "backbone_weights": weights, "config": options.config.get(job.method, {}),
                "backend": "fastad", "random_weights": ckpt is None and weights is None}
    try:
        with atomic_dir(folder) as tmp:
            evaluate(runner, job.data, job.category, tmp, shots=job.shots, seed=job.seed, batch_size=options.batch_size,
                     overlays=options.overlays, progress=False, method=job.method, device=device, options=recorded)
    except FileExistsError:  # a concurrent attempt of the same job won the rename
        pass
    return _read_record(job, folder, "done", time.perf_counter() - t0)


def _error_line(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)  # ray.exceptions.RayTaskError wraps the task's exception
    err = cause if isinstance(cause, BaseException) else exc
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


# --------------------------------------------------------------------------- the sweep
def sweep(methods: Sequence[str], data: Sequence[str | Path], out: str | Path, *,
          categories: Sequence[str] | None = None, shots: Sequence[int] = (1, 2, 4), seeds: Sequence[int] = (0, 1, 2),
          options: JobOptions | None = None, address: str | None = None, gpus_per_task: float | None = None,
          cpus_per_task: float = 1, max_retries: int = 2, progress: bool = True,
          job_fn: Callable[[SweepJob, str, JobOptions], dict[str, Any]] = run_job) -> SweepResult:
    """Run every job of the grid as a Ray task and write the summary under ``out``.

    ``address``: None = an embedded local Ray (started and stopped here), else ``"auto"`` or
    ``"ray://host:port"``; an already-initialised Ray is used as it is. ``gpus_per_task``:
    default 1 when the cluster has GPUs (fractions share a GPU), else the jobs run on CPUs.
    ``job_fn`` runs one job inside the task (tests inject failures through it)."""
    from tqdm.auto import tqdm

    from fastad.distributed._ray import cluster_has_gpus, ray_session

    options = options or JobOptions()
    if cpus_per_task <= 0 or (gpus_per_task is not None and gpus_per_task < 0) or max_retries < 0:
        raise ValueError(f"--cpus-per-task must be > 0, --gpus-per-task and max_retries >= 0; got "
                         f"{cpus_per_task}, {gpus_per_task}, {max_retries}")
    jobs = plan_jobs(methods, data, categories, shots, seeds)
    out = Path(out).resolve()
    t0 = time.perf_counter()
    records: dict[SweepJob, dict[str, Any]] = {}
    for job in jobs:
        if (job.folder(out) / "metrics.json").is_file():
            records[job] = _read_record(job, job.folder(out), "skipped")
    todo = [j for j in jobs if j not in records]
    bar = tqdm(total=len(jobs), initial=len(records), desc="sweep", unit="job", disable=not progress)
    if todo:
        with ray_session(address) as ray:
            gpus = gpus_per_task if gpus_per_task is not None else 1.0
            if not cluster_has_gpus(ray):
                if gpus_per_task:
                    warnings.warn(f"--gpus-per-task {gpus_per_task}: the Ray cluster has no GPUs; running on CPUs")
                gpus = 0.0
            task = ray.remote(job_fn).options(num_cpus=cpus_per_task, num_gpus=gpus, max_retries=max_retries,
                                              retry_exceptions=True)
            pending = {task.remote(job, str(out), options): job for job in todo}
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    job = pending.pop(ref)
                    try:
                        records[job] = ray.get(ref)
                    except Exception as exc:  # the job's error after its retries, or a lost worker
                        records[job] = {"job": asdict(job), "status": "failed", "seconds": math.nan,
                                        "error": _error_line(exc), "metrics": {}}
                    bar.update(1)
    bar.close()
    ordered = [records[j] for j in jobs]
    seconds = time.perf_counter() - t0
    return SweepResult(ordered, seconds, write_summary(out, ordered, seconds))


# --------------------------------------------------------------------------- the summary
def _mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def summarize(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows (method, dataset, shots, category or "mean", metric, mean, std, seeds): mean and
    sample std over seeds; "mean" averages the categories per seed first (seeds where a
    category failed are left out of it)."""
    ok = [r for r in records if r["status"] != "failed"]
    groups: dict[tuple, dict[str, dict[int, dict[str, float]]]] = {}
    cats_of: dict[tuple, set[str]] = {}
    for r in records:
        j = r["job"]
        cats_of.setdefault((j["method"], j["dataset"], j["shots"]), set()).add(j["category"])
    for r in ok:
        j = r["job"]
        groups.setdefault((j["method"], j["dataset"], j["shots"]), {}).setdefault(j["category"], {})[j["seed"]] = \
            r["metrics"]
    rows = []
    for (method, dataset, shots), by_cat in sorted(groups.items()):
        metric_names = list(next(iter(next(iter(by_cat.values())).values())))
        all_cats = sorted(cats_of[(method, dataset, shots)])
        complete_seeds = sorted(set.intersection(*(set(by_cat.get(c, {})) for c in all_cats)))
        for metric in metric_names:
            for cat in sorted(by_cat):
                vals = [by_cat[cat][s][metric] for s in sorted(by_cat[cat])]
                mean, std = _mean_std(vals)
                rows.append({"method": method, "dataset": dataset, "shots": shots, "category": cat,
                             "metric": metric, "mean": mean, "std": std, "seeds": len(vals)})
            if complete_seeds:
                per_seed = [float(np.mean([by_cat[c][s][metric] for c in all_cats])) for s in complete_seeds]
                mean, std = _mean_std(per_seed)
                rows.append({"method": method, "dataset": dataset, "shots": shots, "category": "mean",
                             "metric": metric, "mean": mean, "std": std, "seeds": len(per_seed)})
    return rows


def _markdown(records: Sequence[dict[str, Any]], rows: list[dict[str, Any]], seconds: float) -> str:
    status = {s: sum(r["status"] == s for r in records) for s in ("done", "skipped", "failed")}
    job_seconds = sum(r["seconds"] for r in records if r["status"] == "done")
    lines = ["# fastad sweep", "",
             f"{len(records)} jobs: {status['done']} run now, {status['skipped']} done by an earlier run (skipped), "
             f"{status['failed']} failed. Wall time {seconds:.1f} s; the jobs run now took {job_seconds:.1f} s "
             "together.", "",
             "Cells: mean ± sample std over seeds; **mean**: the categories averaged per seed, then over seeds.", ""]
    cell = {(r["method"], r["dataset"], r["shots"], r["category"], r["metric"]): r for r in rows}
    methods = sorted({r["method"] for r in rows})
    for dataset, shots, metric in sorted({(r["dataset"], r["shots"], r["metric"]) for r in rows},
                                         key=lambda t: (t[0], t[1], [r["metric"] for r in rows].index(t[2]))):
        cats = sorted({r["category"] for r in rows if r["dataset"] == dataset and r["category"] != "mean"})
        lines += [f"## {dataset}, {shots}-shot: {metric}", "", "| category | " + " | ".join(methods) + " |",
                  "|---|" + "---:|" * len(methods)]
        for cat in cats + ["mean"]:
            vals = []
            for m in methods:
                r = cell.get((m, dataset, shots, cat, metric))
                vals.append("—" if r is None else f"{r['mean']:.4f} ± {r['std']:.4f}")
            label = "**mean**" if cat == "mean" else cat
            lines.append(f"| {label} | " + " | ".join(vals) + " |")
        lines.append("")
    lines += ["## Jobs", "", "| job | status | seconds | error |", "|---|---|---:|---|"]
    for r in records:
        name = SweepJob(**r["job"]).name
        err = (r["error"] or "").replace("|", "\\|")
        lines.append(f"| {name} | {r['status']} | {r['seconds']:.2f} | {err} |")
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict[str, Any]], path: Path) -> bool:
    import matplotlib


    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = [r for r in rows if r["category"] == "mean" and r["metric"] in PLOT_METRICS]
    datasets = sorted({r["dataset"] for r in means})
    metrics = [m for m in PLOT_METRICS if any(r["metric"] == m for r in means)]
    if not means:
        return False
    fig, axes = plt.subplots(len(datasets), len(metrics), figsize=(4 * len(metrics), 3.2 * len(datasets)),
                             squeeze=False)
    for i, ds in enumerate(datasets):
        for k, metric in enumerate(metrics):
            ax = axes[i][k]
            for method in sorted({r["method"] for r in means}):
                pts = sorted((r["shots"], r["mean"], r["std"]) for r in means
                             if (r["dataset"], r["metric"], r["method"]) == (ds, metric, method))
                if pts:
                    x, y, e = zip(*pts)
                    ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=method)
            ax.set_title(f"{ds}: {metric}")
            ax.set_xlabel("shots")
            ax.set_xticks(sorted({r["shots"] for r in means}))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return True


def write_summary(out: str | Path, records: Sequence[dict[str, Any]], seconds: float) -> list[Path]:
    """``summary.md``, ``summary.csv`` (one row per method, dataset, shots, category, metric),
    ``jobs.csv`` (status, seconds, error per job) and ``summary.png`` (metric vs shots)."""

    out = Path(out)
    rows = summarize(records)
    with atomic_write(out / "summary.md", "w") as f:
        f.write(_markdown(records, rows, seconds))
    with atomic_write(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["method", "dataset", "shots", "category", "metric", "mean", "std", "seeds"])
        w.writeheader()
        w.writerows({**r, "mean": f"{r['mean']:.6f}", "std": f"{r['std']:.6f}"} for r in rows)
    with atomic_write(out / "jobs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "dataset", "category", "shots", "seed", "status", "seconds", "error"])
        for r in records:
            j = r["job"]
            w.writerow([j["method"], j["dataset"], j["category"], j["shots"], j["seed"], r["status"],
                        f"{r['seconds']:.3f}", r["error"] or ""])
    files = [out / "summary.md", out / "summary.csv", out / "jobs.csv"]
    if _plot(rows, out / "summary.png"):
        files.append(out / "summary.png")
    return files


def format_result(result: SweepResult) -> str:
    """A few lines for the terminal."""
    n_failed = len(result.failed)
    lines = [f"fastad sweep: {len(result.records)} jobs in {result.seconds:.1f} s, {n_failed} failed"]
    lines += [f"  failed: {SweepJob(**r['job']).name}: {r['error']}" for r in result.failed]
    lines.append("wrote " + ", ".join(str(p) for p in result.files))
    return "\n".join(lines)
