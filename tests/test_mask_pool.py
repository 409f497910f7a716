"""fastad.ops.mask_pool against its reference (F.interpolate + einsum).

The fast backends must binarise exactly as the reference, so hard-mask tests
compare the pixel counts bit for bit (any flipped pixel changes a count) and the
pooled means to float32 rounding. Masks with many exact ties (binary masks at
threshold 0.5, logits quantised to quarters) make a rounding mismatch visible.
"""
import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastad
from fastad import _ext
from fastad.ops import MaskPoolOutput, mask_pool, mask_pool_reference

from conftest import requires_cpu_ext, requires_triton
from hypothesis_compat import given, settings, st

mp = importlib.import_module("fastad.ops.mask_pool")

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_pooled(got, want, dtype=torch.float32):
    assert got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype], equal_nan=True)


def make_masks(kind, B, R, Hm, Wm, seed):
    """(masks, threshold): tie-heavy binary or quantised-logit masks, or soft masks."""
    g = torch.Generator().manual_seed(seed)
    if kind == "binary":  # blobs, so that resized values take many exact fractions
        m = F.interpolate(torch.rand(B * R, 1, max(1, Hm // 4), max(1, Wm // 4), generator=g), size=(Hm, Wm))
        return (m.view(B, R, Hm, Wm) > 0.5), 0.5
    if kind == "logits":  # quarters: interpolated values hit 0 exactly at many pixels
        return (torch.randint(-4, 5, (B, R, Hm, Wm), generator=g).float() / 4), 0.0
    return torch.rand(B, R, Hm, Wm, generator=g), None  # soft weights in [0, 1)


def check(features, masks, threshold, backend="cpu", **kw):
    got = mask_pool(features, masks, threshold=threshold, backend=backend, return_counts=True, **kw)
    want = mask_pool_reference(features, masks, threshold=threshold, **kw)
    assert isinstance(got, MaskPoolOutput)
    assert got.pooled.shape == want.pooled.shape and got.counts.shape == want.counts.shape
    if threshold is None:
        torch.testing.assert_close(got.counts, want.counts, atol=1e-3, rtol=1e-5)
    else:
        assert torch.equal(got.counts, want.counts), "binarisation differs from the reference"
    assert_pooled(got.pooled, want.pooled, features.dtype)
    return got


# (B, C, H, W, R, Hm, Wm, size, resize, align_corners)
CASES = [
    (2, 6, 5, 5, 11, 20, 20, (20, 20), "bilinear", False),      # iCAS MFM: logits on the 4x pooling grid
    (2, 6, 5, 5, 11, 70, 70, (20, 20), "bilinear", False),      # iCAS prompt: image masks downsampled
    (1, 3, 37, 37, 3, 37, 37, (148, 148), "bilinear", False),   # 37 -> 148, masks upsampled
    (2, 4, 7, 7, 5, 7, 7, (13, 13), "bilinear", True),          # 7 -> 13, align_corners
    (1, 2, 1, 1, 4, 1, 1, (5, 5), "bilinear", False),           # 1 -> 5
    (1, 2, 7, 9, 3, 13, 11, None, "bilinear", False),           # pool on the feature grid
    (1, 2, 13, 13, 2, 30, 30, (7, 7), "bilinear", False),       # features downsampled
    (1, 2, 8, 8, 3, 130, 70, (100, 60), "bilinear", False),     # both axes resized, separable kernel
    (2, 3, 6, 7, 5, 17, 19, (23, 29), "nearest", False),
    (2, 3, 6, 7, 5, 17, 19, (23, 29), "area", False),
    (1, 3, 9, 8, 4, 40, 37, (9, 8), "area", False),             # area downsampling of the masks
    (1, 1, 16, 16, 3, 256, 256, (256, 256), "bilinear", False),  # SAA+: saliency upsampled to the masks
]


@requires_cpu_ext
@pytest.mark.parametrize("complement", [False, "overlap", "partition"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[8]}-{c[1]}x{c[2]}x{c[3]}-{c[4]}x{c[5]}x{c[6]}-{c[7]}")
def test_cpu_matches_reference(cpu_isa, case, complement):
    B, C, H, W, R, Hm, Wm, size, resize, ac = case
    features = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(1))
    for seed, kind in enumerate(("binary", "logits", "soft")):
        masks, thr = make_masks(kind, B, R, Hm, Wm, seed)
        check(features, masks, thr, size=size, resize=resize, align_corners=ac, complement=complement)


@requires_cpu_ext
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.float16, torch.bfloat16])
def test_mask_dtypes_are_read_as_they_are(cpu_isa, mask_dtype):
    """Bool / uint8 / half masks give bit-identical results to the same masks in float32."""
    features = torch.randn(2, 5, 6, 6, generator=torch.Generator().manual_seed(2))
    masks, _ = make_masks("binary", 2, 9, 31, 27, 3)
    for resize in ("bilinear", "nearest", "area"):
        for size in ((24, 24), (31, 27)):
            kw = dict(size=size, resize=resize, complement="overlap")
            got = check(features, masks.to(mask_dtype), 0.5, **kw)
            same = mask_pool(features, masks.float(), threshold=0.5, return_counts=True, **kw)
            assert torch.equal(got.pooled, same.pooled) and torch.equal(got.counts, same.counts)
    if mask_dtype.is_floating_point:
        soft = torch.rand(2, 9, 31, 27, generator=torch.Generator().manual_seed(4)).to(mask_dtype)
        check(features, soft, None, size=(24, 24))
    else:  # soft weights from integer masks are their values
        check(features, masks.to(mask_dtype), None, size=(24, 24), complement="partition")


@requires_cpu_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_features(cpu_isa, dtype):
    features = torch.randn(2, 7, 5, 5, generator=torch.Generator().manual_seed(5)).to(dtype)
    masks, thr = make_masks("logits", 2, 6, 20, 20, 6)
    got = check(features, masks, thr, size=(20, 20), complement=True)
    assert got.pooled.dtype == dtype


# ---------------------------------------------------------------------------- exact resize


RESIZES = [  # (Hm, Wm, Hp, Wp, resize, align_corners, R)
    (37, 37, 148, 148, "bilinear", False, 2),
    (37, 37, 148, 148, "bilinear", True, 2),
    (7, 7, 13, 13, "bilinear", False, 11),     # pointwise kernel: SIMD channels and tail
    (7, 5, 13, 11, "bilinear", True, 19),
    (1, 1, 5, 5, "bilinear", False, 9),
    (1024, 1024, 64, 64, "bilinear", False, 2),
    (1024, 1024, 64, 64, "bilinear", True, 9),
    (64, 64, 1024, 1024, "bilinear", False, 1),
    (518, 518, 148, 148, "bilinear", False, 2),
    (13, 29, 7, 3, "bilinear", False, 12),
    (9, 9, 9, 70, "bilinear", False, 2),       # one axis identity, separable kernel
    (37, 40, 148, 150, "nearest", False, 3),
    (1024, 1024, 64, 64, "nearest", False, 1),
    (7, 5, 13, 11, "nearest", False, 5),
    (518, 518, 148, 148, "area", False, 2),
    (37, 37, 148, 148, "area", False, 2),
    (13, 29, 7, 3, "area", False, 6),
]


def exact_rounding():
    if not mp._cpu_rounding().exact:
        pytest.skip("this torch build rounds bilinear resizing in a way the probe does not know; "
                    "binarisation can then differ from the reference on exact ties")


@requires_cpu_ext
@pytest.mark.parametrize("case", RESIZES, ids=lambda c: "{}x{}->{}x{}-{}-ac{}-R{}".format(*c))
def test_resize_is_bitwise_torch(cpu_isa, case):
    Hm, Wm, Hp, Wp, resize, ac, R = case
    if resize == "bilinear":
        exact_rounding()
    masks = torch.randn(1, R, Hm, Wm, generator=torch.Generator().manual_seed(7))
    kw = {"align_corners": ac} if resize == "bilinear" else {}
    for one_minus in (False, True):
        want = F.interpolate(1 - masks if one_minus else masks, size=(Hp, Wp), mode=resize, **kw)
        got = mp._cpu_resize(masks, (Hp, Wp), resize, ac, one_minus)
        assert torch.equal(got, want), f"{(got != want).sum().item()} pixels differ"


@requires_cpu_ext
def test_resize_follows_torch_kernel_choice(cpu_isa):
    """torch takes its pointwise kernel for channels-last masks and for R == 3 on one thread."""
    exact_rounding()
    masks = torch.randn(1, 5, 30, 40, generator=torch.Generator().manual_seed(8))
    cl = masks.contiguous(memory_format=torch.channels_last)
    assert torch.equal(mp._cpu_resize(cl, (100, 90), "bilinear"), F.interpolate(cl, size=(100, 90), mode="bilinear"))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        m3 = masks[:, :3].contiguous()
        assert torch.equal(mp._cpu_resize(m3, (100, 90), "bilinear"), F.interpolate(m3, size=(100, 90), mode="bilinear"))
    finally:
        torch.set_num_threads(threads)
    features = torch.randn(1, 3, 10, 9, generator=torch.Generator().manual_seed(9))
    binary = (masks > 0).float().contiguous(memory_format=torch.channels_last)
    check(features, binary, 0.5, size=(100, 90))


@requires_cpu_ext
@pytest.mark.parametrize("case", [(7, 5, 13, 11, 11), (37, 37, 148, 148, 2), (70, 66, 20, 20, 9)],
                         ids=lambda c: "{}x{}->{}x{}-R{}".format(*c))
def test_threshold_on_resized_values(cpu_isa, case):
    """Thresholds equal to resized values: a pixel one rounding step off flips and changes a count."""
    exact_rounding()
    Hm, Wm, Hp, Wp, R = case
    gen = torch.Generator().manual_seed(23)
    masks = torch.randn(1, R, Hm, Wm, generator=gen)
    features = torch.randn(1, 2, 5, 5, generator=gen)
    resized = F.interpolate(masks, size=(Hp, Wp), mode="bilinear", align_corners=False)
    for thr in resized.flatten()[torch.randperm(resized.numel(), generator=gen)[:12]].tolist():
        check(features, masks, thr, size=(Hp, Wp), complement="overlap")


def _fma(a, b, c):  # float32 fma through float64 (exact product, one rounding)
    return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(np.float32)


@requires_cpu_ext
def test_unfused_formulas_match_their_definition(cpu_isa):
    """The formulas the probe does not pick on this machine, against a numpy model."""
    f32 = np.float32
    masks = torch.randn(1, 6, 7, 5, generator=torch.Generator().manual_seed(10))
    x = masks[0].numpy()
    (i0y, i1y), (l0y, l1y) = mp._linear_axis(7, 13, False, False)
    (i0x, i1x), (l0x, l1x) = mp._linear_axis(5, 11, False, False)
    a, b = x[:, i0y][:, :, i0x], x[:, i0y][:, :, i1x]
    c, d = x[:, i1y][:, :, i0x], x[:, i1y][:, :, i1x]
    h0, h1 = l0y[:, None], l1y[:, None]
    r0 = (a * l0x).astype(f32) + (b * l1x).astype(f32)
    r1 = (c * l0x).astype(f32) + (d * l1x).astype(f32)
    separable = (r0 * h0).astype(f32) + (r1 * h1).astype(f32)
    w00, w01, w10, w11 = (h0 * l0x).astype(f32), (h0 * l1x).astype(f32), (h1 * l0x).astype(f32), (h1 * l1x).astype(f32)
    vec = (a * w00).astype(f32) + ((b * w01).astype(f32) + ((c * w10).astype(f32) + (d * w11).astype(f32)))
    tail = (((a * w00).astype(f32) + (b * w01).astype(f32)) + (c * w10).astype(f32)) + (d * w11).astype(f32)
    vec_fma = _fma(a, w00, _fma(b, w01, _fma(d, w11, (c * w10).astype(f32))))
    tail_fma = _fma(d, w11, _fma(c, w10, _fma(a, w00, (b * w01).astype(f32))))
    plain = mp._Rounding(src_fma=False, sep_fma=False, pw_vec=mp._PW_VEC_PLAIN, pw_tail=mp._PW_TAIL_PLAIN, width=4)
    fused = mp._Rounding(src_fma=False, sep_fma=True, pw_vec=mp._PW_VEC_FMA, pw_tail=mp._PW_TAIL_FMA, width=4)
    sep_plan = mp._plan((7, 5), (13, 11), (1, 1), "bilinear", False, False, False)
    pw_plan = mp._plan((7, 5), (13, 11), (1, 1), "bilinear", False, False, True)
    np.testing.assert_array_equal(mp._resize_masks(masks[0], sep_plan, plain, 6).numpy(), separable)
    for rounding, v, t in ((plain, vec, tail), (fused, vec_fma, tail_fma)):
        got = mp._resize_masks(masks[0], pw_plan, rounding, 6).numpy()
        np.testing.assert_array_equal(got[:4], v[:4])  # r < 6 - 6 % 4: full SIMD vectors
        np.testing.assert_array_equal(got[4:], t[4:])  # the tail


# ---------------------------------------------------------------------------- empty, full, degenerate


@requires_cpu_ext
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_empty_and_full_masks(backend):
    features = torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(11))
    masks = torch.zeros(2, 3, 20, 24, dtype=torch.bool)
    masks[:, 1] = True
    masks[1, 2, 3:9, 4:11] = True
    got = mask_pool(features, masks, size=(20, 24), threshold=0.5, complement="partition", backend=backend,
                    return_counts=True)
    assert torch.equal(got.pooled[:, 0, 0], torch.zeros(2, 4))  # empty mask: zero vector, count 0
    assert torch.equal(got.counts[:, 0, 0], torch.zeros(2))
    assert torch.equal(got.counts[:, 1], torch.tensor([[480.0, 0.0], [480.0, 0.0]]))
    up = F.interpolate(features, size=(20, 24), mode="bilinear", align_corners=False)
    torch.testing.assert_close(got.pooled[:, 1, 0], up.mean(dim=(-2, -1)), atol=1e-5, rtol=1e-5)
    assert torch.equal(got.pooled[:, 1, 1], torch.zeros(2, 4))
    check(features, masks, 0.5, backend="cpu", size=(20, 24), complement="overlap")


