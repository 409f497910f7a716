"""The ``fastad`` command line: ``demo``, ``demo-data``, ``bench`` and ``evaluate``."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def _cmd_demo_data(args: argparse.Namespace) -> int:
    from fastad.data.synthetic import make_demo_dataset

    root = make_demo_dataset(args.dir, seed=args.seed)
    print(f"wrote the synthetic MVTec-layout dataset to {root}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from fastad.demo import format_report, run_demo

    report = run_demo(args.data, shots=args.shots, seed=args.seed, backend=args.backend,
                      progress=not args.no_progress)
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


def _benchmarks_dir() -> Path:
    here = Path(__file__).resolve().parent.parent / "benchmarks"
    if not (here / "conftest.py").is_file():
        raise SystemExit("fastad bench runs the benchmark suite of a source checkout (benchmarks/ next to fastad/); "
                         f"{here} was not found")
    return here


def _cmd_bench(args: argparse.Namespace) -> int:
    bench_dir = _benchmarks_dir()
    out = Path(args.out)
    (out / "json").mkdir(parents=True, exist_ok=True)
    suites = sorted(bench_dir.glob("bench_*.py"))
    if args.suite:
        suites = [p for p in suites if any(s in p.stem for s in args.suite)]
        if not suites:
            raise SystemExit(f"no benchmark suite matches {args.suite} in {bench_dir}")
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
        print("no benchmark results were written", file=sys.stderr)
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


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from fastad.evaluate import EvaluationError, build_runner, evaluate, format_result, parse_overrides

    try:
        runner = build_runner(args.method, args.category, checkpoint=args.checkpoint, backbone=args.backbone,
                              config=parse_overrides(args.config), device=args.device, backend=args.backend,
                              dataset=args.dataset, proposer_config=args.proposer_config,
                              proposer_checkpoint=args.proposer_checkpoint, sam_checkpoint=args.sam_checkpoint,
                              sam_type=args.sam_type)
        result = evaluate(runner, args.data, args.category, args.out, shots=args.shots, seed=args.seed,
                          references=args.references, layout=args.layout, batch_size=args.batch_size,
                          overlays=not args.no_overlays, progress=not args.no_progress, method=args.method,
                          device=args.device)
    except EvaluationError as exc:
        print(f"fastad evaluate: error: {exc}", file=sys.stderr)
        return 2
    print(format_result(result))
    print(f"\nwrote metrics.json, metrics.csv, scores.csv{'' if args.no_overlays else ' and maps/'} in {args.out}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from fastad.evaluate import parse_overrides
    from fastad.train import train

    try:
        train(args.method, args.data, args.out, layout=args.layout,
              categories=[c for c in args.categories.split(",") if c] if args.categories else None,
              shots=args.shots, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
              device=args.device, backbone=args.backbone, config=parse_overrides(args.config),
              protocol=parse_overrides(args.protocol), steps_per_epoch=args.steps_per_epoch, resume=args.resume,
              progress=not args.no_progress, cache_dir=args.cache_dir, use_cache=not args.no_cache,
              backend=args.backend)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:  # EvaluationError is a ValueError
        print(f"fastad train: error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(prog="fastad", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo-data", help="write the synthetic MVTec-layout demo dataset")
    p.add_argument("dir", nargs="?", default="demo-data")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_cmd_demo_data)

    p = sub.add_parser("demo", help="few-shot detection end to end on the demo data (makes it if missing)")
    p.add_argument("--data", default="demo-data")
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default=None, help="force a fastad backend (reference, cpu, triton)")
    p.add_argument("--json", default=None, help="also write the report as JSON")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=_cmd_demo)

    p = sub.add_parser("bench", help="run the benchmark suite and write a side-by-side table and plots")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes, a few minutes on 2 CPU cores (default)")
    size.add_argument("--full", action="store_true", help="the papers' sizes")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="bench-out")
    p.add_argument("-k", default=None, help="pytest -k expression to select benchmarks")
    p.add_argument("--suite", action="append", default=[],
                   help="run only the suites whose file name contains this (repeatable), e.g. nn_distance")
    p.set_defaults(fn=_cmd_bench)

    p = sub.add_parser("evaluate", help="run a reference model on one category of an MVTec AD / VisA folder")
    p.add_argument("--method", required=True, choices=("inctrlv2", "dictas", "saa_plus", "icas"))
    p.add_argument("--data", required=True, help="dataset root (MVTec AD layout, or VisA with split_csv/1cls.csv)")
    p.add_argument("--category", required=True)
    p.add_argument("--layout", default="auto", choices=("auto", "mvtec", "visa"))
    p.add_argument("--shots", type=int, default=4, help="normal reference images (ignored by zero-shot saa_plus)")
    p.add_argument("--seed", type=int, default=0, help="seed of the reference draw")
    p.add_argument("--references", default=None, help="file listing the reference images, one per line")
    p.add_argument("--checkpoint", default=None, help="the method's trained weights")
    p.add_argument("--backbone", default=None,
                   help="backbone weights: CLIP (inctrlv2, dictas), DINOv2 (icas), WideResNet-50-2 (saa_plus)")
    p.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                   help="model constructor override, repeatable (e.g. image_size=240; inctrlv2: preset=v1)")
    p.add_argument("--dataset", default="mvtec", help="saa_plus: prompt table (mvtec, visa, ksdd2, mtd)")
    p.add_argument("--proposer-config", default=None, help="saa_plus: GroundingDINO config file")
    p.add_argument("--proposer-checkpoint", default=None, help="saa_plus: GroundingDINO weights")
    p.add_argument("--sam-checkpoint", default=None, help="saa_plus: SAM weights (default: boxes as masks)")
    p.add_argument("--sam-type", default="vit_h")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="fastad", choices=("fastad", "reference"))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default="evaluate-out")
    p.add_argument("--no-overlays", action="store_true", help="skip the PNG overlays")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=_cmd_evaluate)

    p = sub.add_parser("train", help="train InCTRL / InCTRLv2, DictAS or iCAS on an MVTec AD / VisA folder "
                                     "(torchrun --nproc_per_node N -m fastad.cli train ... for data parallel)")
    p.add_argument("--method", required=True, choices=("inctrlv2", "dictas", "icas"),
                   help="inctrlv2 (InCTRL v1 with --config preset=v1), dictas or icas")
    p.add_argument("--data", required=True, help="auxiliary dataset root (MVTec AD layout, or VisA split_csv)")
    p.add_argument("--layout", default="auto", choices=("auto", "mvtec", "visa"))
    p.add_argument("--categories", default=None, help="comma-separated categories (default: all)")
    p.add_argument("--out", required=True, help="output folder (checkpoints, config.json, losses.csv/png)")
    p.add_argument("--shots", type=int, default=None, help="references per query (default: the protocol's)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="global batch size (over all processes)")
    p.add_argument("--steps-per-epoch", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backbone", default=None, help="frozen backbone weights: CLIP (inctrlv2, dictas), DINOv2 (icas)")
    p.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                   help="model constructor override, as fastad evaluate --config (repeatable)")
    p.add_argument("--protocol", action="append", default=[], metavar="KEY=VALUE",
                   help="training protocol override (fastad.train.Protocol field), repeatable")
    p.add_argument("--backend", default="fastad", choices=("fastad", "reference"))
    p.add_argument("--cache-dir", default=None, help="frozen-feature cache (default ~/.cache/fastad/features)")
    p.add_argument("--no-cache", action="store_true", help="re-encode every image at every step")
    p.add_argument("--resume", action="store_true", help="continue OUT/checkpoint.pt")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=_cmd_train)

    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    raise SystemExit(main())
