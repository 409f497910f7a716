"""Registers, spills and shared memory of every fastad Triton launch on sm_80 and sm_90,
compiled ahead of time (no GPU needed) -> benchmarks/results/aot-sm80-sm90.md.

    python benchmarks/aot_report.py [--out PATH]

Launches come from the public ops' calls (fastad/kernels/_aot.py, the same capture as
tests/test_aot_compile.py -m slow); compiled results are cached under build/aot-cache.
Minutes of ptxas on a fresh cache.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # the capture runs the ops in the interpreter

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # this checkout's fastad, not an installed one
SKIP = {"NB", "GROUP_OTHER", "n_splits", "M", "tau", "LOG2BC", "LOG2NCH"}
HOT = ("_screen_kernel", "_exact_kernel", "_topk_kernel", "_persistent_kernel", "_rows_kernel", "_centers_kernel",
       "_reduce_kernel")


def _variant(job: dict) -> str:
    c = {k: int(v) if isinstance(v, bool) else v for k, v in job["constexprs"].items() if k not in SKIP}
    dtype = next((t[1:] for n, t in job["signature"].items() if n in ("qs_ptr", "q_ptr", "x_ptr", "masks_ptr",
                                                                         "w_ptr")), "")
    opts = f"w{job['options'].get('num_warps', 4)}s{job['options'].get('num_stages', 3)}"
    return f"{dtype} " + ",".join(f"{k}={v}" for k, v in c.items()) + f" {opts}"


def _cell(r: dict | None) -> str:
    if r is None:
        return ""
    if r["error"]:
        return "ERROR"
    spill = f"{r['spill_stores']} B" if r["spill_stores"] or r["stack"] else "0"
    off = "" if r["offered"] else " (pruned)"
    return f"{r['regs']} / {spill} / {r['shared'] // 1024} KiB / {r['mma']}{off}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=HERE / "results" / "aot-sm80-sm90.md")
    a = p.parse_args(argv)
    from fastad._io import atomic_write
    from fastad.kernels import _aot

    t0 = time.time()
    recs = _aot.captured(full=True)
    print(f"{len(recs)} launches captured ({time.time() - t0:.0f} s)", flush=True)
    jobs = [j for t in sorted(_aot.TARGETS) for rec in recs for j in _aot.variants(rec, t)]
    results = _aot.compile_in_subprocess(jobs)
    print(f"{len(results)} compiles ({time.time() - t0:.0f} s)", flush=True)
    rows: dict = defaultdict(dict)
    for r in results:
        rows[(r["kernel"], _variant(r), r["config"])][r["target"]] = r
    targets = sorted(_aot.TARGETS)
    head = "| kernel | variant (dtype, constexprs, warps / stages) | " + " | ".join(targets) + " |"
    sep = "|---|---|" + "---|" * len(targets)

    lines = ["# Triton kernels compiled ahead of time for sm_80 and sm_90", "",
             f"`python benchmarks/aot_report.py` ({time.strftime('%Y-%m-%d', time.gmtime())}, triton "
             f"{__import__('triton').__version__}, ptxas of the triton wheel). Launches captured from the "
             "public ops' calls (fastad/kernels/_aot.py); no GPU was used. Cells: registers / spill stores "
             "per thread / shared memory / tensor-core instructions (wgmma: sm_90 warpgroup MMA, "
             "mma: mma.sync, -: none); '(pruned)': the autotuner never offers that config on that target "
             "(shared memory above the opt-in limit, 163 KiB on sm_80, 227 KiB on sm_90).", "",
             "## Hot kernels, default configs (tests/test_aot_compile.py: no spills allowed)", "", head, sep]
    for (kern, var, cfg), by in rows.items():
        if kern in HOT and cfg in (None, 0):
            lines.append(f"| {kern} | {var} | " + " | ".join(_cell(by.get(t)) for t in targets) + " |")
    lines += ["", "## Every launch and autotune config", "", head, sep]
    for (kern, var, cfg), by in rows.items():
        if not (kern in HOT and cfg in (None, 0)):
            lines.append(f"| {kern} | {var} | " + " | ".join(_cell(by.get(t)) for t in targets) + " |")
    n_spill = sum(1 for r in results if r["offered"] and not r["error"] and (r["spill_stores"] or r["stack"]))
    n_off = sum(1 for r in results if r["offered"])
    lines += ["", f"{len(results)} compiles ({len(recs)} launches x configs x {len(targets)} targets), "
              f"{sum(1 for r in results if r['error'])} errors; {n_off} offered variants, {n_spill} of them "
              "with spills or a stack frame."]
    with atomic_write(a.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
