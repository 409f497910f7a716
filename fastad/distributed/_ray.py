"""Connecting to Ray: an embedded local instance by default, a cluster with ``address``."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator


def import_ray() -> Any:
    """``ray``, or an ImportError that says how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise ImportError("fastad.distributed needs Ray: pip install 'fastad[ray]' (ray[data]>=2.9)") from exc
    return ray


@contextlib.contextmanager
def ray_session(address: str | None = None, **init_kwargs: Any) -> Iterator[Any]:
    """Yield ``ray``, connected. An already-initialised Ray is used as it is (and left running);
    otherwise ``address=None`` starts an embedded local Ray in this process (stopped at the end)
    and ``address="auto"`` / ``"ray://host:port"`` joins a running cluster (disconnected at the end)."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    if address is not None and not isinstance(address, str):
        raise ValueError(f"--address must be 'auto', 'ray://host:port' or an IP:port, got {address!r}")
    kwargs = {"include_dashboard": False, "log_to_driver": False, **init_kwargs}
    if address is not None:
        kwargs["address"] = address
    try:
        ray.init(**kwargs)
    except ConnectionError as exc:
        raise ValueError(f"--address {address}: cannot connect to a Ray cluster there ({exc})") from exc
    try:
        yield ray
    finally:
        ray.shutdown()


def cluster_has_gpus(ray: Any) -> bool:
    return float(ray.cluster_resources().get("GPU", 0)) > 0


def task_device() -> str:
    """The device of the calling Ray task or actor: its GPU when Ray gave it one (CPU outside Ray)."""
    ray = import_ray()
    if ray.is_initialized() and ray.get_gpu_ids():
        return "cuda"  # Ray sets CUDA_VISIBLE_DEVICES to the GPU(s) it assigned
    return "cpu"

