"""``fastad train``: train the heads of InCTRL / InCTRLv2, DictAS and iCAS on an auxiliary
MVTec AD (or VisA split-CSV) folder, following each paper's protocol, with cached frozen-
backbone features, exact resume and data-parallel training under ``torchrun``.

Protocols (``Protocol`` fields; every default below can be overridden, and is recorded in
``config.json``). [code]: the authors' released code; [paper]; [choice]: not fixed by either.

* InCTRL v1 (``--method inctrlv2 --config preset=v1``) [code, mala-lab/InCTRL]: AdamW lr 1e-3,
  weight decay 0.01; 10 epochs x 100 steps x batch 16; every batch balanced 8 normal + 8
  anomalous queries (``BalancedBatchSampler``) drawn from the auxiliary set's normal pool
  (train/good + test/good) and its anomalous test images; for every query, ``shots`` = 2
  normals of its category drawn at random from that pool (the query itself excluded [choice]).
  Loss: focal(final score) + focal(s_i) (``InCTRLv2.compute_losses``).
* InCTRLv2 [paper]: Adam lr 1e-3, 10 epochs, batch 48. Each batch: half DASL images from the
  auxiliary test split (normal + anomalous, masks) and half OASL images from its train split
  (normal only) [choice: the paper gives the two sources, not their mix]; L_DASL on the former,
  L_OASL on the latter (``compute_losses(..., oasl=...)``); 2 references per query as v1 [choice:
  the paper does not give the training shots]; an epoch is one pass over the test split.
* DictAS [code, xiaozhen228/DictAS train.py]: Adam lr 1e-4, betas (0.5, 0.999);
  ReduceLROnPlateau(factor 0.8, patience 2) on the epoch's mean query loss; 30 epochs, batch 24;
  one pass over the auxiliary images per epoch (train + test: normal and anomalous with
  masks); the dictionary of each query is built from a geometric view of the query itself
  (their ``Trans_good``). Losses: query loss + 0.1 CQC + 0.1 TAC (the Global_Feature path),
  per layer and scale (``DictAS.compute_losses``). The authors freeze the value generator
  (then pass the queries through it, and reset the optimiser state) at the first epoch whose
  validation AP on another dataset stops improving; fastad has no validation loop and does it
  at epoch ``freeze_value_generator_epoch`` (default 3) [choice].
  Not the same: the authors synthesise extra anomalies (p = 0.3) by pasting DTD textures;
  no texture source is given here, so the anomalies are the dataset's own anomalous test
  images with their masks (the authors' auxiliary split holds them too); their reference
  augmentation (rot90, rotation by 30-270 degrees, flips, grid / coarse dropout) is replaced
  by the 8 exact dihedral views (rotations by quarter turns and flips; view 0, the query
  itself, is drawn with probability 1/8 where the authors keep it with probability 0.1);
  their EMA copy (decay 0.1) only serves their best-checkpoint selection and is not kept.
* iCAS [paper §3.1, §3.3, §4.2]: AdamW lr 1e-4, weight decay 0.05, batch 32; the
  anomaly-aware stage (5 epochs) on the auxiliary set, from freshly initialised heads. Not the
  same: the generic stage before it (50 epochs on COCO / ADE20K / Objects365 with SAM masks)
  needs data that fastad does not read, and there is no option yet to start the second stage
  from its weights.
  Episodes: each test image of the set is the target once per epoch; an anomalous target
  is prompted with probability ``anomaly_prompting`` (0.5) [choice] by a view of itself with
  its mask (the paper's reference = augmented copy of the target; copy-paste augmentation
  replaced by the dihedral views, view >= 1 [choice]), otherwise (and for normal targets)
  by a random normal training image of its category with an empty mask (normal prompting).
  Loss: ``ICAS.loss`` (Hungarian matching, deep supervision, SINE's weights).

Speed: the backbones are frozen, so each (image, view) is encoded once and its tokens are
cached on disk (``fastad.feature_cache.FeatureCache``, memory-mapped; key: the frozen
weights' digest, image size, layers, preprocessing, view set). Every augmentation above is
one of the 8 dihedral views, so all the variants a schedule draws are cached; the first epoch
encodes what it meets, later epochs (and later runs) read. ``use_cache=False`` re-encodes
every step (the benchmark's baseline).

Data parallel: under ``torchrun`` (WORLD_SIZE > 1) each process takes an equal share of
every global batch (per group: normal / anomalous, DASL / OASL), gradients are averaged by
``DistributedDataParallel``, BatchNorm statistics are taken over the global batch, and the
loss normalisers that count over the batch (DictAS's CQC images, iCAS's matched masks) are
summed over the processes, so the weights equal those of one process with the same global
batch up to float summation order. Dropout (DictAS's generators, p = 0.1) draws its masks
per process: equal in distribution only.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import platform
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from fastad._io import atomic_save, atomic_write
from fastad.data.training import N_VIEWS, TrainingSet, load_training_set, read_view
from fastad.evaluate import StageMeter, build_runner, stage_table
from fastad.feature_cache import FeatureCache, weights_digest

__all__ = ["METHODS", "Protocol", "train", "protocol_defaults"]

METHODS = ("inctrlv2", "dictas", "icas")
DEFAULT_CACHE = Path(os.environ.get("FASTAD_CACHE", "~/.cache/fastad")).expanduser() / "features"


@dataclass
class Protocol:
    """The training schedule of one method (defaults: ``protocol_defaults``).

    Attributes:
        name: "inctrl-v1", "inctrlv2", "dictas" or "icas".
        epochs, batch_size (global, over all processes), lr, weight_decay.
        shots: references per query (InCTRL: normals of its category; DictAS: views of the query).
        steps_per_epoch: steps per epoch; None: one pass over the epoch's query pool.
        freeze_value_generator_epoch: DictAS, the 0-based epoch from which g_V is frozen (None: never).
        plateau_factor, plateau_patience: DictAS's ReduceLROnPlateau.
        anomaly_prompting: iCAS, probability that an anomalous target is prompted by its own view.
    """

    name: str
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    shots: int = 2
    steps_per_epoch: int | None = None
    freeze_value_generator_epoch: int | None = None
    plateau_factor: float = 0.8
    plateau_patience: int = 2
    anomaly_prompting: float = 0.5


def protocol_defaults(method: str, model: nn.Module) -> Protocol:
    """The paper's / authors' schedule for ``method`` with ``model``'s configuration."""
    if method == "inctrlv2":
        cfg = model.config
        if cfg.version == "v1":
            return Protocol("inctrl-v1", epochs=10, batch_size=16, lr=cfg.lr, weight_decay=cfg.weight_decay, shots=2,
                            steps_per_epoch=100)
        return Protocol("inctrlv2", epochs=10, batch_size=48, lr=cfg.lr, weight_decay=cfg.weight_decay, shots=2)
    if method == "dictas":
        return Protocol("dictas", epochs=30, batch_size=24, lr=model.config.lr, shots=1,
                        freeze_value_generator_epoch=3)
    return Protocol("icas", epochs=5, batch_size=32, lr=1e-4, weight_decay=0.05, shots=1)