@requires_cpu_ext
@pytest.mark.parametrize("shape", [(0, 3, 4, 4, 2), (2, 3, 4, 4, 0), (2, 0, 4, 4, 3), (1, 2, 1, 1, 1)])
def test_degenerate_shapes(shape):
    B, C, H, W, R = shape
    features = torch.randn(B, C, H, W)
    masks = torch.randn(B, R, 3, 2)
    for complement in (False, True):
        got = mask_pool(features, masks, size=(1, 1) if H == 1 else None, threshold=0.0, complement=complement,
                        return_counts=True)
        want = mask_pool_reference(features, masks, size=(1, 1) if H == 1 else None, threshold=0.0,
                                   complement=complement)
        assert got.pooled.shape == want.pooled.shape == ((B, R, C) if not complement else (B, R, 2, C))
        assert torch.equal(got.counts, want.counts)
        assert_pooled(got.pooled, want.pooled)


@requires_cpu_ext
def test_eps_zero_and_threshold_rounding():
    features = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(12))
    masks = torch.full((1, 2, 4, 4), float(np.float32(0.1)))
    masks[0, 1, :2] = 0.3
    # 0.1 is compared in float32, as torch compares a float32 tensor with a Python number
    got = check(features, masks, 0.1, eps=0.0)
    assert torch.isnan(got.pooled[0, 0]).all() and torch.isfinite(got.pooled[0, 1]).all()  # 0 / 0, as the reference
    check(features, masks, 0.1, eps=1e-3, complement="partition")


