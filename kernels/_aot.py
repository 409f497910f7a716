"""Ahead-of-time compilation of fastad's Triton kernels for sm_80 / sm_90, without a GPU.

Used by tests/test_aot_compile.py and benchmarks/aot_report.py:

1. ``capture()``: run public ops under TRITON_INTERPRET=1 while the kernel wrappers take
   their GPU branch (tile sizes, autotuned launches, SM count of an H100), and record
   every launch: kernel, argument types with the runtime's own specialisation (ints
   equal to 1 become constants, 16-divisible ints and pointers get the divisibility
   hint), constexprs and launch options. Autotuned launches keep their config list.
2. ``compile_all()`` (in a process without TRITON_INTERPRET, see ``python -m
   fastad.kernels._aot``): build each launch (each config of an autotuned one) for a
   target through ptxas and read registers, spills and shared memory from the ptxas
   report. Results are cached by the kernel's source hash (the JITFunction cache key
   covers the kernel and every jit function it calls) under build/aot-cache.

For an autotuned launch, the autotuner's ``early_config_prune`` is asked which configs it
offers on the target (``smem_limit=`` instead of a device); only those must fit.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import types
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import triton

from fastad._io import atomic_write

# Opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin).
TARGETS = {"sm_80": (80, 166_912), "sm_90": (90, 232_448)}
KERNEL_MODULES = ("fastad.kernels.nn_distance", "fastad.kernels.sparsemax", "fastad.kernels.kcenter",
                  "fastad.kernels.mask_pool")
_OPTION_KEYS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
_ROOT = Path(__file__).resolve().parent.parent  # the checkout (fastad/kernels links to kernels/)
_DEFAULT_CACHE = _ROOT / "build" / "aot-cache"


# --------------------------------------------------------------------------- capture


def _is_constexpr(param: inspect.Parameter) -> bool:
    return "constexpr" in str(param.annotation)


def _describe(fn: Callable, jit_kwargs: dict, args: tuple, kwargs: dict) -> dict:
    """JSON-able description of one launch of the jit function ``fn``."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    params = inspect.signature(fn).parameters
    bound = dict(zip(params, args))
    bound.update({k: v for k, v in kwargs.items() if k in params})
    options = {k: kwargs[k] for k in _OPTION_KEYS if k in kwargs}
    no_spec = set(jit_kwargs.get("do_not_specialize") or ())
    no_align = set(jit_kwargs.get("do_not_specialize_on_alignment") or ())
    signature, constexprs, aligned = {}, {}, []
    for name, param in params.items():
        value = bound[name] if name in bound else param.default
        if _is_constexpr(param):
            constexprs[name] = value
            continue
        kind, spec = native_specialize_impl(BaseBackend, value, False, name not in no_spec, name not in no_align)
        if kind == "constexpr":
            constexprs[name] = spec
        else:
            signature[name] = kind
            if spec == "D":
                aligned.append(name)
    for name, value in constexprs.items():
        if not isinstance(value, (bool, int, float, str, type(None))):
            constexprs[name] = int(value) if hasattr(value, "__int__") else str(value)
    return dict(module=fn.__module__, kernel=fn.__name__, signature=signature, constexprs=constexprs,
                aligned=aligned, options=options)


def _module_attr(module: str, obj: Any) -> str:
    mod = sys.modules[module]
    for name, value in vars(mod).items():
        if value is obj:
            return name
    raise LookupError(f"no module-level name for {obj!r} in {module}")


