"""Scale-out on Ray (``pip install 'fastad[ray]'``): evaluation sweeps (``fastad sweep``),
batch scoring (``fastad score``) and reference banks sharded over Ray actors.

Ray is imported only when one of these runs, so ``import fastad.distributed`` works without it.
"""
from __future__ import annotations

from typing import Any

__all__ = ["sweep", "score", "ShardedBank"]


def __getattr__(name: str) -> Any:
    if name == "sweep":
        from fastad.distributed.sweep import sweep
        return sweep
    if name == "score":
        from fastad.distributed.score import score
        return score
    if name == "ShardedBank":
        from fastad.distributed.bank import ShardedBank
        return ShardedBank
    raise AttributeError(f"module 'fastad.distributed' has no attribute {name!r}")