# ---------------------------------------------------------------------------- chunks


@requires_cpu_ext
@pytest.mark.parametrize("chunk", [1, 250, 1000])
def test_chunking(monkeypatch, chunk):
    """Weights are computed in chunks of whole images, or of masks of one image."""
    features = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(13), requires_grad=True)
    masks, thr = make_masks("logits", 3, 7, 20, 20, 14)
    whole = mask_pool(features, masks, size=(20, 20), threshold=thr, complement=True, return_counts=True)
    (grad_whole,) = torch.autograd.grad(whole.pooled.sum(), features)
    monkeypatch.setattr(mp, "_CHUNK_FLOATS", chunk)
    part = mask_pool(features, masks, size=(20, 20), threshold=thr, complement=True, return_counts=True)
    (grad_part,) = torch.autograd.grad(part.pooled.sum(), features)
    assert torch.equal(part.counts, whole.counts)
    assert_pooled(part.pooled, whole.pooled)
    assert_pooled(grad_part, grad_whole)


# ---------------------------------------------------------------------------- gradients


def grads(fn, features, masks, g):
    out = fn(features, masks)
    inputs = [features] + ([masks] if masks.requires_grad else [])
    return torch.autograd.grad(out, inputs, g, allow_unused=True)


@requires_cpu_ext
@pytest.mark.parametrize("complement", [False, "overlap", "partition"])
@pytest.mark.parametrize("threshold", [0.0, None])
def test_gradients_match_reference(complement, threshold):
    gen = torch.Generator().manual_seed(15)
    features = torch.randn(2, 4, 6, 7, generator=gen, requires_grad=True)
    masks = (torch.rand(2, 3, 15, 13, generator=gen) - (0.5 if threshold is not None else 0.0)).requires_grad_()
    g = torch.randn((2, 3, 2, 4) if complement else (2, 3, 4), generator=gen)
    kw = dict(size=(17, 19), threshold=threshold, complement=complement)
    got = grads(lambda f, m: mask_pool(f, m, **kw), features, masks, g)
    want = grads(lambda f, m: mask_pool_reference(f, m, **kw).pooled, features, masks, g)
    assert got[0] is not None
    if threshold is not None:  # binarised masks: no gradient, as in the reference
        assert got[1] is None and want[1] is None
        got, want = got[:1], want[:1]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@requires_cpu_ext
