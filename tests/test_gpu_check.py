"""CPU-side self-check of benchmarks/gpu_check.py (``make gpu-check``): the script must
not be broken on the day a GPU is lent."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_without_a_gpu_it_says_so_and_exits_0():
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "no CUDA device" in done.stdout


def test_dry_run_builds_and_runs_every_case(tmp_path):
    """--dry-run: every benchmark case at a tiny size on the CPU (Triton interpreted), the
    model benchmarks collected, and the report written."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    report = (tmp_path / "gpu-dry-run-cpu.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| ") and not line.startswith("| group")]
    groups = {r.split(" | ")[0][2:] for r in rows}
    assert len(groups) == 9, groups
    assert any("43,808x1,000,000x1,024" in g for g in groups)
    for r in rows:  # every implementation ran: a time, no error message
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert float(cells[3]) > 0, r
    for text in ("650 TFLOP/s", "1.3x torch bf16", "5x the dense", "30x the torch loop"):
        assert text in report
    assert "32 tests collected" in done.stdout or "collected" in done.stdout