@contextlib.contextmanager
def capture(sms: int = 132) -> Iterator[list[dict]]:
    """Record the launches of every fastad kernel made inside the block (TRITON_INTERPRET=1).

    The wrappers see a GPU (``triton_interpret()`` is False for them and a device reports
    ``sms`` multiprocessors) so they pick their GPU launch parameters; the interpreter still
    runs every launch (an autotuned one with its first config) so that data-dependent host
    logic takes the same paths as on a GPU.
    """
    import importlib

    import torch
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.interpreter import InterpretedFunction

    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise RuntimeError("capture() needs TRITON_INTERPRET=1 (set before triton kernels are imported)")
    launches: list[dict] = []
    inner = [0]
    run0, tuned0 = InterpretedFunction.run, Autotuner.run

    def run(self, *args, grid, warmup, **kwargs):
        if not inner[0]:
            launches.append(_describe(self.fn, self.kwargs, args, kwargs))
        return run0(self, *args, grid=grid, warmup=warmup, **kwargs)

    def tuned(self, *args, **kwargs):
        rec = _describe(self.fn.fn, self.fn.kwargs, args, kwargs)
        for cfg in self.configs:
            for name in cfg.kwargs:
                rec["constexprs"].pop(name, None)
        rec["autotuner"] = _module_attr(rec["module"], self)
        rec["configs"] = [dict(kwargs=dict(c.kwargs), num_warps=c.num_warps, num_stages=c.num_stages)
                          for c in self.configs]
        launches.append(rec)
        inner[0] += 1
        try:
            return self.fn.run(*args, **kwargs, **self.configs[0].all_kwargs())
        finally:
            inner[0] -= 1

    mods = [importlib.import_module(m) for m in KERNEL_MODULES]
    import fastad.ops.mask_pool as ops_mask_pool

    patched = [(m, "triton_interpret") for m in mods + [ops_mask_pool] if hasattr(m, "triton_interpret")]
    saved = [getattr(m, a) for m, a in patched]
    props = types.SimpleNamespace(multi_processor_count=sms, name="AOT capture", major=9, minor=0,
                                  shared_memory_per_block_optin=TARGETS["sm_90"][1])
    get_props = torch.cuda.get_device_properties
    InterpretedFunction.run, Autotuner.run = run, tuned
    for m, a in patched:
        setattr(m, a, lambda: False)
    torch.cuda.get_device_properties = lambda *a, **k: props
    try:
        yield launches
    finally:
        InterpretedFunction.run, Autotuner.run = run0, tuned0
        for (m, a), v in zip(patched, saved):
            setattr(m, a, v)
        torch.cuda.get_device_properties = get_props