@pytest.mark.parametrize("resize", ["nearest", "area"])
def test_soft_mask_gradient_other_resizes(resize):
    gen = torch.Generator().manual_seed(16)
    features = torch.randn(1, 3, 5, 6, generator=gen, requires_grad=True)
    masks = torch.rand(1, 4, 14, 11, generator=gen, requires_grad=True)
    g = torch.randn(1, 4, 2, 3, generator=gen)
    kw = dict(size=(10, 12), resize=resize, complement="overlap")
    got = grads(lambda f, m: mask_pool(f, m, **kw), features, masks, g)
    want = grads(lambda f, m: mask_pool_reference(f, m, **kw).pooled, features, masks, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@requires_cpu_ext
def test_half_feature_gradient():
    features = torch.randn(1, 3, 5, 5, generator=torch.Generator().manual_seed(17)).to(torch.bfloat16)
    features.requires_grad_()
    masks = torch.rand(1, 2, 20, 20, generator=torch.Generator().manual_seed(18)) > 0.5
    (got,) = torch.autograd.grad(mask_pool(features, masks, size=20, threshold=0.5).sum(), features)
    (want,) = torch.autograd.grad(mask_pool_reference(features, masks, size=20, threshold=0.5).pooled.sum(), features)
    assert got.dtype == torch.bfloat16
    assert_pooled(got, want, torch.bfloat16)


@requires_cpu_ext
def test_torch_compile_and_opcheck():
    gen = torch.Generator().manual_seed(19)
    features = torch.randn(2, 4, 6, 7, generator=gen, requires_grad=True)
    masks = torch.randn(2, 3, 15, 13, generator=gen)

    def fn(f, m):
        return mask_pool(f, m, (17, 19), threshold=0.0, complement=True).square().sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(features, masks)
    (got,) = torch.autograd.grad(out, features)
    (want,) = torch.autograd.grad(fn(features, masks), features)
    torch.testing.assert_close(out, fn(features, masks))
    torch.testing.assert_close(got, want)
    torch.library.opcheck(torch.ops.fastad.mask_pool.default,
                          (features, masks, 17, 19, "bilinear", False, 0.0, 1, 1e-8, "cpu"))


# ---------------------------------------------------------------------------- random sizes


@requires_cpu_ext
@settings(max_examples=25, deadline=None)
@given(hm=st.integers(1, 40), wm=st.integers(1, 40), h=st.integers(1, 12), w=st.integers(1, 12),
       hp=st.integers(1, 50), wp=st.integers(1, 50), r=st.integers(1, 12),
       resize=st.sampled_from(["bilinear", "nearest", "area"]), ac=st.booleans(),
       complement=st.sampled_from([False, "overlap", "partition"]), seed=st.integers(0, 2**16))
def test_random_sizes(hm, wm, h, w, hp, wp, r, resize, ac, complement, seed):
    features = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(seed))
    masks, thr = make_masks("logits", 1, r, hm, wm, seed)
    check(features, masks, thr, size=(hp, wp), resize=resize, align_corners=ac and resize == "bilinear",
          complement=complement)


