"""fastad.ops.sparsemax and fastad.ops.dict_lookup: every backend against the
reference (the definition), the reference against independent implementations,
ties, masks, degenerate inputs, errors and gradients."""
import importlib
import math

import entmax
import numpy as np
import pytest
import torch

import fastad
from fastad import _ext
from fastad._memory import peak_memory

from conftest import requires_cpu_ext, requires_triton

smx = importlib.import_module("fastad.ops.sparsemax")

HALF_TOL = {torch.float16: dict(atol=5e-3, rtol=5e-3), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def gen(seed):
    return torch.Generator().manual_seed(seed)


def close(a, b, dtype=torch.float32, atol=2e-5, rtol=1e-4):
    tol = HALF_TOL.get(dtype, dict(atol=atol, rtol=rtol))
    torch.testing.assert_close(a.float(), b.float(), **tol)


# ---------------------------------------------------------------------------
# sparsemax: the reference


def test_reference_known_values():
    # z - max = (0, -0.2, -2): support 2, tau = (-0.2 - 1) / 2 = -0.6
    y = smx.sparsemax_reference(torch.tensor([1.0, 0.8, -1.0]))
    torch.testing.assert_close(y, torch.tensor([0.6, 0.4, 0.0]))
    torch.testing.assert_close(smx.sparsemax_reference(torch.tensor([[2.0, 2.0, 2.0]])), torch.full((1, 3), 1 / 3))
    torch.testing.assert_close(smx.sparsemax_reference(torch.tensor([5.0, -math.inf, 3.0])),
                               torch.tensor([1.0, 0.0, 0.0]))


@pytest.mark.parametrize("shape,dim", [((4, 9), -1), ((3, 5, 6), 1), ((7, 2), 0), ((2, 3000), -1)])
def test_reference_matches_entmax_and_lies_on_the_simplex(shape, dim):
    x = torch.randn(*shape, generator=gen(1), dtype=torch.float64) * 2
    y = smx.sparsemax_reference(x, dim)
    torch.testing.assert_close(y, entmax.sparsemax(x, dim=dim))
    assert bool((y >= 0).all())
    torch.testing.assert_close(y.sum(dim), torch.ones(y.sum(dim).shape, dtype=torch.float64))


# ---------------------------------------------------------------------------
# sparsemax: fast backends


def special_rows(L):
    """Rows that stress the threshold: ties, -inf, huge and tiny scales, a
    support of the whole row."""
    g = gen(2)
    r = torch.randn(L, generator=g)
    rows = [r, r * 1e4, r * 1e-6, torch.zeros(L), torch.full((L,), 3.5), torch.rand(L, generator=g) * 0.5]
    tie = r.clone()
    tie[L // 3] = tie[L // 2] = r.max() + 0.1
    rows.append(tie)
    masked = r.clone()
    masked[1::2] = -math.inf
    rows.append(masked)
    return torch.stack(rows)


@requires_cpu_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,dim", [((1, 1), -1), ((3, 7), -1), ((5, 513), -1), ((4, 6, 9), 1), ((9, 3), 0)])
def test_sparsemax_cpu_matches_reference(cpu_isa, dtype, shape, dim):
    x = (torch.randn(*shape, generator=gen(3)) * 3).to(dtype)
    y = fastad.ops.sparsemax(x, dim, backend="cpu")
    assert y.dtype == dtype and y.shape == x.shape
    close(y, smx.sparsemax_reference(x, dim), dtype, atol=1e-6)


@requires_cpu_ext
@pytest.mark.parametrize("L", [1, 2, 7, 100_000])
def test_sparsemax_cpu_special_and_long_rows(cpu_isa, L):
    x = special_rows(L)
    y = fastad.ops.sparsemax(x, backend="cpu")
    close(y, smx.sparsemax_reference(x), atol=1e-6)
    torch.testing.assert_close(y.double().sum(-1), torch.ones(x.shape[0], dtype=torch.float64), atol=1e-4, rtol=0)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("L", [1, 7, 513, 3000])
def test_sparsemax_triton_matches_reference(dtype, L):
    x = special_rows(L).to(dtype)
    close(fastad.ops.sparsemax(x, backend="triton"), smx.sparsemax_reference(x), dtype, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_sparsemax_rejects_nan_inf_and_all_masked_rows(backend):
    if not fastad.backends()[backend].available:
        pytest.skip(fastad.backends()[backend].reason)
    x = torch.randn(3, 10, generator=gen(4))
    for bad, msg in ((math.nan, "NaN"), (math.inf, r"\+inf")):
        y = x.clone()
        y[1, 4] = bad
        with pytest.raises(ValueError, match=msg):
            fastad.ops.sparsemax(y, backend=backend)
    y = x.clone()
    y[2] = -math.inf
    with pytest.raises(ValueError, match="-inf everywhere"):
        fastad.ops.sparsemax(y, backend=backend)


def test_sparsemax_argument_errors_and_empty_inputs():
    with pytest.raises(TypeError, match="sparsemax.*`x`.*int64"):
        fastad.ops.sparsemax(torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="at least 1 dimension"):
        fastad.ops.sparsemax(torch.tensor(1.0))
    with pytest.raises(ValueError, match="`dim` 2 is out of range"):
        fastad.ops.sparsemax(torch.ones(2, 3), dim=2)
    with pytest.raises(TypeError, match="float64 runs on backend='reference'"):
        fastad.ops.sparsemax(torch.ones(2, 3, dtype=torch.float64), backend="cpu")
    for shape in ((0, 5), (3, 0)):
        y = fastad.ops.sparsemax(torch.ones(shape))
        assert y.shape == shape


def test_sparsemax_gradcheck_float64():
    x = torch.randn(3, 11, generator=gen(5), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: smx.sparsemax_reference(t, -1), (x,))
    assert torch.autograd.gradcheck(lambda t: fastad.ops.sparsemax(t, 0), (x,))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_sparsemax_fast_gradients_match_reference(backend):
    if not fastad.backends()[backend].available:
        pytest.skip(fastad.backends()[backend].reason)
    x = (torch.randn(4, 6, 9, generator=gen(6)) * 2).requires_grad_()
    g = torch.randn(4, 6, 9, generator=gen(7))
    (ga,) = torch.autograd.grad((fastad.ops.sparsemax(x, 1, backend=backend) * g).sum(), x)
    (gb,) = torch.autograd.grad((smx.sparsemax_reference(x, 1) * g).sum(), x)
    close(ga, gb, atol=1e-6)


# ---------------------------------------------------------------------------
# dict_lookup: helpers


def lookup_inputs(B, N, M, C, Cv, dtype=torch.float32, batched_keys=False, batched_values=False, seed=0):
    g = gen(seed)
    q = torch.randn(B, N, C, generator=g)
    k = torch.randn(B if batched_keys else 1, M, C, generator=g)
    v = torch.randn(B if batched_values else 1, M, Cv, generator=g)
    k = k if batched_keys else k[0]
    v = v if batched_values else v[0]
    return q.to(dtype), k.to(dtype), v.to(dtype)


def make_mask(kind, B, M, seed=0):
    if kind is None:
        return None
    g = gen(seed)
    m = torch.rand((M,) if kind == "shared" else (B, M), generator=g) > 0.4
    m[..., 0] = True
    return m


def dense_weights(lw, M):
    """LookupWeights -> dense [..., M] weights."""
    w = torch.zeros(*lw.indices.shape[:-1], M + 1, dtype=lw.weights.dtype)
    return w.scatter_add(-1, torch.where(lw.indices < 0, M, lw.indices), lw.weights)[..., :M]


def check_weight_format(lw):
    ix, w = lw.indices, lw.weights
    assert ix.dtype == torch.int64
    assert bool(((ix >= 0) == (w > 0)).all())
    assert bool((w[..., :-1] >= w[..., 1:]).all())
    torch.testing.assert_close(w.double().sum(-1), torch.ones(w.shape[:-1], dtype=torch.float64), atol=1e-5, rtol=0)


def check_lookup(backend, q, k, v, mode, mask=None, scale=None, dtype=torch.float32):
    out, lw = fastad.ops.dict_lookup(q, k, v, scale, mode, mask, return_weights=True, backend=backend)
    ref, rlw = smx.dict_lookup_reference(q, k, v, scale, mode, mask, return_weights=True)
    assert out.dtype == q.dtype and out.shape == ref.shape
    close(out, ref, dtype, atol=1e-4)
    check_weight_format(lw)
    M = k.shape[-2]
    close(dense_weights(lw, M), dense_weights(rlw, M), atol=1e-5)
    return lw, rlw


# ---------------------------------------------------------------------------
# dict_lookup: the reference


@pytest.mark.parametrize("mode", ["sparsemax", "softmax", "argmax"])
def test_lookup_reference_matches_independent_computation(mode):
    q, k, v = lookup_inputs(2, 5, 40, 8, 3, torch.float64)
    mask = make_mask("batched", 2, 40)
    out, lw = smx.dict_lookup_reference(q, k, v, None, mode, mask, return_weights=True)
    z = (q @ k.T) * 8 ** -0.5
    z = z.masked_fill(~mask[:, None, :], -math.inf)
    if mode == "sparsemax":
        w = entmax.sparsemax(z, dim=-1)
    elif mode == "softmax":
        w = torch.softmax(z, dim=-1)
    else:
        w = torch.nn.functional.one_hot(z.argmax(-1), 40).double()
    torch.testing.assert_close(out, w @ v)
    torch.testing.assert_close(dense_weights(lw, 40), w)
    check_weight_format(lw)
    if mode == "argmax":
        assert lw.indices.shape[-1] == 1


# ---------------------------------------------------------------------------
# dict_lookup: fast backends against the reference

CPU_SHAPES = [(1, 1, 1, 1, 1), (2, 7, 13, 5, 3), (1, 37, 130, 33, 17), (2, 20, 513, 64, 8), (1, 13, 70, 600, 5)]


@requires_cpu_ext
@pytest.mark.parametrize("mode", ["sparsemax", "softmax", "argmax"])
@pytest.mark.parametrize("shape", CPU_SHAPES)
def test_lookup_cpu_matches_reference(cpu_isa, mode, shape):
    for i, (bk, bv, mk) in enumerate([(False, False, None), (True, False, "shared"), (False, True, "batched")]):
        q, k, v = lookup_inputs(*shape, batched_keys=bk, batched_values=bv, seed=i)
        check_lookup("cpu", q, k, v, mode, make_mask(mk, shape[0], shape[2], seed=i))


@requires_cpu_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["sparsemax", "softmax", "argmax"])
def test_lookup_cpu_half_inputs(cpu_isa, dtype, mode):
    q, k, v = lookup_inputs(2, 9, 100, 24, 5, dtype, batched_keys=True)
    out = fastad.ops.dict_lookup(q, k, v, mode=mode, backend="cpu")
    close(out, smx.dict_lookup_reference(q, k, v, mode=mode), dtype)


@requires_cpu_ext
@pytest.mark.parametrize("threads", [1, 2])
def test_lookup_cpu_many_rows_and_threads(threads):
    """More rows than one packed chunk (2304) and keys split between threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        q, k, v = lookup_inputs(1, 2400, 200, 8, 4, seed=9)
        for mode in ("sparsemax", "softmax", "argmax"):
            check_lookup("cpu", q, k, v, mode)
    finally:
        torch.set_num_threads(before)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mode", ["sparsemax", "softmax", "argmax"])
def test_lookup_triton_matches_reference(dtype, mode):
    q, k, v = lookup_inputs(2, 9, 50, 16, 5, batched_keys=True, seed=3)
    mask = make_mask("batched", 2, 50, seed=3)
    out = fastad.ops.dict_lookup(q.to(dtype), k.to(dtype), v.to(dtype), mode=mode, key_mask=mask, backend="triton")
    close(out, smx.dict_lookup_reference(q.to(dtype), k.to(dtype), v.to(dtype), mode=mode, key_mask=mask), dtype,
          atol=1e-4)
    if dtype == torch.float32:
        check_lookup("triton", q, k, v, mode, mask)
        for shape in ((1, 1, 1, 1, 1), (1, 3, 7, 5, 2)):
            check_lookup("triton", *lookup_inputs(*shape), mode)


def fast_backends():
    return [b for b in ("cpu", "triton") if fastad.backends()[b].available]


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_lookup_exact_when_the_support_outgrows_the_candidates(backend):
    """Small logits spread the support over more than 32 keys for some rows: those
    rows are recomputed in full (masked keys still excluded), others stay sparse."""
    if not fastad.backends()[backend].available:
        pytest.skip(fastad.backends()[backend].reason)
    q, k, v = lookup_inputs(2, 6, 90, 8, 3, batched_keys=True, seed=5)
    q[:, ::2] *= 0.01  # rows 0, 2, 4: near-uniform weights
    mask = make_mask("batched", 2, 90, seed=5)
    lw, rlw = check_lookup(backend, q, k, v, "sparsemax", mask)
    support = (lw.indices >= 0).sum(-1)
    assert int(support[:, ::2].min()) > smx.TOPK and int(support[:, 1::2].max()) < smx.TOPK
    assert lw.indices.shape[-1] == rlw.indices.shape[-1]


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_lookup_ties_exact_integer_logits(backend):
    """Integer data make the logits exact in fp32: tied keys share the weight in
    sparsemax, argmax takes the lowest tied key, 40 tied maxima exceed the 32
    candidates and still come out exact."""
    if not fastad.backends()[backend].available:
        pytest.skip(fastad.backends()[backend].reason)
    g = gen(6)
    k = torch.randint(-2, 3, (80, 6), generator=g).float()
    k[10] = k[3]
    k[40:80] = torch.tensor([3.0, 3, 3, 3, 3, 3])  # 40 identical keys
    q = torch.randint(-2, 3, (1, 5, 6), generator=g).float()
    q[0, 0] = torch.tensor([1.0, 1, 1, 1, 1, 1])  # best keys: the 40 copies
    q[0, 1] = k[3]
    v = torch.randn(80, 4, generator=g)
    for mode in ("sparsemax", "argmax"):
        lw, rlw = check_lookup(backend, q, k, v, mode, scale=0.5)
        torch.testing.assert_close(lw.indices, rlw.indices)
    _, lw = fastad.ops.dict_lookup(q, k, v, 0.5, "argmax", return_weights=True, backend=backend)
    assert int(lw.indices[0, 0, 0]) == 40 and int(lw.indices[0, 1, 0]) == 3


@requires_cpu_ext
def test_lookup_cpu_random_cases_against_float64_reference():
    """Random shapes, scales from 1e-3 (support of every key) to 30 (one key),
    integer data with ties, masks and thread counts, against the float64 definition."""
    rng = np.random.default_rng(17)
    before = torch.get_num_threads()
    try:
        for case in range(30):
            B, N, M = int(rng.integers(1, 4)), int(rng.integers(1, 30)), int(rng.integers(1, 200))
            C, Cv = int(rng.choice([1, 3, 8, 17, 300])), int(rng.integers(1, 7))
            q, k, v = lookup_inputs(B, N, M, C, Cv, batched_keys=bool(rng.random() < 0.5), seed=100 + case)
            if rng.random() < 0.3:
                q, k = q.round(), k.round()
            mask = None
            if rng.random() < 0.5:
                mask = torch.from_numpy(rng.random((B, M)) > rng.random() * 0.9)
                mask[:, int(rng.integers(M))] = True
            scale = float(10 ** rng.uniform(-3, 1.5))
            mode = str(rng.choice(["sparsemax", "sparsemax", "argmax", "softmax"]))
            torch.set_num_threads(int(rng.integers(1, 3)))
            out, lw = fastad.ops.dict_lookup(q, k, v, scale, mode, mask, return_weights=True, backend="cpu")
            ref, rlw = smx.dict_lookup_reference(q.double(), k.double(), v.double(), scale, mode, mask,
                                                 return_weights=True)
            torch.testing.assert_close(out.double(), ref, atol=1e-3, rtol=1e-3, msg=f"case {case}")
            torch.testing.assert_close(dense_weights(lw, M).double(), dense_weights(rlw, M), atol=1e-4, rtol=0,
                                       msg=f"case {case}")
    finally:
        torch.set_num_threads(before)


def test_lookup_2d_query_empty_query_and_default_scale():
    q, k, v = lookup_inputs(1, 5, 30, 16, 3)
    for backend in ["reference"] + fast_backends():
        out, lw = fastad.ops.dict_lookup(q[0], k, v, return_weights=True, backend=backend)
        assert out.shape == (5, 3) and lw.indices.dim() == 2
        close(out, fastad.ops.dict_lookup(q, k, v, scale=0.25, backend="reference")[0], atol=1e-4)
        empty = fastad.ops.dict_lookup(q[:, :0], k, v, backend=backend)
        assert empty.shape == (1, 0, 3)


# ---------------------------------------------------------------------------
# dict_lookup: bad input


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_lookup_rejects_nan_logits_and_fully_masked_items(backend):
    if not fastad.backends()[backend].available:
        pytest.skip(fastad.backends()[backend].reason)
    q, k, v = lookup_inputs(2, 4, 20, 8, 3)
    for mode in ("sparsemax", "softmax", "argmax"):
        qn = q.clone()
        qn[1, 2, 3] = math.nan
        with pytest.raises(ValueError, match="NaN or infinite"):
            fastad.ops.dict_lookup(qn, k, v, mode=mode, backend=backend)
        vn = v.clone()
        vn[7, 1] = math.inf
        with pytest.raises(ValueError, match="`values` contains NaN or infinite"):
            fastad.ops.dict_lookup(q, k, vn, mode=mode, backend=backend)
        mask = torch.ones(2, 20, dtype=torch.bool)
        mask[1] = False
        with pytest.raises(ValueError, match="masks every key of batch item 1"):
            fastad.ops.dict_lookup(q, k, v, mode=mode, key_mask=mask, backend=backend)
    # NaN in a masked key is ignored
    kn = k.clone()
    kn[5, 0] = math.nan
    mask = torch.ones(20, dtype=torch.bool)
    mask[5] = False
    close(fastad.ops.dict_lookup(q, kn, v, key_mask=mask, backend=backend),
          fastad.ops.dict_lookup(q, k, v, key_mask=mask, backend="reference"), atol=1e-4)


def test_lookup_argument_errors():
    q, k, v = lookup_inputs(2, 4, 20, 8, 3)
    f = fastad.ops.dict_lookup
    with pytest.raises(ValueError, match=r"`keys` has no entries \(M = 0"):
        f(q, k[:0], v[:0])
    with pytest.raises(ValueError, match="`keys` must have C = 8"):
        f(q, k[:, :5], v)
    with pytest.raises(ValueError, match="`values` must have M = 20"):
        f(q, k, v[:7])
    with pytest.raises(ValueError, match="`keys` must have batch size 2 like `query` \\(or 1"):
        f(q, k.expand(3, 20, 8), v)
    with pytest.raises(TypeError, match="`keys` and `query` must have one dtype"):
        f(q, k.double(), v)
    with pytest.raises(ValueError, match="`mode` must be one of"):
        f(q, k, v, mode="entmax")
    with pytest.raises(ValueError, match="`scale` must be a finite float"):
        f(q, k, v, scale=math.nan)
    with pytest.raises(TypeError, match="`key_mask` must have dtype in \\(bool\\)"):
        f(q, k, v, key_mask=torch.ones(20))
    with pytest.raises(ValueError, match=r"`key_mask` must have shape \(20,\) or \(2, 20\)"):
        f(q, k, v, key_mask=torch.ones(3, 20, dtype=torch.bool))
    with pytest.raises(ValueError, match="`query` must have 2 or 3 dimensions"):
        f(q[0, 0], k, v)
    with pytest.raises(fastad.BackendUnavailableError, match="no 'cuda' backend"):
        f(q, k, v, backend="cuda")


@requires_cpu_ext
def test_bindings_recheck_arguments():
    C = _ext._C
    q = np.zeros((1, 3, 4), np.float32)
    k = np.zeros((1, 5, 4), np.float32)
    vals, idx = np.zeros((1, 3, 2), np.float32), np.zeros((1, 3, 2), np.int64)
    with pytest.raises(ValueError, match="dict_topk: 'keys' has 3 channels"):
        C.dict_topk(q, np.zeros((1, 5, 3), np.float32), None, 0, 1.0, 2, vals, idx, 1)
    with pytest.raises(ValueError, match="dict_topk: argument 'key_mask' must have shape"):
        C.dict_topk(q, k, np.ones((1, 4), np.bool_), 0, 1.0, 2, vals, idx, 1)
    with pytest.raises(ValueError, match=r"dict_topk: argument 'vals' must have shape \(1, 3, 3\)"):
        C.dict_topk(q, k, None, 0, 1.0, 3, vals, idx, 1)
    with pytest.raises(ValueError, match="dict_gather: argument 'idx' holds 5"):
        C.dict_gather(vals, np.full((1, 3, 2), 5, np.int64), np.zeros((1, 5, 2), np.float32), 0,
                      np.zeros((1, 3, 2), np.float32), 1)
    with pytest.raises(ValueError, match="sparsemax_rows: argument 'x' must hold float32"):
        C.sparsemax_rows(np.zeros((2, 3), np.float64), 0, np.zeros((2, 3), np.float32), 1)


# ---------------------------------------------------------------------------
# dict_lookup: gradients


@pytest.mark.parametrize("mode", ["sparsemax", "softmax", "argmax"])
def test_lookup_gradcheck_float64(mode):
    q, k, v = lookup_inputs(2, 3, 12, 4, 2, torch.float64, batched_keys=True, seed=11)
    q = (q * 2).requires_grad_()
    k.requires_grad_()
    v.requires_grad_()
    mask = make_mask("shared", 2, 12, seed=11)
    ref = smx.dict_lookup_reference
    # full Jacobians for the sparse modes; softmax (dense, many tiny calls) in fast mode
    fast = mode == "softmax"
    if mode == "argmax":  # piecewise constant in q and k
        assert torch.autograd.gradcheck(lambda t: ref(q, k, t, None, mode, mask), (v,))
        assert torch.autograd.gradcheck(lambda t: fastad.ops.dict_lookup(q, k, t, None, mode, mask), (v,))
        return
    assert torch.autograd.gradcheck(lambda a, b, c: ref(a, b, c, None, mode, mask), (q, k, v), fast_mode=fast)
    # the op's own backward (sparse, or by recomputation for softmax), float64 on the reference backend
    assert torch.autograd.gradcheck(lambda a, b, c: fastad.ops.dict_lookup(a, b, c, None, mode, mask), (q, k, v),
                                    fast_mode=fast)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("mode", ["sparsemax", "softmax", "argmax"])
def test_lookup_fast_gradients_match_reference(backend, mode):
    if not fastad.backends()[backend].available:
        pytest.skip(fastad.backends()[backend].reason)
    for bk, bv, mk in [(False, False, None), (True, False, "shared"), (False, True, "batched")]:
        q, k, v = lookup_inputs(2, 7, 45, 6, 5, batched_keys=bk, batched_values=bv, seed=12)
        q = (q * 1.5).requires_grad_()
        k.requires_grad_()
        v.requires_grad_()
        mask = make_mask(mk, 2, 45, seed=12)
        g = torch.randn(2, 7, 5, generator=gen(13))
        want = torch.autograd.grad((smx.dict_lookup_reference(q, k, v, None, mode, mask) * g).sum(), (q, k, v),
                                   allow_unused=True)  # argmax: no gradient to q and k
        got = torch.autograd.grad((fastad.ops.dict_lookup(q, k, v, None, mode, mask, backend=backend) * g).sum(),
                                  (q, k, v))
        for a, b, t in zip(got, want, (q, k, v)):
            close(a, torch.zeros_like(t) if b is None else b, atol=1e-5)


@requires_cpu_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lookup_cpu_half_gradients(dtype):
    q, k, v = (t.requires_grad_() for t in lookup_inputs(1, 6, 50, 8, 4, dtype, seed=14))
    got = torch.autograd.grad(fastad.ops.dict_lookup(q, k, v, backend="cpu").float().pow(2).sum(), (q, k, v))
    want = torch.autograd.grad(smx.dict_lookup_reference(q, k, v).float().pow(2).sum(), (q, k, v))
    for a, b in zip(got, want):
        assert a.dtype == dtype
        close(a, b, dtype)


def test_ops_work_under_torch_compile_fullgraph():
    q, k, v = (t.requires_grad_() for t in lookup_inputs(2, 5, 40, 8, 3, seed=15))

    def f(q, k, v):
        out, lw = fastad.ops.dict_lookup(q, k, v, return_weights=True)
        s = fastad.ops.dict_lookup(q, k, v, mode="softmax") + fastad.ops.dict_lookup(q, k, v, mode="argmax")
        return (out + s).sum() + fastad.ops.sparsemax(q, dim=1).pow(2).sum() + lw.weights.sum()

    torch._dynamo.reset()
    # aot_eager: dynamo must capture one graph and AOT autograd trace the fake
    # kernels and backward ops (inductor's code generation adds nothing here)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    want = f(q, k, v)
    close(got, want)
    g1 = torch.autograd.grad(got, (q, k, v))
    g2 = torch.autograd.grad(want, (q, k, v))
    for a, b in zip(g1, g2):
        close(a, b)


@requires_cpu_ext
def test_lookup_cpu_peak_memory_is_not_n_by_m():
    """The fused path keeps O(N k) state: far below the N x M logits (64 MiB here)."""
    q, k, v = lookup_inputs(1, 512, 32768, 16, 4, seed=16)
    logits_bytes = 512 * 32768 * 4
    for mode in ("sparsemax", "softmax", "argmax"):
        _, peak = peak_memory(lambda: fastad.ops.dict_lookup(q, k, v, mode=mode, backend="cpu"))
        if peak is None:
            pytest.skip("peak memory not measurable here")
        assert peak < logits_bytes / 4, (mode, peak)


_COMPILE_SCRIPT = r"""
import importlib, triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
tk = importlib.import_module("fastad.kernels.sparsemax")
target = GPUTarget("cuda", 90, 32)
for dt in ("fp32", "fp16"):
    ieee = dt == "fp32"
    common = {"N": "i32", "M": "i32", "C": "i32", "scale": "fp32", "mask_ptr": "*i8", "flag_ptr": "*i32"}
    jobs = [
        (tk._topk_kernel, dict(common, q_ptr=f"*{dt}", k_ptr=f"*{dt}", vals_ptr="*fp32", idx_ptr="*i32",
                               keys_per_split="i32", k_batch_stride="i32", mask_batch_stride="i32"),
         dict(HAS_MASK=True, IEEE=ieee, K=32, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)),
        (tk._softmax_kernel, dict(common, q_ptr=f"*{dt}", k_ptr=f"*{dt}", v_ptr=f"*{dt}", out_ptr="*fp32",
                                  lse_ptr="*fp32", Cv="i32", k_batch_stride="i32", v_batch_stride="i32",
                                  mask_batch_stride="i32"),
         dict(HAS_MASK=True, IEEE=ieee, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, BLOCK_D=256)),
        (tk._sparsemax_rows_kernel, {"x_ptr": f"*{dt}", "y_ptr": "*fp32", "flag_ptr": "*i32", "L": "i32"},
         dict(BLOCK=4096)),
        (tk._gather_kernel, {"w_ptr": "*fp32", "idx_ptr": "*i64", "v_ptr": f"*{dt}", "out_ptr": "*fp32", "N": "i32",
                             "KK": "i32", "Cv": "i32", "v_batch_stride": "i32"}, dict(BLOCK_D=1024)),
    ]
    for fn, sig, const in jobs:
        sig = {name: ("constexpr" if name in const else sig[name]) for name in fn.arg_names}
        triton.compile(ASTSource(fn, sig, const), target=target, options={"num_warps": 8})
print("compiled")
"""


def test_triton_kernels_compile_for_sm90():
    """The interpreter accepts code that the compiler rejects (non-constexpr
    globals, non-boolean loop conditions): compile every kernel for an H100
    (sm_90, to PTX and cubin with triton's ptxas) without a GPU."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-3000:]
