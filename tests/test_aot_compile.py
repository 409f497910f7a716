"""Every Triton launch of the public ops, compiled ahead of time for sm_80 and sm_90.

No GPU needed: launches are captured from real op calls under the interpreter (the
wrappers take their GPU launch parameters, fastad/kernels/_aot.py), then built through
ptxas for each target; registers, spills and shared memory come from the ptxas report.
The default run compiles the hot kernels' default configs (cached by source hash under
build/aot-cache); ``-m slow`` compiles every launch and every autotune config.
"""
from __future__ import annotations

import os

import pytest

pytest.importorskip("triton.backends.nvidia")
if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):  # a GPU machine compiles for real
    pytest.skip("the launch capture runs the ops in the Triton interpreter (TRITON_INTERPRET=1)",
                allow_module_level=True)

from fastad.kernels import _aot  # noqa: E402
from fastad.kernels import nn_distance as nnk  # noqa: E402

# kernel -> the launches whose default config must be spill-free (hot paths)
HOT = ("_screen_kernel", "_exact_kernel", "_topk_kernel", "_persistent_kernel", "_rows_kernel",
       "_centers_kernel", "_reduce_kernel")


@pytest.fixture(scope="module")
def launches() -> list[dict]:
    return _aot.captured(full=False)


def _hot_subset(launches: list[dict]) -> list[dict]:
    """One launch per hot code path: screen modes (k = 1 and the largest fused k, the
    range / histogram / collect passes) on float16 screens, the exact fallback, the
    dict_lookup top-k (masked, 16-bit and float32), kcenter's widest rows."""
    picked, seen = [], set()
    for rec in launches:
        c, sig = rec["constexprs"], rec["signature"]
        kern = rec["kernel"]
        if kern == "_screen_kernel":
            if sig["qs_ptr"] != "*fp16" or c["HAS_GROUPS"] or c["KP"] not in (1, 16):
                continue
            key = (kern, c["MODE"], c["KP"])
        elif kern == "_topk_kernel":
            if not c["HAS_MASK"] or c["K"] != 32 or sig["q_ptr"] == "*bf16":
                continue
            key = (kern, sig["q_ptr"])
        elif kern in ("_persistent_kernel", "_rows_kernel"):
            if sig["x_ptr"] != "*fp32" or c["NCH"] == 1:
                continue
            key = (kern,)
        elif kern == "_exact_kernel":
            key = (kern,)
        else:
            continue
        if key not in seen:
            seen.add(key)
            picked.append(rec)
    return picked


def _default_jobs(recs: list[dict], target: str) -> list[dict]:
    return [j for rec in recs for j in _aot.variants(rec, target) if j["config"] in (None, 0)]


def test_capture_covers_every_kernel(launches):
    """The representative calls reach every kernel of every module (a new kernel needs a call)."""
    import importlib

    import triton

    got = {(r["module"], r["kernel"]) for r in launches}
    want = set()
    for mod in _aot.KERNEL_MODULES:
        m = importlib.import_module(mod)
        source = open(m.__file__).read()
        for name, obj in vars(m).items():
            if isinstance(obj, triton.runtime.interpreter.InterpretedFunction) and f"{name}[" in source:
                want.add((mod, name))
    assert want and want <= got, sorted(want - got)
    assert len(_hot_subset(launches)) >= 9


@pytest.mark.parametrize("target", sorted(_aot.TARGETS))
def test_autotune_prunes_configs_that_do_not_fit(launches, target):
    """An autotuned launch offers only configs whose shared memory fits the target; the
    histogram pass's 128 x 256 tile (262,144 B) is never offered."""
    limit = _aot.TARGETS[target][1]
    tuned = [r for r in launches if "configs" in r]
    assert tuned
    for rec in tuned:
        jobs = _aot.variants(rec, target)
        offered = [j for j in jobs if j["offered"]]
        assert offered, rec["constexprs"]
        for j in jobs:
            cfg = nnk._SCREEN_CONFIGS[j["config"]]
            assert j["offered"] == (nnk._screen_smem(cfg, j["constexprs"]["MODE"]) <= limit)
    hist = [j for r in tuned if r["constexprs"]["MODE"] == nnk._HIST for j in _aot.variants(r, target)]
    big = [j for j in hist if (j["constexprs"]["BLOCK_N"], j["constexprs"]["BLOCK_M"]) == (128, 256)]
    assert big and not any(j["offered"] for j in big)
    with pytest.raises(Exception):  # the device query is what a GPU run uses
        nnk._prune_screen(nnk._SCREEN_CONFIGS, {"qs_ptr": object()}, MODE=0)


def _check(results: list[dict], *, spill_free) -> None:
    bad = []
    for r in results:
        limit = _aot.TARGETS[r["target"]][1]
        if r["error"]:
            bad.append(f"{_aot.label(r)}: {r['error'][:400]}")
        elif r["offered"] and r["shared"] > limit:
            bad.append(f"{_aot.label(r)}: {r['shared']} B shared > {limit}")
        elif spill_free(r) and (r["spill_stores"] or r["stack"]):
            bad.append(f"{_aot.label(r)}: {r['regs']} registers, {r['spill_stores']} B spill stores, "
                       f"{r['stack']} B stack")
    assert not bad, "\n".join(bad)


def test_hot_kernels_compile_spill_free(launches):
    """Default configs of the hot kernels: build for sm_80 and sm_90, fit the shared
    memory, no spills (no stack frame: nothing in local memory)."""
    recs = _hot_subset(launches)
    jobs = [j for t in sorted(_aot.TARGETS) for j in _default_jobs(recs, t)]
    results = _aot.compile_in_subprocess(jobs)
    assert len(results) == len(jobs)
    _check(results, spill_free=lambda r: True)
    screen = [r for r in results if r["kernel"] == "_screen_kernel" and r["constexprs"]["MODE"] == nnk._RUN]
    assert {r["target"] for r in screen} == set(_aot.TARGETS)
    assert all(r["regs"] <= 255 for r in results)


@pytest.mark.slow
@pytest.mark.parametrize("target", sorted(_aot.TARGETS))
def test_every_launch_compiles(target, request):
    """Every launch of the full capture, every autotune config: compiles; the offered
    configs fit the shared memory; the hot kernels' default configs do not spill.
    Minutes of ptxas: runs with ``-m slow`` (or FASTAD_AOT_ALL=1) only."""
    if "slow" not in (request.config.getoption("markexpr") or "") and not os.environ.get("FASTAD_AOT_ALL"):
        pytest.skip("every launch and config: run with -m slow")
    recs = _aot.captured(full=True)
    jobs = [j for rec in recs for j in _aot.variants(rec, target)]
    results = _aot.compile_in_subprocess(jobs)
    _check(results, spill_free=lambda r: r["kernel"] in HOT and r["config"] in (None, 0))