# ---------------------------------------------------------------------------- triton


TRITON_CASES = [  # small: the interpreter runs B*R*H programs one by one
    (3, 4, 2, 10, 9, (13, 11), "bilinear", False, "logits", False),
    (3, 4, 2, 10, 9, (13, 11), "bilinear", True, "binary", "overlap"),
    (3, 4, 2, 9, 11, (13, 11), "nearest", False, "binary", "partition"),
    (3, 4, 2, 20, 17, (13, 11), "area", False, "logits", "overlap"),
    (3, 4, 2, 13, 11, (13, 11), "bilinear", False, "soft", "overlap"),  # masks on the grid, soft weights
    (4, 3, 2, 13, 11, None, "bilinear", False, "logits", "partition"),  # pooling on the feature grid
]


@requires_triton
@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: f"{c[6]}-{c[8]}-{c[9]}")
def test_triton_matches_reference(case):
    H, W, R, Hm, Wm, size, resize, ac, kind, complement = case
    features = torch.randn(1, 3, H, W, generator=torch.Generator().manual_seed(20))
    masks, thr = make_masks(kind, 1, R, Hm, Wm, 21)
    check(features, masks, thr, backend="triton", size=size, resize=resize, align_corners=ac, complement=complement)


@requires_triton
def test_triton_gradient():
    gen = torch.Generator().manual_seed(22)
    features = torch.randn(1, 2, 3, 3, generator=gen, requires_grad=True)
    masks = torch.randn(1, 2, 7, 7, generator=gen)
    g = torch.randn(1, 2, 2, 2, generator=gen)
    kw = dict(size=(7, 7), threshold=0.0, complement=True)
    (got,) = torch.autograd.grad(mask_pool(features, masks, backend="triton", **kw), features, g)
    (want,) = torch.autograd.grad(mask_pool_reference(features, masks, **kw).pooled, features, g)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


