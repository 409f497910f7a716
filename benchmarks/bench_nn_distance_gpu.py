"""nn_distance on a GPU: fastad's Triton kernel (exact) side by side with what users run
instead: torch bf16 / fp32 ``mm`` + ``max`` in query chunks (bf16 is not exact: its
products are rounded to bf16 before the max), and faiss-gpu exact search when installed.

Runs only with ``--bench-device cuda`` (skips otherwise):

    pytest benchmarks/bench_nn_distance_gpu.py --bench-device cuda --benchmark-only [--bench-size full]

Sizes: InCTRLv2 1,369 x 5,476 x 1,024 (one image, 4-shot bank) and 43,808 x 5,476 x 1,024
(32 images sharing it); SAA+ 4,096 x 4,096 x 1,792 mean of the top 400; ``full`` adds
43,808 x 1,000,000 x 1,024 (a PatchCore-size bank). Inputs are L2-normalised rows, metric
cosine, k = 1. Each record carries ``tflops`` (2 N M C / median time) in extra_info.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastad.ops import nn_distance

NN_SIZES = [
    ("quick", 1369, 5476, 1024),
    ("quick", 43808, 5476, 1024),
    ("full", 43808, 1_000_000, 1024),
]


@pytest.fixture(scope="module")
def cuda(bench_device):
    if bench_device.type != "cuda":
        pytest.skip("GPU benchmarks: pass --bench-device cuda")
    return bench_device


_DATA: dict = {}


def _data(N: int, M: int, C: int, dtype: torch.dtype, device: torch.device):
    """Normalised random rows, generated once per size (float32 master, cast per dtype)."""
    key = (N, M, C)
    if key not in _DATA:
        _DATA.clear()
        g = torch.Generator(device=device).manual_seed(0)
        q = F.normalize(torch.randn(N, C, device=device, generator=g), dim=-1)
        b = torch.empty(M, C, device=device)
        for r0 in range(0, M, 1 << 16):
            b[r0:r0 + (1 << 16)] = F.normalize(torch.randn(min(1 << 16, M - r0), C, device=device, generator=g), dim=-1)
        _DATA[key] = (q, b)
    q, b = _DATA[key]
    return q.to(dtype), b.to(dtype)


def _torch_mm_max(q: torch.Tensor, b: torch.Tensor):
    """1 - max cosine per row with chunked ``mm``: chunks of about 2^30 products' outputs."""
    rows = max(1, (1 << 30) // b.shape[0])
    vals, idx = [], []
    for r0 in range(0, q.shape[0], rows):
        v, i = (q[r0:r0 + rows] @ b.T).max(dim=1)
        vals.append(1.0 - v.float())
        idx.append(i)
    return torch.cat(vals), torch.cat(idx)


def _record_tflops(benchmark, flops: float) -> None:
    benchmark.extra_info["tflops"] = flops / benchmark.stats.stats.median / 1e12


def _faiss_gpu():
    try:
        import faiss
    except ImportError:
        return None
    return faiss if hasattr(faiss, "StandardGpuResources") else None


IMPLS = ["fastad triton bf16", "fastad triton fp32", "torch bf16 mm+max", "torch fp32 mm+max", "faiss-gpu IndexFlatIP"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", NN_SIZES, ids=lambda s: f"{s[1]}x{s[2]}x{s[3]}")
def test_nn_distance_gpu_k1(bench, benchmark, bench_size, cuda, size, impl):
    tier, N, M, C = size
    if tier == "full" and bench_size != "full":
        pytest.skip("--bench-size full only")
    group = f"nn_distance cuda cosine k=1 {N}x{M}x{C}"
    flops = 2.0 * N * M * C
    rounds = 1 if M > 100_000 else 3
    if impl.startswith("fastad"):
        q, b = _data(N, M, C, torch.bfloat16 if "bf16" in impl else torch.float32, cuda)
        bench(lambda: nn_distance(q, b, k=1, metric="cosine", backend="triton"), group=group, impl=impl,
              role="fastad", rounds=rounds, exact=True)
    elif impl.startswith("torch"):
        dtype = torch.bfloat16 if "bf16" in impl else torch.float32
        q, b = _data(N, M, C, dtype, cuda)
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (TF32 would not be exact)
        try:
            bench(lambda: _torch_mm_max(q, b), group=group, impl=impl, role="peer", rounds=rounds,
                  exact=dtype == torch.float32)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
    else:
        faiss = _faiss_gpu()
        if faiss is None:
            pytest.skip("faiss-gpu is not installed")
        q, b = _data(N, M, C, torch.float32, cuda)
        res = faiss.StandardGpuResources()
        index = faiss.GpuIndexFlatIP(res, C)
        index.add(b.cpu().numpy())
        qn = q.cpu().numpy()
        bench(lambda: index.search(qn, 1), group=group, impl=impl, role="peer", rounds=rounds, exact=True)
    _record_tflops(benchmark, flops)


@pytest.mark.parametrize("impl", ["fastad triton fp32", "fastad triton bf16", "torch fp32 mm+topk",
                                  "torch bf16 mm+topk"])
def test_saa_saliency_gpu(bench, benchmark, cuda, impl):
    """SAA+ saliency: mean of the 400 largest of 0.5 * (1 - X X^T), 4,096 positions x 1,792 channels."""
    N, C, k = 4096, 1792, 400
    dtype = torch.bfloat16 if "bf16" in impl else torch.float32
    x, _ = _data(N, 8, C, dtype, cuda)
    group = f"nn_distance cuda saa+ {N}x{N}x{C} top-{k} mean"
    if impl.startswith("fastad"):
        bench(lambda: nn_distance(x, x, k=k, metric="cosine", scale=0.5, reduce="mean_largest", backend="triton"),
              group=group, impl=impl, role="fastad", exact=True)
    else:
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            bench(lambda: (0.5 * (1.0 - (x @ x.T).float())).topk(k, dim=-1).values.mean(-1), group=group, impl=impl,
                  role="peer", exact=dtype == torch.float32)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
    _record_tflops(benchmark, 2.0 * N * N * C)
