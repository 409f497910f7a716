"""The ``fastad sweep`` and ``fastad score`` parsers and commands (Ray is imported only when
one of them runs)."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from fastad.evaluate import METHODS


def _csv(kind: type) -> Any:
    def parse(text: str) -> list:
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}")
    return parse


def _address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None,
                   help="Ray cluster: 'auto' (the cluster this node joined with `ray start`) or ray://host:10001; "
                        "default: an embedded local Ray started for this command")


def add_sweep_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("sweep", help="evaluate methods x datasets x categories x shots x seeds as Ray tasks")
    p.add_argument("--methods", required=True, type=_csv(str), help=f"comma-separated, of {','.join(METHODS)}")
    p.add_argument("--data", required=True, action="append", help="dataset root (MVTec / VisA layout), repeatable")
    p.add_argument("--categories", default="all", help="'all' (each dataset's categories) or a,b,c")
    p.add_argument("--shots", type=_csv(int), default=[1, 2, 4], help="shot counts, e.g. 1,2,4 (default)")
    p.add_argument("--seeds", type=_csv(int), default=[0, 1, 2], help="seeds of the reference draws (default 0,1,2)")
    p.add_argument("--out", required=True, help="output folder (on a cluster: a path every node can write)")
    _address(p)
    p.add_argument("--gpus-per-task", type=float, default=None,
                   help="GPUs per job, fractions share a GPU (default: 1 when the cluster has GPUs, else CPU jobs)")
    p.add_argument("--cpus-per-task", type=float, default=1, help="CPUs per job (default 1; also its torch threads)")
    p.add_argument("--max-retries", type=int, default=2, help="retries of a failed job (also after a lost worker)")
    p.add_argument("--config", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="model constructor override for one method (KEY=VALUE: every method), repeatable")
    p.add_argument("--checkpoint", action="append", default=[], metavar="METHOD=PATH", help="a method's weights")
    p.add_argument("--backbone-weights", action="append", default=[], metavar="METHOD=PATH",
                   help="a method's frozen backbone weights file (CLIP, DINOv2)")
    p.add_argument("--cache-dir", default="~/.cache/fastad/features",
                   help="node-local cache of backbone features (CLIP methods)")
    p.add_argument("--no-cache", action="store_true", help="encode every image in every job")
    p.add_argument("--batch-size", type=int, default=8, help="test images per forward pass")
    p.add_argument("--no-overlays", action="store_true", help="skip the PNG overlays")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def add_score_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("score", help="score many images with a Ray Data pipeline over an actor pool")
    p.add_argument("--method", required=True, choices=("inctrlv2", "dictas", "icas"), help="the few-shot method")
    p.add_argument("--checkpoint", default=None, help="the method's trained weights")
    p.add_argument("--backbone-weights", default=None, metavar="PATH",
                   help="the frozen backbone's weights file (CLIP, DINOv2)")
    p.add_argument("--references", required=True, help="folder or list file of the normal reference images")
    p.add_argument("--images", required=True, help="glob pattern (quote it), folder or list file of the images")
    p.add_argument("--out", required=True, help="results folder: scores.parquet and maps/")
    p.add_argument("--category", default="object", help="class name used in the text prompts")
    _address(p)
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    p.add_argument("--actors", type=int, default=1, help="model replicas (Ray actors)")
    p.add_argument("--gpus-per-actor", type=float, default=None,
                   help="default: 1 when the cluster has GPUs, else CPU actors")
    p.add_argument("--cpus-per-actor", type=float, default=1, help="CPUs per actor (default 1)")
    p.add_argument("--threshold", type=float, default=0.5, help="score at or above which an image is anomalous")
    p.add_argument("--map-range", type=_csv(float), default=[0.0, 1.0], metavar="LO,HI",
                   help="map values drawn as the coldest / hottest overlay colour")
    p.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                   help="model constructor override, repeatable")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def run_sweep(args: argparse.Namespace) -> int:
    from fastad.distributed.sweep import JobOptions, format_result, parse_method_options, sweep

    config, checkpoints = parse_method_options(args.config, args.checkpoint, args.methods)
    backbones = parse_method_options([], args.backbone_weights, args.methods, "--backbone-weights")[1]
    options = JobOptions(config=config, checkpoints=checkpoints, backbones=backbones,
                         cache_dir=None if args.no_cache else args.cache_dir,
                         batch_size=args.batch_size, overlays=not args.no_overlays)
    for m in args.methods:
        if m not in checkpoints and m not in backbones:
            print(f"fastad sweep: warning: neither --backbone-weights nor --checkpoint given for {m}: it runs with "
                  "RANDOM weights and its metrics say nothing about the method", file=sys.stderr)
    categories = None if args.categories == "all" else [c for c in args.categories.split(",") if c]
    result = sweep(args.methods, args.data, args.out, categories=categories, shots=args.shots, seeds=args.seeds,
                   options=options, address=args.address, gpus_per_task=args.gpus_per_task,
                   cpus_per_task=args.cpus_per_task, max_retries=args.max_retries, progress=not args.no_progress)
    print(format_result(result))
    return 1 if result.failed else 0


def run_score(args: argparse.Namespace) -> int:
    from fastad.distributed.score import ScoreSpec, score
    from fastad.evaluate import parse_overrides

    if len(args.map_range) != 2:
        raise ValueError(f"--map-range expects LO,HI, got {args.map_range}")
    spec = ScoreSpec(args.method, references=args.references, category=args.category, checkpoint=args.checkpoint,
                     backbone=args.backbone_weights, config=parse_overrides(args.config))
    table = score(spec, args.images, args.out, address=args.address, batch_size=args.batch_size, actors=args.actors,
                  gpus_per_actor=args.gpus_per_actor, cpus_per_actor=args.cpus_per_actor, threshold=args.threshold,
                  map_range=tuple(args.map_range), progress=not args.no_progress)
    print(f"fastad score: wrote {table} and the maps in {table.parent / 'maps'}")
    return 0
