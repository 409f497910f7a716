"""Loading the authors' released checkpoints into the fastad modules.

Each model gives a ``rename`` function from the authors' state-dict key names to
ours; ``load_mapped_state_dict`` applies it, then loads strictly: any of our
parameters left without a value, any checkpoint key that maps to nothing, and any
shape mismatch raise ``CheckpointKeyError`` listing them all.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

__all__ = ["CheckpointKeyError", "read_state_dict", "load_mapped_state_dict", "backbone_weights_arg"]


def backbone_weights_arg(model: str, backbone_weights: str | None, old_name: str, old_value: str | None) -> str | None:
    """The one name of a model's frozen-backbone weights file is ``backbone_weights``; the
    old ``pretrained`` / ``checkpoint_path`` still work for one release, with a DeprecationWarning."""
    if old_value is None:
        return backbone_weights
    import warnings

    if backbone_weights is not None:
        raise TypeError(f"fastad.models.{model}: give backbone_weights only ({old_name} is its deprecated name)")
    warnings.warn(f"fastad.models.{model}: `{old_name}=` is deprecated and will be removed in the next release; "
                  "use `backbone_weights=`", DeprecationWarning, stacklevel=3)
    return old_value


class CheckpointKeyError(ValueError):
    """A checkpoint does not fit the model: lists missing / unexpected / mis-shaped keys."""

    def __init__(self, what: str, missing: list[str], unexpected: list[str], mismatched: list[str]) -> None:
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        parts = [f"{what}: the checkpoint does not fit the model"]
        for title, keys in (("missing keys (in the model, not in the checkpoint)", missing),
                            ("unexpected keys (in the checkpoint, not in the model)", unexpected),
                            ("shape mismatches", mismatched)):
            if keys:
                shown = ", ".join(keys[:40]) + (f", ... ({len(keys) - 40} more)" if len(keys) > 40 else "")
                parts.append(f"{len(keys)} {title}: {shown}")
        super().__init__("\n  ".join(parts))


def read_state_dict(source: str | os.PathLike | Mapping[str, Any], containers: Iterable[str]) -> dict[str, torch.Tensor]:
    """A state dict from a path or a mapping; unwraps the first of ``containers``
    (e.g. "model_state", "Mymodel") found at the top level and strips a DDP "module." prefix."""
    if isinstance(source, (str, os.PathLike)):
        obj = torch.load(source, map_location="cpu", weights_only=False)
    else:
        obj = source
    if not isinstance(obj, Mapping):
        raise TypeError(f"fastad.models: a checkpoint must be a mapping (state dict), got {type(obj).__name__}")
    for key in containers:
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_mapped_state_dict(module: nn.Module, state: Mapping[str, torch.Tensor], rename: Callable[[str], str | None],
                           what: str, optional: Callable[[str], bool] = lambda k: False) -> None:
    """Load ``state`` into ``module`` after renaming its keys with ``rename`` (None drops
    a key the authors' model holds but never uses). Keys of ``module`` for which
    ``optional(key)`` is true may be absent (they keep their current values)."""
    own = module.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    unexpected, mismatched = [], []
    seen: set[str] = set()
    for key, value in state.items():
        new = rename(key)
        if new is None:
            continue
        if new not in own:
            unexpected.append(key if new == key else f"{key} (-> {new})")
            continue
        seen.add(new)
        if tuple(value.shape) != tuple(own[new].shape):
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {new} {tuple(own[new].shape)}")
            continue
        mapped[new] = value
    missing = [k for k in own if k not in seen and not optional(k)]
    if missing or unexpected or mismatched:
        raise CheckpointKeyError(what, missing, unexpected, mismatched)
    module.load_state_dict(mapped, strict=False)