# --------------------------------------------------------------------------- episodes
@dataclass
class Item:
    """One query of a global batch: image index and view, references (index, view), the
    sharding group, and for iCAS the reference mask's use ("anomaly" or "normal" prompting)."""

    q: int
    refs: list[tuple[int, int]]
    group: str
    qv: int = 0
    prompt: str = ""


def _rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, 17])


def _draw_refs(rng: np.random.Generator, pool: list[int], shots: int, exclude: int, where: str) -> list[tuple[int, int]]:
    cands = [i for i in pool if i != exclude]
    if len(cands) < shots:
        raise ValueError(f"{where}: {shots} reference shots need {shots} other normal images, found {len(cands)}")
    return [(int(i), 0) for i in rng.choice(cands, size=shots, replace=False)]


def make_plan(proto: Protocol, ts: TrainingSet, epoch: int, seed: int) -> list[list[Item]]:
    """The global batches of one epoch, a pure function of (protocol, data, epoch, seed), so
    that a resumed run draws the same batches."""
    rng = _rng(seed, epoch)
    B = proto.batch_size
    normals = {c: ts.select(c, 0) for c in ts.categories}  # train/good + test/good
    cat = lambda i: ts.images[i].category  # noqa: E731
    steps: list[list[Item]] = []
    if proto.name == "inctrl-v1":
        if B % 2:
            raise ValueError(f"--batch-size {B}: InCTRL's balanced batches need an even size")
        pos, neg = ts.select(label=1), ts.select(label=0)
        if not pos:
            raise ValueError(f"{ts.root}: InCTRL trains on anomalous images and the categories "
                             f"{ts.categories} have none (test/<defect> with ground_truth masks)")
        for _ in range(proto.steps_per_epoch or max(1, (len(pos) + len(neg)) // B)):
            items = []
            for group, pool in (("normal", neg), ("anomalous", pos)):
                for i in rng.choice(pool, size=B // 2, replace=len(pool) < B // 2):
                    items.append(Item(int(i), _draw_refs(rng, normals[cat(i)], proto.shots, int(i), cat(i)), group))
            steps.append(items)
        return steps
    if proto.name == "inctrlv2":
        if B % 2:
            raise ValueError(f"--batch-size {B}: InCTRLv2's batches are half DASL, half OASL: use an even size")
        dasl, oasl = ts.select(split="test"), ts.select(split="train")
        n_steps = proto.steps_per_epoch or max(1, len(dasl) // (B // 2))
        d_order = np.concatenate([rng.permutation(dasl) for _ in range(math.ceil(n_steps * B / 2 / len(dasl)))])
        o_order = np.concatenate([rng.permutation(oasl) for _ in range(math.ceil(n_steps * B / 2 / len(oasl)))])
        for s in range(n_steps):
            items = []
            for group, order in (("dasl", d_order), ("oasl", o_order)):
                for i in order[s * B // 2:(s + 1) * B // 2]:
                    items.append(Item(int(i), _draw_refs(rng, normals[cat(i)], proto.shots, int(i), cat(i)), group))
            steps.append(items)
        return steps
    if proto.name == "dictas":
        pool = list(range(len(ts.images)))
        n_steps = proto.steps_per_epoch or max(1, len(pool) // B)
        order = np.concatenate([rng.permutation(pool) for _ in range(math.ceil(n_steps * B / len(pool)))])
        for s in range(n_steps):
            steps.append([Item(int(i), [(int(i), int(v)) for v in rng.integers(0, N_VIEWS, size=proto.shots)], "all")
                          for i in order[s * B:(s + 1) * B]])
        return steps
    targets = ts.select(split="test")
    n_steps = proto.steps_per_epoch or max(1, len(targets) // B)
    order = np.concatenate([rng.permutation(targets) for _ in range(math.ceil(n_steps * B / len(targets)))])
    for s in range(n_steps):
        items = []
        for i in order[s * B:(s + 1) * B]:
            i = int(i)
            if ts.images[i].label == 1 and rng.random() < proto.anomaly_prompting:
                items.append(Item(i, [(i, int(rng.integers(1, N_VIEWS)))], "all", prompt="anomaly"))
            else:
                train_normals = [j for j in ts.select(cat(i), 0, "train") if j != i]
                items.append(Item(i, [(int(rng.choice(train_normals)), 0)], "all", prompt="normal"))
        steps.append(items)
    return steps


def shard(items: Sequence[Item], rank: int, world: int) -> list[Item]:
    """This process's share of a global batch: every ``world``-th item of each group."""
    groups: dict[str, list[Item]] = {}
    for it in items:
        groups.setdefault(it.group, []).append(it)
    out = []
    for name, members in groups.items():
        if len(members) % world:
            raise ValueError(f"--batch-size: the {len(members)} '{name}' queries of a batch do not split evenly over "
                             f"{world} processes")
        out += members[rank::world]
    return out


# --------------------------------------------------------------------------- features
class FeatureSource:
    """Frozen-backbone features of (image index, view) pairs: read from a FeatureCache (each
    pair encoded on first use) or, with ``cache=None``, read and encoded every time."""

    def __init__(self, ts: TrainingSet, size: int, encoder: Callable[[torch.Tensor], Any],
                 cache: FeatureCache | None, device: torch.device) -> None:
        self.ts, self.size, self.encoder, self.cache, self.device = ts, size, encoder, cache, device
        self._masks: dict[tuple[int, int], torch.Tensor] = {}

    def _id(self, key: tuple[int, int]) -> str:
        return f"{self.ts.images[key[0]].path}#view{key[1]}"

    def _read(self, keys: Sequence[tuple[int, int]]) -> torch.Tensor:
        return torch.stack([read_view(self.ts.images[i], self.size, v)[0] for i, v in keys])

    def features(self, keys: Sequence[tuple[int, int]]) -> Any:
        if self.cache is None:
            with torch.no_grad():
                return self.encoder(self._read(keys).to(self.device))
        ids = [self._id(k) for k in keys]
        todo = list(dict.fromkeys(k for k, i in zip(keys, ids) if not self.cache.contains(i)))
        if todo:
            with torch.no_grad():
                self.cache.encode(self.encoder, self._read(todo).to(self.device), ids=[self._id(k) for k in todo])
        return self.cache.load(ids, self.device)

    def masks(self, keys: Sequence[tuple[int, int]]) -> torch.Tensor:
        for k in keys:
            if k not in self._masks:
                self._masks[k] = read_view(self.ts.images[k[0]], self.size, k[1])[1].bool()
        return torch.stack([self._masks[k] for k in keys]).float().to(self.device)


def _frozen_module(method: str, model: nn.Module) -> nn.Module:
    return model.encoder if method == "icas" else model.backbone.clip.visual


# --------------------------------------------------------------------------- distributed
def _dist_env(device: str) -> tuple[int, int, str]:
    """(rank, world size, device) under torchrun; (0, 1, device) otherwise."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; its gradient is the sum of the processes' gradients."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        g = grad.clone()
        dist.all_reduce(g)
        return g


class _GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics span the global batch of all processes
    (SyncBatchNorm runs on GPUs only). Same state-dict keys."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        n = _AllReduceSum.apply(x.new_tensor([float(x.shape[0])]))
        mean = _AllReduceSum.apply(x.sum(0)) / n
        var = _AllReduceSum.apply(((x - mean) ** 2).sum(0)) / n
        with torch.no_grad():
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(m * mean.detach())
            self.running_var.mul_(1 - m).add_(m * var.detach() * n / (n - 1))
            self.num_batches_tracked.add_(1)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


def _global_batchnorm(module: nn.Module) -> None:
    """Switch every BatchNorm1d of ``module`` to global-batch statistics, in place."""
    for m in module.modules():
        if type(m) is nn.BatchNorm1d:
            m.__class__ = _GlobalBatchNorm1d


def _global_count(x: torch.Tensor) -> torch.Tensor:
    """sum over processes / world size: the normaliser that makes averaged gradients equal
    those of the global batch."""
    import torch.distributed as dist

    y = x.detach().float().clone()
    dist.all_reduce(y)
    return y / dist.get_world_size()


class _Step(nn.Module):
    """The loss of one local batch as a module call, for DistributedDataParallel."""

    def __init__(self, model: nn.Module, fn: Callable[..., dict[str, torch.Tensor]]) -> None:
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.fn(self.model, batch)


# --------------------------------------------------------------------------- batches
def _text_prototypes(method: str, model: nn.Module, categories: Sequence[str]) -> dict[str, torch.Tensor]:
    """Per category, the (normal, anomalous) prompt prototypes the method trains with."""
    if method == "icas":
        return {}
    from fastad.models.dictas import dictas_prompts
    from fastad.models.inctrlv2 import inctrl_prompts

    with torch.no_grad():
        if method == "inctrlv2":
            return {c: model.backbone.text_prototypes(*inctrl_prompts(c.replace("_", " "))) for c in categories}
        return {c: model.backbone.text_prototypes(*dictas_prompts(c)) for c in categories}


def _batch(method: str, items: Sequence[Item], src: FeatureSource, ts: TrainingSet,
           text: dict[str, torch.Tensor]) -> dict[str, Any]:
    refs = [r for it in items for r in it.refs]  # query-major
    b: dict[str, Any] = {"q": src.features([(it.q, it.qv) for it in items]), "r": src.features(refs),
                         "labels": torch.tensor([ts.images[it.q].label for it in items], device=src.device),
                         "q_masks": src.masks([(it.q, it.qv) for it in items])}
    if method != "icas":
        b["text"] = torch.stack([text[ts.images[it.q].category] for it in items]).to(src.device)
        b["oasl"] = torch.tensor([it.group == "oasl" for it in items], device=src.device)
    else:
        r_masks = src.masks(refs)
        normal = torch.tensor([it.prompt == "normal" for it in items], device=src.device)
        b["r_masks"] = torch.where(normal[:, None, None], torch.zeros_like(r_masks), r_masks)
    return b


def _loss_fn(method: str, proto: Protocol, world: int) -> Callable[[nn.Module, dict[str, Any]], dict[str, torch.Tensor]]:
    count = _global_count if world > 1 else None
    if method == "inctrlv2":
        v2 = proto.name == "inctrlv2"
        return lambda m, b: m.compute_losses(b["q"], b["r"], b["labels"], b["q_masks"] if v2 else None,
                                             text_features=b["text"], oasl=b["oasl"] if v2 else None)
    if method == "dictas":
        return lambda m, b: m.compute_losses(b["q"], b["r"], b["q_masks"], b["labels"], text_features=b["text"],
                                             count_reduce=count)
    return lambda m, b: m.loss(b["q"], b["q_masks"][:, None], b["r"], b["r_masks"][:, None], encoded=True,
                               count_reduce=count)


# --------------------------------------------------------------------------- the run
def _optimizer(method: str, model: nn.Module, proto: Protocol) -> torch.optim.Optimizer:
    if method == "icas":
        return model.configure_optimizer(lr=proto.lr, weight_decay=proto.weight_decay)
    model.config = dataclasses.replace(model.config, lr=proto.lr, weight_decay=proto.weight_decay) \
        if method == "inctrlv2" else dataclasses.replace(model.config, lr=proto.lr)
    return model.make_optimizer()


def _freeze_value_generator(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """DictAS's second phase (train.py): g_V frozen, queries pass through it, optimiser state reset."""
    model.value_generator.requires_grad_(False)
    model.config = dataclasses.replace(model.config, train_query_value_generator=True)
    if optimizer is not None:
        optimizer.state = defaultdict(dict)


def _state_dict(method: str, model: nn.Module, backbone: str | None) -> dict[str, torch.Tensor]:
    """The model's weights; the frozen backbone is left out when it came from a weights file
    (``fastad evaluate --backbone`` supplies it), kept when it is random (tests)."""
    state = model.state_dict()
    if backbone is None:
        return state
    prefix = "encoder." if method == "icas" else "backbone."
    return {k: v for k, v in state.items() if not k.startswith(prefix)}


def _plot_losses(rows: list[dict[str, Any]], terms: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(1, len(rows) + 1)
    for t in terms:
        ax.plot(x, [r[t] for r in rows], label=t, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def _write_losses(rows: list[dict[str, Any]], terms: Sequence[str], out: Path) -> None:
    with atomic_write(out / "losses.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "step", *terms])
        for r in rows:
            w.writerow([r["epoch"], r["step"], *(f"{r[t]:.6g}" for t in terms)])
    _plot_losses(rows, terms, out / "losses.png")


def epoch_table(rows: list[dict[str, Any]], terms: Sequence[str], seconds: dict[int, float]) -> list[str]:
    """Markdown rows: per epoch, the mean of every loss term and the epoch's seconds."""
    lines = ["| epoch | " + " | ".join(terms) + " | seconds |", "|---:|" + "---:|" * (len(terms) + 1)]
    for e in sorted({r["epoch"] for r in rows}):
        sel = [r for r in rows if r["epoch"] == e]
        means = " | ".join(f"{np.mean([r[t] for r in sel]):.4f}" for t in terms)
        lines.append(f"| {e} | {means} | {seconds.get(e, float('nan')):.2f} |")
    return lines


def train(method: str, data: str | os.PathLike, out: str | os.PathLike, *, layout: str = "auto",
          categories: Sequence[str] | None = None, shots: int | None = None, epochs: int | None = None,
          batch_size: int | None = None, lr: float | None = None, seed: int = 0, device: str = "cpu",
          backbone: str | None = None, config: dict[str, Any] | None = None, protocol: dict[str, Any] | None = None,
          steps_per_epoch: int | None = None, resume: bool = False, progress: bool = True,
          cache_dir: str | os.PathLike | None = None, use_cache: bool = True, backend: str = "fastad",
          on_epoch_end: Callable[[int], None] | None = None, verbose: bool = True) -> Path:
    """Train ``method``'s heads on the images of ``data`` (see the module docstring) and
    return the path of the final checkpoint (``out/checkpoint.pt``).

    ``config``: model constructor overrides, as ``fastad evaluate --config``; ``protocol``:
    ``Protocol`` field overrides (``epochs`` etc. also have their own arguments);
    ``backbone``: frozen backbone weights (None: random, for tests; the checkpoint then holds
    them). ``resume``: continue ``out/checkpoint.pt`` bit-identically. ``on_epoch_end(epoch)``
    is called after each epoch's checkpoint is written."""
    if method not in METHODS:
        raise ValueError(f"--method: unknown method {method!r}; fastad train supports {METHODS}")
    try:
        import matplotlib  # noqa: F401  (losses.png; checked before hours of training, not after)
    except ImportError as exc:
        raise ValueError("fastad train plots losses.png with matplotlib: pip install 'fastad[train]'") from exc
    t_start = time.perf_counter()
    rank, world, device = _dist_env(device)
    out = Path(out)
    ckpt_path = out / "checkpoint.pt"
    if resume and not ckpt_path.is_file():
        raise FileNotFoundError(f"--resume: {ckpt_path} does not exist (nothing to resume)")
    if not resume and ckpt_path.exists():
        raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue it, or choose another --out")
    meter = StageMeter(device)
    with meter("setup (data, model, prompts)"):
        ts = load_training_set(data, categories, layout)
        torch.manual_seed(seed)
        runner = build_runner(method, ts.categories[0], backbone=backbone, config=config, device=device,
                              backend=backend)
        model = runner.model
        proto = protocol_defaults(method, model)
        overrides = dict(protocol or {})
        for k, v in (("epochs", epochs), ("batch_size", batch_size), ("lr", lr), ("shots", shots),
                     ("steps_per_epoch", steps_per_epoch)):
            if v is not None:
                overrides[k] = v
        try:
            proto = dataclasses.replace(proto, **overrides)
        except TypeError as exc:
            raise ValueError(f"--protocol: {exc}; fields: {[f.name for f in dataclasses.fields(Protocol)]}") from exc
        for k in ("epochs", "batch_size", "shots"):
            if getattr(proto, k) < 1:
                raise ValueError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(proto, k)}")
        if proto.batch_size % world:
            raise ValueError(f"--batch-size {proto.batch_size} does not split over {world} processes")
        if method != "inctrlv2" and not ts.select(label=1):
            raise ValueError(f"{ts.root}: {method} trains on anomalous images with masks and the categories "
                             f"{ts.categories} have none")
        text = _text_prototypes(method, model, ts.categories)
        size = runner.size
        if method == "icas":
            encoder = model.encode
        else:
            encoder = lambda im: model.encode(runner._norm(im))  # noqa: E731  (evaluate's preprocessing)
        key = {"method": method, "frozen": weights_digest(_frozen_module(method, model)), "backbone": backbone,
               "image_size": size, "layers": list(getattr(model, "layers", [])) or "x_prenorm",
               "preprocess": "square bilinear resize (fastad.data.mvtec.read_image)", "views": "dihedral"}
        cache = FeatureCache(cache_dir or DEFAULT_CACHE, key) if use_cache else None
        src = FeatureSource(ts, size, encoder, cache, torch.device(device))
        optimizer = _optimizer(method, model, proto)
        scheduler = (torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=proto.plateau_factor,
                                                                patience=proto.plateau_patience)
                     if method == "dictas" else None)
    options = {"method": method, "protocol": dataclasses.asdict(proto), "config": dict(config or {}),
               "backbone": backbone, "seed": seed, "categories": ts.categories, "layout": ts.layout,
               "data": str(ts.root), "backend": backend}
    start, rows, epoch_seconds = 0, [], {}
    if resume:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        diff = {k: (ckpt["options"].get(k), v) for k, v in options.items()
                if k != "protocol" and ckpt["options"].get(k) != v}
        old_proto = {k: v for k, v in ckpt["options"]["protocol"].items() if k != "epochs"}
        diff.update({f"protocol.{k}": (old_proto.get(k), v) for k, v in options["protocol"].items()
                     if k != "epochs" and old_proto.get(k) != v})
        if diff:
            raise ValueError(f"--resume: {ckpt_path} was trained with other options: "
                             + "; ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in diff.items()))
        if ckpt.get("value_generator_frozen"):
            _freeze_value_generator(model, None)
        missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
        prefix = "encoder." if method == "icas" else "backbone."
        if unexpected or any(not k.startswith(prefix) for k in missing):
            raise ValueError(f"--resume: {ckpt_path} does not fit the model (missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]})")
        optimizer.load_state_dict(ckpt["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"])
        start, rows, epoch_seconds = ckpt["epoch"], ckpt["history"], ckpt["epoch_seconds"]
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        import fastad

        info = {**options, "shots_note": "references per query", "world_size": world, "device": device,
                "image_size": size, "model_config": (dataclasses.asdict(model.config) if hasattr(model, "config")
                                                     else dict(config or {})),
                "split": {"summary": ts.summary(),
                          "images": [{"path": str(im.path), "category": im.category, "split": im.split,
                                      "label": im.label, "mask": str(im.mask) if im.mask else None}
                                     for im in ts.images]},
                "cache": {"dir": str(cache.dir) if cache else None, "key": key},
                "versions": {"fastad": fastad.__version__, "torch": torch.__version__,
                             "python": platform.python_version(), "numpy": np.__version__},
                "machine": platform.processor() or platform.machine()}
        with atomic_write(out / "config.json", "w") as f:
            json.dump(info, f, indent=1, default=str)

    if world > 1:
        _global_batchnorm(model)
    loss_fn = _loss_fn(method, proto, world)
    step_module = _Step(model, loss_fn)
    terms: list[str] = [k for k in rows[0] if k not in ("epoch", "step")] if rows else []
    for epoch in range(start, proto.epochs):
        t_epoch = time.perf_counter()
        if method == "dictas" and proto.freeze_value_generator_epoch is not None \
                and epoch == proto.freeze_value_generator_epoch:
            _freeze_value_generator(model, optimizer)
        model.train()
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            # rebuilt per epoch: DictAS freezes parameters between epochs
            runner_step: nn.Module = DistributedDataParallel(step_module, find_unused_parameters=False)
        else:
            runner_step = step_module
        plan = make_plan(proto, ts, epoch, seed)
        bar = tqdm(plan, desc=f"{method} epoch {epoch + 1}/{proto.epochs}", unit="step",
                   disable=not progress or rank != 0)
        for step, items in enumerate(bar):
            with meter("features (cache / frozen backbone) + masks"):
                batch = _batch(method, shard(items, rank, world), src, ts, text)
            with meter("heads: forward + backward + step"):
                optimizer.zero_grad(set_to_none=True)
                losses = runner_step(batch)
                losses["loss"].backward()
                optimizer.step()
            vals = torch.stack([v.detach().float() for v in losses.values()])
            if world > 1:
                import torch.distributed as dist

                dist.all_reduce(vals)
                vals /= world
            row = {"epoch": epoch + 1, "step": step + 1, **dict(zip(losses.keys(), vals.tolist()))}
            if not terms:
                terms = list(losses.keys())
            rows.append(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
        bar.close()
        if scheduler is not None:
            scheduler.step(float(np.mean([r["query"] for r in rows if r["epoch"] == epoch + 1])))
        epoch_seconds[epoch + 1] = time.perf_counter() - t_epoch
        with meter("checkpoints"):
            if rank == 0:
                ckpt = {"model": _state_dict(method, model, backbone), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict() if scheduler is not None else None,
                        "epoch": epoch + 1, "rng": torch.get_rng_state(), "history": rows,
                        "epoch_seconds": epoch_seconds, "options": options, "method": method,
                        "value_generator_frozen": bool(method == "dictas" and
                                                       not model.value_generator.block.norm.weight.requires_grad)}
                atomic_save(ckpt, out / f"epoch-{epoch + 1}.pt")
                atomic_save(ckpt, ckpt_path)
                _write_losses(rows, terms, out)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1)
    if rank == 0 and verbose:
        total = time.perf_counter() - t_start
        hit = f", feature cache {cache.hits} reads / {cache.misses} encodes" if cache else ", no feature cache"
        print(f"fastad train: {method} ({proto.name}) on {', '.join(ts.categories)}: {proto.epochs} epochs, "
              f"global batch {proto.batch_size}, {world} process(es), {total:.1f} s{hit}\n")
        print("\n".join(epoch_table(rows, terms, epoch_seconds)) + "\n")
        print("\n".join(stage_table(meter.report())))
        print(f"\nwrote {ckpt_path}, epoch-<n>.pt, config.json, losses.csv and losses.png in {out}")
    return ckpt_path