def unique(launches: Iterable[dict]) -> list[dict]:
    """Distinct launches (same kernel, types, constexprs, options, pointer alignment), in
    first-seen order; the divisibility of integer sizes (a property of the tiny captured
    shapes) does not make a launch distinct."""
    seen, out = set(), []
    for rec in launches:
        ptrs = [a for a in rec["aligned"] if rec["signature"][a].startswith("*")]
        key = json.dumps(dict(rec, aligned=ptrs), sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(rec)
    return out



def representative_calls(full: bool = False) -> None:
    """Calls of every public op that reach each Triton launch site with every dtype / mode
    constexpr the wrappers use (tiny sizes: they run in the interpreter). ``full`` adds
    the combinations that only repeat constexprs already covered by another op."""
    import torch

    import fastad.kernels.kcenter as kc
    from fastad import ops

    g = torch.Generator().manual_seed(0)
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    # nn_distance: fused path (k = 1, k = 3, k = 16), histogram path (k = 24 > 16, a
    # bank larger than its candidate buffer, like SAA+'s 4,096), every metric, groups, shared and per-image banks.
    for dt in dtypes:
        q = torch.randn(2, 9, 48, generator=g).to(dt)
        b = torch.randn(304, 48, generator=g).to(dt)
        for k in (1, 3, 16):
            ops.nn_distance(q, b, k=k, metric="cosine", backend="triton")
        if full or dt == torch.float32:
            for metric in ("l2", "ip"):
                ops.nn_distance(q, b, k=1, metric=metric, backend="triton")
                ops.nn_distance(q, b, k=3, metric=metric, reduce="mean_largest", backend="triton")
    q = torch.randn(1, 7, 32, generator=g)
    big = torch.randn(1024, 32, generator=g)
    ops.nn_distance(q, big, k=24, metric="cosine", reduce="mean_largest", backend="triton")
    ops.nn_distance(q, big, k=24, metric="l2", backend="triton")
    qg = torch.randint(0, 3, (2, 9), generator=g)
    bg = torch.randint(0, 3, (2, 304), generator=g)
    qq = torch.randn(2, 9, 48, generator=g)
    bb = torch.randn(2, 304, 48, generator=g)
    ops.nn_distance(qq, bb, k=1, query_groups=qg, bank_groups=bg, backend="triton")
    ops.nn_distance(qq, bb, k=2, query_groups=qg, bank_groups=bg, group_match="same", backend="triton")
    zeros = torch.zeros(1, 5, 16)
    ops.nn_distance(zeros, torch.zeros(600, 16), k=2, metric="l2", backend="triton")  # overflow -> fallback
    # dict_lookup (top-k + gather, softmax) and sparsemax rows
    for dt in dtypes:
        qd = torch.randn(2, 5, 32, generator=g).to(dt)
        kd = torch.randn(1, 70, 32, generator=g).to(dt)
        vd = torch.randn(1, 70, 8, generator=g).to(dt)
        mask = torch.rand(1, 70, generator=g) > 0.2
        for mode in ("sparsemax", "softmax", "argmax"):
            ops.dict_lookup(qd, kd, vd, mode=mode, backend="triton")
        ops.dict_lookup(qd, kd, vd, mode="sparsemax", key_mask=mask, backend="triton")
        ops.dict_lookup(qd, kd, vd, mode="softmax", key_mask=mask, backend="triton")
        ops.sparsemax(torch.randn(3, 50, generator=g).to(dt), backend="triton")
        wide = torch.randn(1, 70, 272, generator=g).to(dt)  # value channels in blocks of 256
        ops.dict_lookup(qd, kd, wide, mode="softmax", key_mask=mask, backend="triton")
    # kcenter: persistent (small N) and the three-launch path of large problems
    for dt in (torch.float32, torch.float16):
        x = torch.randn(2, 40, 32, generator=g).to(dt)
        ops.kcenter_greedy(x, 5, backend="triton")
    ops.kcenter_greedy(torch.randn(1, 24, 1536, generator=g), 3, backend="triton")  # wide rows, unprojected
    saved = kc._PERSISTENT_MAX_N
    kc._PERSISTENT_MAX_N = 0
    try:
        ops.kcenter_greedy(torch.randn(1, 70, 32, generator=g), 5, backend="triton")
        ops.kcenter_greedy(torch.randn(1, 24, 1536, generator=g), 3, backend="triton")
    finally:
        kc._PERSISTENT_MAX_N = saved
    # mask_pool: every resize mode, hard and soft masks, complements
    feats = torch.randn(1, 4, 6, 6, generator=g)
    masks = torch.rand(1, 2, 13, 13, generator=g)
    for resize in ("bilinear", "nearest", "area"):
        ops.mask_pool(feats, masks, size=(9, 9), resize=resize, threshold=0.5, complement=True, backend="triton")
    ops.mask_pool(feats, masks, size=(9, 9), resize="bilinear", backend="triton")
    ops.mask_pool(feats, masks > 0.5, backend="triton")


def captured(full: bool = False, cache_dir: Path = _DEFAULT_CACHE) -> list[dict]:
    """unique() launches of representative_calls(full), cached by the hash of the kernel,
    op and backend sources and the triton / torch versions (needs TRITON_INTERPRET=1)."""
    import torch

    root = _ROOT
    h = hashlib.sha256(f"{triton.__version__} {torch.__version__} {full}".encode())
    for path in sorted([*root.joinpath("kernels").glob("*.py"), *root.joinpath("fastad", "ops").glob("*.py"),
                        root / "fastad" / "_backend.py"]):
        h.update(path.name.encode() + path.read_bytes())
    path = cache_dir / f"launches-{h.hexdigest()[:32]}.json"
    if path.exists():
        return json.loads(path.read_text())
    with capture() as launches:
        representative_calls(full)
    out = unique(launches)
    with atomic_write(path, "w") as f:
        f.write(json.dumps(out))
    return out


# --------------------------------------------------------------------------- compile

_REGS = re.compile(r"Used (\d+) registers")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def variants(rec: dict, target: str) -> list[dict]:
    """Compile jobs of one launch on one target: the launch itself, or every config of an
    autotuned launch with ``offered`` telling whether the autotuner's pruning keeps it."""
    if "configs" not in rec:
        return [dict(rec, target=target, config=None, offered=True)]
    import importlib

    tuner = getattr(importlib.import_module(rec["module"]), rec["autotuner"])
    configs = list(tuner.configs)
    offered = configs
    if tuner.early_config_prune is not None:
        offered = tuner.early_config_prune(configs, {}, smem_limit=TARGETS[target][1], **rec["constexprs"])
    jobs = []
    for i, cfg in enumerate(configs):
        job = dict(rec, target=target, config=i, offered=cfg in offered)
        job.pop("configs")
        job["constexprs"] = dict(rec["constexprs"], **cfg.kwargs)
        job["options"] = dict(rec["options"], num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        jobs.append(job)
    return jobs


def _job_key(job: dict) -> str:
    import importlib

    fn = getattr(importlib.import_module(job["module"]), job["kernel"])
    desc = {k: job[k] for k in ("module", "kernel", "signature", "constexprs", "aligned", "options", "target")}
    text = json.dumps(desc, sort_keys=True) + fn.cache_key + triton.__version__
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _compile_one(job: dict) -> dict:
    import importlib

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(job["module"]), job["kernel"])
    sig = {name: ("constexpr" if name in job["constexprs"] else job["signature"][name]) for name in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in job["aligned"]}
    src = ASTSource(fn, sig, job["constexprs"], attrs)
    target = GPUTarget("cuda", TARGETS[job["target"]][0], 32)
    log = io.StringIO()
    out = dict(error=None, regs=None, stack=None, spill_stores=None, spill_loads=None, shared=None, mma=None)
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=target, options=dict(job["options"]))
    except Exception as exc:  # noqa: BLE001 - the test reports every failing variant
        out["error"] = f"{type(exc).__name__}: {str(exc)[-2000:]}"
        return out
    text = log.getvalue()
    regs, frame = _REGS.search(text), _FRAME.search(text)
    if regs is None or frame is None:
        out["error"] = "no ptxas report: " + text[-500:]
        return out
    ptx = kernel.asm["ptx"]
    mma = "wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else "-"
    out.update(regs=int(regs.group(1)), stack=int(frame.group(1)), spill_stores=int(frame.group(2)),
               spill_loads=int(frame.group(3)), shared=int(kernel.metadata.shared), mma=mma)
    return out