_COMPILE_FOR_H100 = """
import importlib.util, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
spec = importlib.util.spec_from_file_location("mask_pool_kernels", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
kernel = module._mask_pool_weights_kernel
sig = dict(masks_ptr="*u8", w_ptr="*fp32", cnt_ptr="*fp32", Hm="i32", Wm="i32", Hp="i32", Wp="i32", H="i32",
           W="i32", yi_ptr="*i32", yl_ptr="*fp32", xi_ptr="*i32", xl_ptr="*fp32", clo_ptr="*i32", clen_ptr="*i32",
           cw_ptr="*fp32", KY="i32", hlo_ptr="*i32", hlen_ptr="*i32", hw_ptr="*fp32", KX="i32", yown_ptr="*i32",
           xown_ptr="*i32", threshold="fp32", AREA_KW="i32")
for mode, hard, comp in ((1, True, 1), (4, False, 2)):
    consts = dict(MODE=mode, HARD=hard, COMPLEMENT=comp, NOUT=1 if comp == 0 else 2, BLOCK_X=64, BLOCK_J=16)
    sig.update({k: "constexpr" for k in consts})
    out = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": 4})
    assert "fma.rn.f32" in out.asm["ptx"] and out.asm["cubin"]
"""


@requires_triton
def test_triton_kernel_compiles_for_h100():
    """The interpreter does not type-check like the compiler: build the kernel for sm_90 (no GPU needed)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    source = importlib.util.find_spec("fastad.kernels.mask_pool").origin
    done = subprocess.run([sys.executable, "-c", _COMPILE_FOR_H100, source], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


# ---------------------------------------------------------------------------- errors


def test_bad_arguments_are_named():
    f = torch.randn(2, 3, 4, 4)
    m = torch.randn(2, 5, 8, 8)
    with pytest.raises(ValueError, match="mask_pool.*`features` must have 4 dimensions"):
        mask_pool(f[0], m)
    with pytest.raises(TypeError, match="mask_pool.*`masks` must have dtype"):
        mask_pool(f, m.to(torch.int32))
    with pytest.raises(TypeError, match="mask_pool.*`features` must have dtype"):
        mask_pool(f.double(), m)
    with pytest.raises(ValueError, match="share B"):
        mask_pool(f, m[:1])
    with pytest.raises(ValueError, match="`resize` must be one of"):
        mask_pool(f, m, resize="bicubic")
    with pytest.raises(ValueError, match="align_corners=True` needs resize='bilinear'"):
        mask_pool(f, m, resize="nearest", align_corners=True)
    with pytest.raises(ValueError, match="`complement`"):
        mask_pool(f, m, complement="inside")
    with pytest.raises(ValueError, match="`size`"):
        mask_pool(f, m, size=(3, 0))
    with pytest.raises(ValueError, match="`size`"):
        mask_pool(f, m, size=(3, 4, 5))
    with pytest.raises(ValueError, match="`eps`"):
        mask_pool(f, m, eps=-1.0)
    with pytest.raises(ValueError, match="`threshold`"):
        mask_pool(f, m, threshold=float("nan"))
    with pytest.raises(ValueError, match="spatial sizes"):
        mask_pool(f, m[..., :0])
    with pytest.raises(ValueError, match="unknown backend"):
        mask_pool(f, m, backend="gpu")
    with pytest.raises(fastad.BackendUnavailableError):
        mask_pool(f, m, backend="cuda")


@requires_cpu_ext
def test_extension_rechecks_its_arguments():
    masks = torch.zeros(2, 6, 6)
    plan = mp._plan((6, 6), (9, 9), (3, 3), "bilinear", False, True, False)
    weights = torch.zeros(2, 1, 3, 3)
    counts = torch.zeros(2, 1)

    def call(**over):
        args = dict(masks=masks.numpy(), mask_dtype=0, mode=plan.mode, y_idx=plan.y_idx, y_lam=plan.y_lam,
                    x_idx=plan.x_idx, x_lam=plan.x_lam, sep_fma=True, pw_vec=1, pw_tail=3, r_first=0, r_total=2,
                    vec_limit=0, hard=True, threshold=0.0, complement=0, v_lo=plan.v_lo, v_len=plan.v_len,
                    v_w=plan.v_w, h_lo=plan.h_lo, h_len=plan.h_len, h_w=plan.h_w, weights=weights.numpy(),
                    counts=counts.numpy(), nthreads=1)
        args.update(over)
        _ext._C.mask_pool_weights(**args)

    call()
    bad_idx = plan.y_idx.copy()
    bad_idx[1, 3] = 6
    with pytest.raises(ValueError, match="y_idx.*out of range"):
        call(y_idx=bad_idx)
    bad_lo = plan.h_lo.copy()
    bad_lo[2] = 8
    with pytest.raises(ValueError, match="band 2 of 'h'"):
        call(h_lo=bad_lo)
    with pytest.raises(ValueError, match="mask dtype code 3"):
        call(mask_dtype=3)
    with pytest.raises(ValueError, match="C-contiguous"):
        call(masks=torch.zeros(2, 6, 12).numpy()[:, :, ::2])
    with pytest.raises(ValueError, match="weights"):
        call(weights=torch.zeros(2, 2, 3, 3).numpy())
    with pytest.raises(ValueError, match="complement"):
        call(complement=3)
    with pytest.raises(ValueError, match="multiple of 8"):
        call(h_w=np.pad(plan.h_w, ((0, 0), (0, 4))))
    with pytest.raises(ValueError, match="resize mode"):
        call(mode=9)
