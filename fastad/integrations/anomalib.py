"""Drop-in fastad kernels for anomalib (written against anomalib 2.7).

    import fastad
    fastad.patch_anomalib()           # every PatchCore model / coreset from now on uses fastad
    with fastad.patch_anomalib():     # or only inside the block (undone on exit, also on errors)
        engine.fit(model, datamodule)
    fastad.unpatch_anomalib()         # restore anomalib's own code

What is replaced, at the class level (so models and samplers built before the call
use fastad too; subclasses that override these methods keep their own code):

* ``PatchcoreModel.nearest_neighbors(embedding, n_neighbors)`` ->
  :func:`fastad.ops.nn_distance` ``(embedding, memory_bank, k=n_neighbors, metric="l2")``.
  Same return convention: ``(scores, locations)`` of shape ``[n, k]``, and ``[n]``
  for ``n_neighbors == 1`` (anomalib takes ``.min(1)`` there); scores in the
  embedding's dtype, locations int64. This is PatchCore's inference hot spot: the
  patch-to-memory-bank search in ``forward`` and the support-sample search of
  ``compute_anomaly_score`` both go through it. anomalib evaluates the float32 Gram
  form ``sqrt(|x|^2 + |y|^2 - 2 x.y)`` on a full ``chunk x M`` matrix; fastad returns
  the exact distances rounded to float32 without forming that matrix, so the scores
  agree with anomalib's up to anomalib's own rounding error (larger for close pairs,
  where the Gram form cancels), and the locations agree except between bank rows
  whose distances differ by less than that error.
* ``KCenterGreedy.select_coreset_idxs()`` (and so ``sample_coreset()``, used by
  PatchCore's ``subsample_embedding`` and AnomalyDINO's ``fit``) ->
  :func:`fastad.ops.kcenter_greedy`. anomalib's own steps are kept in its order: its
  sparse random projection (``self.model.fit`` / ``transform``, which draw from
  torch's and numpy's global generators) and its random start
  (``torch.randint(high=n, size=(1,))`` on the features' device). fastad then runs
  the same greedy rule from that start on the same projected features: the
  difference-form distance anomalib uses, evaluated with a fixed double-precision
  summation instead of torch's float32 one, and the first maximal index. So the
  patched class consumes the same random numbers and selects the same coreset for
  float32 features, except where two candidates' distances tie to within float32
  rounding (half-precision features: fastad computes in float32 where anomalib
  rounds to half, so ties resolve differently). ``min_distances`` is left ``None``.

Calls the kernels cannot take run anomalib's original code unchanged: tensors on
devices other than CPU / CUDA, dtypes fastad does not support, coreset sizes outside
``[1, n]``, and tracing / ONNX export (anomalib's Gram form is kept export-friendly).
Non-finite features raise ``ValueError`` (anomalib would return NaN scores).
"""
from __future__ import annotations

import functools
import importlib
import operator
import threading
from typing import Any, Callable, NamedTuple

import torch

from fastad._checks import FLOAT_DTYPES

__all__ = ["AnomalibPatch", "patch_anomalib", "patched_targets", "unpatch_anomalib"]


class _Target(NamedTuple):
    module: str
    cls: str
    attr: str
    make: Callable[[Callable[..., Any]], Callable[..., Any]]


_DEVICES = ("cpu", "cuda")


def _exporting() -> bool:
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()


def _nn_supported(embedding: object, bank: object) -> bool:
    return (isinstance(embedding, torch.Tensor) and isinstance(bank, torch.Tensor)
            and embedding.dim() == 2 and bank.dim() == 2
            and embedding.dtype == bank.dtype and embedding.dtype in FLOAT_DTYPES + (torch.float64,)
            and embedding.device == bank.device and embedding.device.type in _DEVICES
            and not _exporting())


def _make_nearest_neighbors(original: Callable[..., Any]) -> Callable[..., Any]:
    from fastad.ops.nn_distance import nn_distance

    @functools.wraps(original)
    def nearest_neighbors(self: Any, embedding: torch.Tensor, n_neighbors: int) -> tuple[torch.Tensor, torch.Tensor]:
        bank = self.memory_bank
        if not _nn_supported(embedding, bank):
            return original(self, embedding, n_neighbors)
        k = operator.index(n_neighbors)
        values, indices = nn_distance(embedding, bank, k=k, metric="l2")
        values = values.to(embedding.dtype)
        if k == 1:  # anomalib's .min(1): 1-D scores and locations
            return values[:, 0], indices[:, 0]
        return values, indices

    return nearest_neighbors