def compile_jobs(jobs: list[dict], cache_dir: Path = _DEFAULT_CACHE,
                 progress: Callable[[str], None] | None = None) -> list[dict]:
    """Compile (or read from the cache) every job; returns the jobs with their results."""
    os.environ.pop("TRITON_INTERPRET", None)
    triton.knobs.nvidia.dump_ptxas_log = True  # ptxas -v report on stdout
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        triton.knobs.cache.dir = tmp  # always run ptxas (its report is the measurement)
        for n, job in enumerate(jobs):
            path = cache_dir / f"{_job_key(job)}.json"
            if path.exists():
                res = json.loads(path.read_text())
            else:
                res = _compile_one(job)
                with atomic_write(path, "w") as f:
                    f.write(json.dumps(res))
            if progress is not None:
                progress(f"[{n + 1}/{len(jobs)}] {label(job)}: {res}")
            results.append(dict(job, **res))
    return results


def label(job: dict) -> str:
    """Short human name of a compile job."""
    skip = {"NB"}
    consts = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in job["constexprs"].items()
                      if k not in skip and not k.endswith("_ptr"))
    opts = f"w{job['options'].get('num_warps', 4)}s{job['options'].get('num_stages', 3)}"
    return f"{job['kernel']}[{consts}]{opts}@{job['target']}"


def compile_in_subprocess(jobs: list[dict], cache_dir: Path = _DEFAULT_CACHE, timeout: float = 3600) -> list[dict]:
    """compile_jobs in a fresh process without TRITON_INTERPRET (kernels are JITFunctions there)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "jobs.json", Path(tmp) / "results.json"
        src.write_text(json.dumps(jobs))
        done = subprocess.run([sys.executable, "-m", "fastad.kernels._aot", str(src), str(dst), str(cache_dir)],
                              env=env, cwd=_ROOT, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"AOT compile process failed ({done.returncode}):\n{done.stderr[-4000:]}")
        return json.loads(dst.read_text())


def _main(argv: list[str]) -> None:
    src, dst, cache = argv
    jobs = json.loads(Path(src).read_text())
    res = compile_jobs(jobs, Path(cache), progress=lambda s: print(s, file=sys.stderr, flush=True))
    Path(dst).write_text(json.dumps(res))


if __name__ == "__main__":
    _main(sys.argv[1:])
