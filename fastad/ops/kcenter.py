"""k-center greedy selection (farthest-point sampling): iCAS greedy query selection
and PatchCore-style coreset subsampling, exact on every backend.

Definition (``kcenter_greedy_reference`` is the plain loop that implements it):

* distance: the *difference form*, evaluated as
  ``D(x, c) = float32(sqrt(pairwise_sum(double(float32(x_j - c_j)) ** 2)))`` where
  ``pairwise_sum`` is the recursive-halves tree over the row zero-padded to a power of
  two (level by level ``t[i] = t[2i] + t[2i+1]``). Each square is exact in double and
  the tree fixes every add, so all backends compute the same bits on every device
  and vector width. This is the form anomalib uses (``linalg.norm(features - center)``,
  there accumulated in float32); the PatchCore authors' code uses the Gram form
  ``|x|^2 + |c|^2 - 2 x.c``, which cancels catastrophically for close points and in
  float32 changes picks on near-ties (specs/icas.md §2.4). fastad never uses it.
* ``metric="cosine"``: rows are L2-normalised (in float64, rounded to float32) and
  the L2 rule above runs on them; ``1 - cos = ||u - v||^2 / 2`` is monotone in it, so
  the picks are those of the cosine distance. The radius is reported as ``1 - cos``.
* rule: keep every point's distance to its nearest selected center, select the point
  with the largest one (ties to the lowest index), update. Selected points are never
  selected again (their distance counts as below every other), so duplicate rows
  give distinct indices.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import torch

from fastad import _ext
from fastad._backend import resolve_backend
from fastad._checks import FLOAT_DTYPES, check_choice, check_finite, check_tensor, describe

__all__ = ["KCenterResult", "kcenter_greedy", "kcenter_greedy_reference", "kcenter_projection_matrix"]

_OP = "kcenter_greedy"
_BACKENDS = ("reference", "cpu", "triton")
_METRICS = ("l2", "cosine")
# How `init` reaches the custom op: a start index (counts as the first pick), a
# seeded random start (idem), or a [M] / [B, M] set of already-selected centers.
_INIT_INDEX, _INIT_RANDOM, _INIT_CENTERS = 0, 1, 2
# Storage of the C++ kernel's approximate rows (csrc/cpu/kcenter_kernel.cpp).
_STORAGE = {"auto": 0, "input": 1, "fp16": 2, "bf16": 3}


class KCenterResult(NamedTuple):
    """Result of :func:`kcenter_greedy`.

    indices: int64 ``[k]`` (or ``[B, k]``), the selected rows in selection order.
    radius:  float32 ``[]`` (or ``[B]``), the coverage radius after the selection:
             the largest distance from any point to its nearest selected point (for
             ``init`` centers: to the nearest of those and the new picks).
    """

    indices: torch.Tensor
    radius: torch.Tensor


def kcenter_greedy(
    x: torch.Tensor,
    k: int,
    metric: str = "l2",
    init: Union[int, str, torch.Tensor] = 0,
    projection_dim: Optional[int] = None,
    seed: Optional[int] = None,
    backend: Optional[str] = None,
    progress: bool = False,
) -> KCenterResult:
    """Greedy k-center (farthest-point) selection of ``k`` rows of ``x``.

    Args:
        x: ``[N, C]`` or ``[B, N, C]`` (``B`` independent problems, e.g. one per image),
            float32 / float16 / bfloat16. Must be finite.
        k: number of points to select per problem, ``1 <= k <= N`` (minus the
            ``init`` centers, when those are given).
        metric: ``"l2"`` (Euclidean) or ``"cosine"`` (``1 - cos``; rows must be non-zero).
        init: ``int`` or 0-d tensor: the first pick (default 0, the spec's choice for
            iCAS); ``"random"``: a uniformly drawn first pick per problem (from
            ``seed``, else torch's global generator); a ``[M]`` or ``[B, M]`` integer
            tensor: points already selected (Sener & Savarese's labelled pool); then
            ``k`` *new* points are returned and the ``init`` points never are.
            With an int / random start the start is ``indices[..., 0]``.
        projection_dim: select on a seeded sparse random projection of the rows
            (:func:`kcenter_projection_matrix`, Li et al.'s very sparse projection, as
            anomalib and the PatchCore authors do) to this many dimensions.
        seed: seed of the projection and of ``init="random"`` (None: torch's global RNG).
        backend: ``None`` (CPU tensors: C++ kernel; CUDA: Triton), ``"reference"``,
            ``"cpu"`` or ``"triton"``.
        progress: show a tqdm progress bar over the picks.

    Returns:
        :class:`KCenterResult` ``(indices [..., k] int64, radius [...] float32)``.
        The picks are identical on every backend (module docstring: the distance is
        bit-reproducible), ties going to the lowest index.

    Peak memory (beyond ``x``): C++ backend ``O(B*N)`` state (8 bytes per point, 80
    with the rotated copy) plus, for large problems (``N*C >= 2^22``, or ``N >= 16384``
    with a useful PCA rotation), a float16 copy of the rows (``B*N*(C+32)*2`` bytes) that is read
    instead of ``x``; Triton ``O(B*(N+k))``; the reference ``B*N*C`` float64 per step.
    ``projection_dim`` adds the projected rows (``B*N*projection_dim`` float32),
    ``"cosine"`` the normalised rows (float32). No ``N x N`` matrix is ever formed.

    Speed (C++): each new center reads only what the triangle inequality and proved
    error bounds cannot settle: clusters far from it are skipped, the other points are
    first tested on the leading PCA coordinates of an fp16 copy kept inline in the
    cluster lists, then on the copy's row (stopping as soon as the partial sum proves
    the point stays), and only points that may move get the exact distance.

    Bad input: ``k < 1``, ``k`` larger than the points left, ``N == 0``, non-finite
    rows, zero rows under ``"cosine"`` and ``init`` out of range raise ``ValueError``
    naming the argument. Duplicate rows are fine (distinct indices, distance 0).
    """
    check_tensor(_OP, "x", x, ndim=(2, 3), dtypes=FLOAT_DTYPES)
    check_choice(_OP, "metric", metric, _METRICS)
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"fastad.ops.{_OP}: `k` must be an int, got {describe(k)}")
    n = x.shape[-2]
    if n == 0 or x.shape[-1] == 0:
        raise ValueError(f"fastad.ops.{_OP}: `x` must have at least one point and one feature, got {describe(x)}")
    if k < 1 or k > n:
        raise ValueError(f"fastad.ops.{_OP}: `k` must be in [1, N={n}], got {k} (x: {describe(x)})")
    if projection_dim is not None and (isinstance(projection_dim, bool) or not isinstance(projection_dim, int)
                                       or projection_dim < 1):
        raise ValueError(f"fastad.ops.{_OP}: `projection_dim` must be None or an int >= 1, got {projection_dim!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"fastad.ops.{_OP}: `seed` must be None or an int, got {describe(seed)}")
    mode, init_t = _init_arg(init)
    indices, radius = torch.ops.fastad.kcenter_greedy(
        x, k, metric, init_t, mode, projection_dim, seed, backend, bool(progress))
    return KCenterResult(indices, radius)


def kcenter_greedy_reference(
    x: torch.Tensor,
    k: int,
    metric: str = "l2",
    init: Union[int, str, torch.Tensor] = 0,
    projection_dim: Optional[int] = None,
    seed: Optional[int] = None,
    progress: bool = False,
) -> KCenterResult:
    """The definition: a plain torch loop evaluating every distance every step."""
    return kcenter_greedy(x, k, metric, init, projection_dim, seed, backend="reference", progress=progress)


def kcenter_projection_matrix(in_dim: int, out_dim: int, seed: Optional[int] = None,
                              generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The ``[out_dim, in_dim]`` float32 sparse random projection used by ``projection_dim``.

    Li, Hastie & Church's very sparse projection (as scikit-learn's and anomalib's
    ``SparseRandomProjection``): density ``1/sqrt(in_dim)``, entries ``+-sqrt(1/density
    / out_dim)`` with probability ``density/2`` each, else 0. Drawn on the CPU from
    ``seed`` (or ``generator``, or torch's global generator), so it is the same on
    every device.
    """
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(seed)
    density = 1.0 / math.sqrt(in_dim)
    u = torch.rand(out_dim, in_dim, generator=generator, dtype=torch.float64)
    v = math.sqrt(1.0 / density) / math.sqrt(out_dim)
    r = torch.where(u < density / 2, -v, torch.where(u < density, v, 0.0))
    return r.to(torch.float32)


# --------------------------------------------------------------------- helpers
def _init_arg(init: object) -> tuple[int, torch.Tensor]:
    if isinstance(init, str):
        if init != "random":
            raise ValueError(f"fastad.ops.{_OP}: `init` must be an int, 'random' or an index tensor, got {init!r}")
        return _INIT_RANDOM, torch.zeros(0, dtype=torch.int64)
    if isinstance(init, bool):
        raise TypeError(f"fastad.ops.{_OP}: `init` must be an int, 'random' or an index tensor, got {init!r}")
    if isinstance(init, int):
        return _INIT_INDEX, torch.tensor([init], dtype=torch.int64)
    if isinstance(init, torch.Tensor):
        if init.dtype.is_floating_point or init.dtype.is_complex or init.dtype == torch.bool:
            raise TypeError(f"fastad.ops.{_OP}: `init` must hold integer indices, got {describe(init)}")
        if init.dim() == 0:
            return _INIT_INDEX, init.reshape(1).to(torch.int64)
        if init.dim() > 2:
            raise ValueError(f"fastad.ops.{_OP}: `init` must be 0-d, [M] or [B, M], got {describe(init)}")
        return _INIT_CENTERS, init.to(torch.int64)
    raise TypeError(f"fastad.ops.{_OP}: `init` must be an int, 'random' or an index tensor, got {describe(init)}")


def _prepare(x: torch.Tensor, k: int, metric: str, init: torch.Tensor, mode: int,
             projection_dim: Optional[int], seed: Optional[int]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Rows to select on ([B, N, C'], contiguous), forced centers [B, M] (CPU int64)
    and the number of argmax picks. Shared by every backend, so that the projection,
    the normalisation and the random start are the same bits for all."""
    check_finite(_OP, "x", x)
    xb = x if x.dim() == 3 else x.unsqueeze(0)
    B, N, C = xb.shape
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    if projection_dim is not None:
        r = kcenter_projection_matrix(C, projection_dim, generator=gen).to(x.device)
        xb = torch.matmul(xb.float(), r.t())
    if metric == "cosine":
        xb = _normalise_rows(xb)
    xb = xb.contiguous()

    init = init.cpu()
    if mode == _INIT_RANDOM:
        forced = torch.randint(N, (B, 1), generator=gen, dtype=torch.int64)
    elif mode == _INIT_INDEX:
        forced = init.reshape(1, 1).expand(B, 1)
    else:
        if init.dim() == 2 and init.shape[0] != B:
            raise ValueError(f"fastad.ops.{_OP}: `init` of shape [B, M] must have B = {B} rows, got {describe(init)}")
        forced = init.reshape(1, -1).expand(B, -1) if init.dim() == 1 else init
    forced = forced.contiguous()
    if forced.numel() and (int(forced.min()) < 0 or int(forced.max()) >= N):
        raise ValueError(f"fastad.ops.{_OP}: `init` indices must be in [0, N={N}), got values in "
                         f"[{int(forced.min())}, {int(forced.max())}]")
    if mode == _INIT_CENTERS:
        picks = k
        if forced.shape[1]:
            srt = forced.sort(dim=1).values
            distinct = 1 + (srt[:, 1:] != srt[:, :-1]).sum(dim=1)
            left = N - int(distinct.max())
            if k > left:
                raise ValueError(f"fastad.ops.{_OP}: `k`={k} exceeds the {left} points not in `init` "
                                 f"(N={N}, {int(distinct.max())} distinct init indices)")
    else:
        picks = k - 1
    return xb, forced, picks


def _normalise_rows(xb: torch.Tensor) -> torch.Tensor:
    out = torch.empty(xb.shape, dtype=torch.float32, device=xb.device)
    rows = xb.reshape(-1, xb.shape[-1])
    flat = out.view(-1, xb.shape[-1])
    step = 16384  # bounds the float64 temporaries
    for i in range(0, rows.shape[0], step):
        r = rows[i:i + step].double()
        nrm = torch.linalg.vector_norm(r, dim=1, keepdim=True)
        if bool((nrm == 0).any()):
            raise ValueError(f"fastad.ops.{_OP}: metric='cosine' needs non-zero rows; `x` has a zero row")
        flat[i:i + step] = r / nrm
    return out


def _canonical_dist(xf: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """D(x, c) for xf [B, N, C] float32 and c [B, C] float32 -> [B, N] float32."""
    d = (xf - c.unsqueeze(1)).double()
    t = d * d
    p = 1 << max(0, (t.shape[-1] - 1).bit_length())
    if p > t.shape[-1]:
        t = torch.nn.functional.pad(t, (0, p - t.shape[-1]))
    while t.shape[-1] > 1:
        t = t[..., 0::2] + t[..., 1::2]
    return t[..., 0].sqrt().float()


def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc="k-center greedy", unit="pick")


def _select_reference(xb: torch.Tensor, forced: torch.Tensor, picks: int,
                      progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    B, N, _ = xb.shape
    xf = xb.float()
    dev = xb.device
    forced = forced.to(dev)
    rows = torch.arange(B, device=dev)
    mind = torch.full((B, N), math.inf, dtype=torch.float32, device=dev)
    selected = torch.zeros((B, N), dtype=torch.bool, device=dev)
    for j in range(forced.shape[1]):
        c = forced[:, j]
        mind = torch.minimum(mind, _canonical_dist(xf, xf[rows, c]))
        selected[rows, c] = True
    out = []
    with _progress_bar(picks, progress) as bar:
        for _ in range(picks):
            s = torch.where(selected, -math.inf, mind).argmax(dim=1)  # first maximal index
            out.append(s)
            selected[rows, s] = True
            mind = torch.minimum(mind, _canonical_dist(xf, xf[rows, s]))
            bar.update(1)
    idx = torch.stack(out, dim=1) if out else torch.zeros((B, 0), dtype=torch.int64, device=dev)
    return idx, mind.amax(dim=1)


def _row_mean(xb: torch.Tensor) -> torch.Tensor:
    """[B, C] float32 mean of the rows, in float64 over bounded chunks."""
    B, N, C = xb.shape
    acc = torch.zeros(B, C, dtype=torch.float64)
    for i in range(0, N, 8192):
        acc += xb[:, i:i + 8192].double().sum(dim=1)
    return (acc / N).float()


def _pca_basis(xb: torch.Tensor, mu: torch.Tensor, m: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Leading principal directions for the C++ kernel's approximate copy.

    Returns U [B, C, m'] float64 with orthonormal columns (m' = 0 when the top m
    directions hold less than half of the variance: nothing to gain) and sig [B],
    bounding the distortion of y = [U^T v ; v - U U^T v] for the computed U. Any U
    keeps the selection exact; a good one lets the scan of a row stop after its first
    coordinates. Randomized subspace iteration on up to 16,384 sampled rows,
    deterministic.
    """
    B, N, C = xb.shape
    m = min(m, C // 4)
    if m < 4:
        return torch.zeros(B, C, 0, dtype=torch.float64), torch.ones(B)
    rows = torch.linspace(0, N - 1, min(N, 16384)).round().long()
    xs = xb[:, rows].float() - mu.unsqueeze(1)
    q = torch.randn(B, C, m, generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        q = torch.linalg.qr(xs.transpose(1, 2) @ (xs @ q)).Q
    held = (xs @ q).square().sum(dim=(1, 2)) / xs.square().sum(dim=(1, 2)).clamp_min(1e-30)
    if bool((held < 0.5).all()):
        return torch.zeros(B, C, 0, dtype=torch.float64), torch.ones(B)
    u = torch.linalg.qr(q.double()).Q
    # ||y||^2 = ||v||^2 + v^T U (U^T U - I) U^T v for the computed U.
    gram = u.transpose(1, 2) @ u - torch.eye(m, dtype=torch.float64)
    sig = (1.0 + 4.0 * torch.linalg.matrix_norm(gram)).sqrt() * (1 + 1e-9)
    return u.contiguous(), sig.float().clamp(min=1.0).contiguous()


def _select_cpu(xb: torch.Tensor, forced: torch.Tensor, picks: int, progress: bool,
                storage: str = "auto", rotate: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    B, N, C = xb.shape
    mu = _row_mean(xb)
    if rotate is None:  # worth it for large problems read many times (not per-image ones)
        rotate = storage != "input" and C >= 32 and N >= 16384 and N * picks >= 1 << 22
    if rotate:
        basis, sig = _pca_basis(xb, mu)
    else:
        basis, sig = torch.zeros(B, C, 0, dtype=torch.float64), torch.ones(B)
    sel = _ext._C.KCenter(_ext.as_array(xb), _ext.dtype_code(xb), forced.numpy(), picks, _STORAGE[storage],
                          mu.numpy(), basis.numpy(), sig.numpy())
    nthreads = _ext.num_threads()
    if progress:
        chunk = max(1, picks // 200)
        with _progress_bar(picks, True) as bar:
            done = sel.advance(0, nthreads)
            while done < picks:
                now = sel.advance(chunk, nthreads)
                bar.update(now - done)
                done = now
    else:
        sel.advance(picks, nthreads)
    idx = torch.empty((B, picks), dtype=torch.int64)
    radius = torch.empty(B, dtype=torch.float32)
    sel.result(_ext.as_array(idx), _ext.as_array(radius))
    return idx, radius


def _select_triton(xb: torch.Tensor, forced: torch.Tensor, picks: int,
                   progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from fastad.kernels.kcenter import kcenter_select

    return kcenter_select(xb, forced.to(xb.device), picks, progress)


def _run(x: torch.Tensor, k: int, metric: str, init: torch.Tensor, mode: int, projection_dim: Optional[int],
         seed: Optional[int], backend: Optional[str], progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    name = resolve_backend(_OP, backend, x.device, _BACKENDS)
    xb, forced, picks = _prepare(x, k, metric, init, mode, projection_dim, seed)
    if name == "cpu":
        idx, radius = _select_cpu(xb, forced, picks, progress)
    elif name == "triton":
        idx, radius = _select_triton(xb, forced, picks, progress)
    else:
        idx, radius = _select_reference(xb, forced, picks, progress)
    idx = idx.to(x.device)
    if mode != _INIT_CENTERS:
        idx = torch.cat([forced.to(x.device), idx], dim=1)
    radius = radius.to(x.device)
    if metric == "cosine":
        radius = (radius.double() ** 2 / 2).float()
    if x.dim() == 2:
        idx, radius = idx[0], radius[0]
    return idx, radius


# ------------------------------------------------------------ torch.library
@torch.library.custom_op("fastad::kcenter_greedy", mutates_args=())
def _kcenter_op(x: torch.Tensor, k: int, metric: str, init: torch.Tensor, init_mode: int,
                projection_dim: Optional[int], seed: Optional[int], backend: Optional[str],
                progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _run(x, k, metric, init, init_mode, projection_dim, seed, backend, progress)


@_kcenter_op.register_fake
def _(x, k, metric, init, init_mode, projection_dim, seed, backend, progress):
    batch = x.shape[:-2]
    return (x.new_empty((*batch, k), dtype=torch.int64), x.new_empty(batch, dtype=torch.float32))