def _make_select_coreset_idxs(original: Callable[..., Any]) -> Callable[..., Any]:
    from fastad.ops.kcenter import kcenter_greedy

    @functools.wraps(original)
    def select_coreset_idxs(self: Any) -> list[int]:
        emb = self.embedding
        if not (isinstance(emb, torch.Tensor) and emb.dim() >= 2 and emb.dtype in FLOAT_DTYPES
                and emb.device.type in _DEVICES and emb[0].numel() > 0
                and 1 <= self.coreset_size <= self.n_observations):
            return original(self)
        # anomalib's steps and random draws, in its order (see the module docstring)
        if emb.dim() == 2:
            self.model.fit(emb)
            self.features = self.model.transform(emb)
        else:
            self.features = emb.reshape(emb.shape[0], -1)
        self.reset_distances()
        start = torch.randint(high=self.n_observations, size=(1,), device=self.features.device).squeeze()
        picks = kcenter_greedy(self.features, self.coreset_size, init=start, progress=True)
        return picks.indices.cpu().tolist()

    return select_coreset_idxs


_TARGETS = {
    "nearest_neighbors": _Target("anomalib.models.image.patchcore.torch_model", "PatchcoreModel",
                                 "nearest_neighbors", _make_nearest_neighbors),
    "coreset": _Target("anomalib.models.components.sampling.k_center_greedy", "KCenterGreedy",
                       "select_coreset_idxs", _make_select_coreset_idxs),
}

_LOCK = threading.Lock()


class _Patched(NamedTuple):
    cls: type
    original: Any             # the class attribute fastad replaced
    holders: set              # the AnomalibPatch handles that keep it replaced


_STATE: dict[str, _Patched] = {}


class AnomalibPatch:
    """Handle returned by :func:`patch_anomalib`, and a context manager.

    A target stays patched while at least one handle holds it (or until
    :func:`unpatch_anomalib`): leaving a ``with fastad.patch_anomalib():`` block,
    also by an exception, releases this handle, so nested blocks and blocks in
    concurrent threads compose, and a plain ``fastad.patch_anomalib()`` call keeps
    the patch for good.
    """

    def __init__(self, targets: tuple[str, ...]) -> None:
        self.targets = targets

    def undo(self) -> None:
        """Release this handle; restores anomalib's code when no other handle holds it (idempotent)."""
        with _LOCK:
            for name in self.targets:
                entry = _STATE.get(name)
                if entry is not None and self in entry.holders:
                    entry.holders.discard(self)
                    if not entry.holders:
                        _restore(name)

    def __enter__(self) -> "AnomalibPatch":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.undo()

    def __repr__(self) -> str:
        return f"AnomalibPatch(targets={self.targets})"


def _load(names: tuple[str, ...]) -> dict[str, type]:
    classes = {}
    for name in names:
        t = _TARGETS[name]
        try:
            module = importlib.import_module(t.module)
        except ImportError as exc:
            raise ImportError(f"fastad.patch_anomalib needs anomalib (pip install anomalib); "
                              f"importing {t.module} failed: {exc}") from exc
        cls = getattr(module, t.cls, None)
        if not isinstance(cls, type) or t.attr not in vars(cls):
            import anomalib

            raise ImportError(f"fastad.patch_anomalib: {t.module}.{t.cls}.{t.attr} not found in anomalib "
                              f"{getattr(anomalib, '__version__', '?')} (written for anomalib 2.7)")
        classes[name] = cls
    return classes


def _restore(name: str) -> None:
    entry = _STATE.pop(name)
    setattr(entry.cls, _TARGETS[name].attr, entry.original)


def patch_anomalib(*, nearest_neighbors: bool = True, coreset: bool = True) -> AnomalibPatch:
    """Replace anomalib's PatchCore nearest-neighbour search and/or ``KCenterGreedy``
    selection with fastad's kernels (module docstring: what exactly, and how exact).

    Idempotent and thread-safe: a target already patched is not replaced again.
    Returns an :class:`AnomalibPatch`; use it as a context manager
    (``with fastad.patch_anomalib(): ...``) to undo the patch on exit (unless
    another handle still holds it), or call :func:`unpatch_anomalib` to restore
    everything at once.

    Raises ImportError (naming what failed) when anomalib is not installed or lacks
    the patched classes.
    """
    names = tuple(n for n, on in (("nearest_neighbors", nearest_neighbors), ("coreset", coreset)) if on)
    classes = _load(names)  # before touching anything: a failed import patches nothing
    handle = AnomalibPatch(names)
    with _LOCK:
        for name in names:
            if name not in _STATE:
                cls, attr = classes[name], _TARGETS[name].attr
                original = vars(cls)[attr]
                setattr(cls, attr, _TARGETS[name].make(original))
                _STATE[name] = _Patched(cls, original, set())
            _STATE[name].holders.add(handle)
    return handle


def unpatch_anomalib() -> None:
    """Restore every anomalib method that fastad replaced (no-op when none is)."""
    with _LOCK:
        for name in list(_STATE):
            _restore(name)


def patched_targets() -> tuple[str, ...]:
    """Names of the targets currently patched: ``"nearest_neighbors"``, ``"coreset"``."""
    with _LOCK:
        return tuple(_STATE)
