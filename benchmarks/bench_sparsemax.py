"""dict_lookup (the DictAS lookup: sparsemax / softmax / argmax) and sparsemax,
fastad side by side with what users run instead:

- the dense reference, as the DictAS authors compute it: q @ k.T * C^-0.5, a
  sort-based sparsemax over the whole dictionary, w @ v;
- entmax.sparsemax (the entmax package) between the same two matmuls;
- torch scaled_dot_product_attention for the softmax lookup.

quick: N = 576 query patches, C = 1024, M = 2,304 (4-shot) and 23,040 (rotated
references), one query image. full adds M = 9,216 (16-shot) and B = 32 query
images against one 4-shot dictionary. Inputs: standard normal query / keys /
values (logits of std 1: about 5 keys per row in the sparsemax support); the
wide-support case scales the keys to logits of std 0.05 (about 70 keys per row
in the support, beyond the first top-32 candidates).
"""
from __future__ import annotations

import importlib

import entmax
import pytest
import torch
import torch.nn.functional as F

import fastad

smx = importlib.import_module("fastad.ops.sparsemax")


def lookup_sizes(bench_size):
    """(B, N, M, C, logit std)"""
    quick = [(1, 576, 2304, 1024, 1.0), (1, 576, 23040, 1024, 1.0), (1, 576, 23040, 1024, 0.05)]
    return quick + ([(1, 576, 9216, 1024, 1.0), (32, 576, 2304, 1024, 1.0)] if bench_size == "full" else [])


_CACHE: dict = {}


def inputs(B, N, M, C, device, std=1.0):
    key = (B, N, M, C, str(device), std)
    if key not in _CACHE:
        _CACHE.clear()
        g = torch.Generator().manual_seed(0)
        q = torch.randn(B, N, C, generator=g)
        k = torch.randn(M, C, generator=g) * std  # logits q . k * C^-0.5 of std `std`
        v = torch.randn(M, C, generator=g)
        _CACHE[key] = tuple(t.to(device) for t in (q, k, v))
    return _CACHE[key]


def dense_logits(q, k):
    return torch.matmul(q, k.T) * q.shape[-1] ** -0.5


PEERS = {
    "sparsemax": {
        "dense reference (mm + sort sparsemax + mm)": lambda q, k, v: smx.sparsemax_reference(dense_logits(q, k)) @ v,
        "entmax.sparsemax + mm": lambda q, k, v: entmax.sparsemax(dense_logits(q, k), dim=-1) @ v,
    },
    "softmax": {
        "torch SDPA": lambda q, k, v: F.scaled_dot_product_attention(
            q[:, None], k[None, None].expand(q.shape[0], 1, -1, -1), v[None, None].expand(q.shape[0], 1, -1, -1))[:, 0],
        "dense mm + softmax + mm": lambda q, k, v: torch.softmax(dense_logits(q, k), dim=-1) @ v,
    },
    "argmax": {
        "dense mm + argmax + gather": lambda q, k, v: v[dense_logits(q, k).argmax(-1)],
    },
}


def impls(mode):
    yield "fastad", "fastad", lambda q, k, v: fastad.ops.dict_lookup(q, k, v, mode=mode)
    for name, fn in PEERS[mode].items():
        yield name, "peer", fn


@pytest.mark.parametrize("mode", ["sparsemax", "softmax", "argmax"])
@pytest.mark.parametrize("impl", [0, 1, 2])
@pytest.mark.parametrize("size", [0, 1, 2, 3, 4])
def test_dict_lookup(bench, bench_size, bench_device, mode, impl, size):
    sizes = lookup_sizes(bench_size)
    choices = list(impls(mode))
    if size >= len(sizes) or impl >= len(choices) or (sizes[size][4] != 1.0 and mode != "sparsemax"):
        pytest.skip("not part of this size / mode")
    B, N, M, C, std = sizes[size]
    name, role, fn = choices[impl]
    q, k, v = inputs(B, N, M, C, bench_device, std)
    if role == "fastad" and mode == "sparsemax":
        ref = PEERS["sparsemax"]["dense reference (mm + sort sparsemax + mm)"](q, k, v)
        assert (fn(q, k, v) - ref).abs().max().item() < 1e-3
    label = f"fastad {_backend(bench_device)}" if role == "fastad" else name
    spread = "" if std == 1.0 else f", logit std {std}"
    bench(lambda: fn(q, k, v), group=f"dict_lookup {mode} B={B} {N}x{M}x{C}{spread}", impl=label, role=role,
          B=B, N=N, M=M, C=C)


def _backend(device) -> str:
    return "triton" if torch.device(device).type == "cuda" else "cpu"


@pytest.mark.parametrize("impl", [0, 1, 2])
def test_dict_lookup_backward(bench, bench_size, bench_device, impl):
    """Forward + backward for query, keys and values (DictAS training)."""
    B, N, M, C = (1, 576, 2304, 1024) if bench_size == "quick" else (1, 576, 23040, 1024)
    q0, k0, v0 = inputs(B, N, M, C, bench_device)
    fns = [
        (f"fastad {_backend(bench_device)}", "fastad", lambda q, k, v: fastad.ops.dict_lookup(q, k, v)),
        ("dense reference + autograd", "peer", PEERS["sparsemax"]["dense reference (mm + sort sparsemax + mm)"]),
        ("entmax.sparsemax + mm + autograd", "peer", PEERS["sparsemax"]["entmax.sparsemax + mm"]),
    ]
    name, role, fn = fns[impl]
    g = torch.randn(B, N, C, generator=torch.Generator().manual_seed(1)).to(bench_device)

    def step():
        q, k, v = (t.detach().requires_grad_() for t in (q0, k0, v0))
        return torch.autograd.grad((fn(q, k, v) * g).sum(), (q, k, v))

    bench(step, group=f"dict_lookup sparsemax forward+backward B={B} {N}x{M}x{C}", impl=name, role=role,
          B=B, N=N, M=M, C=C)


@pytest.mark.parametrize("impl", [0, 1, 2])
@pytest.mark.parametrize("shape", [(576, 23040), (8, 100_000)])
def test_sparsemax_rows(bench, bench_device, impl, shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2)).to(bench_device)
    fns = [
        (f"fastad {_backend(bench_device)}", "fastad", lambda: fastad.ops.sparsemax(x)),
        ("sort-based reference", "peer", lambda: smx.sparsemax_reference(x)),
        ("entmax.sparsemax", "peer", lambda: entmax.sparsemax(x, dim=-1)),
    ]
    name, role, fn = fns[impl]
    bench(fn, group=f"sparsemax rows {shape[0]}x{shape[1]}", impl=name, role=role)
