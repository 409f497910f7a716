"""Side-by-side tables and plots from pytest-benchmark results.

Every benchmark records ``extra_info``: ``impl`` (what ran), ``role`` ("fastad" or
"peer"), optionally ``peak_mib`` and ``size`` (a number for the x axis of the plots).
Within a group (one problem), each fastad implementation gets its speed-up over every
peer: peer median / fastad median.

    python benchmarks/report.py results.json     # Markdown table from a --benchmark-json file
"""
from __future__ import annotations

import json
import math
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Mapping


def rows_from_json(path: str) -> list[dict]:
    with open(path) as f:
        data = json.load(f)
    return [
        {"group": b.get("group") or b["name"], "name": b["name"], "median": b["stats"]["median"],
         **(b.get("extra_info") or {})}
        for b in data["benchmarks"]
    ]


def environment_line(path: str) -> str:
    """Machine, Python and library versions recorded in a --benchmark-json file."""
    with open(path) as f:
        info = json.load(f).get("machine_info", {})
    cpu = info.get("cpu", {})
    libs = info.get("fastad_versions", {})
    parts = [f"machine: {cpu.get('brand_raw', info.get('processor', '?'))}, {cpu.get('count', '?')} CPUs",
             f"Python {info.get('python_version', '?')}"]
    parts += [f"{k} {v}" for k, v in libs.items()]
    return "; ".join(parts)


def markdown_table(rows: Iterable[Mapping]) -> str:
    by_group: dict[str, list[Mapping]] = defaultdict(list)
    for r in rows:
        by_group[r["group"]].append(r)
    lines = ["| problem | implementation | median ms | peak MiB | speed-up of fastad |", "|---|---|---:|---:|---|"]
    for group in sorted(by_group):
        entries = sorted(by_group[group], key=lambda r: r["median"])
        peers = [r for r in entries if r.get("role") == "peer"]
        for r in entries:
            ratio = ""
            if r.get("role") == "fastad" and peers:
                ratio = ", ".join(f"{p['median'] / r['median']:.2f}x vs {p.get('impl', p['name'])}" for p in peers)
            peak = r.get("peak_mib")
            lines.append(f"| {group} | {r.get('impl', r['name'])} | {r['median'] * 1e3:.2f} | "
                         f"{'' if peak is None else f'{peak:.0f}'} | {ratio} |")
    return "\n".join(lines)


def _family_and_size(row: Mapping) -> tuple[str, float | None]:
    """Plot family (the group name without its numbers) and the problem size (``size``
    from extra_info, else the product of the numbers in the group name)."""
    group = str(row["group"])
    family = re.sub(r"\s+", " ", re.sub(r"[\d,._x]*\d[\d,._x]*", "#", group)).strip()
    if row.get("size") is not None:
        return family, float(row["size"])
    nums = [float(n.replace(",", "").replace("_", "")) for n in re.findall(r"\d[\d,_]*", group)]
    return family, (math.prod(nums) if nums else None)


def plot_groups(rows: Iterable[Mapping], out_dir: str | Path) -> list[Path]:
    """One log-log PNG per benchmark family: median time vs problem size, a line per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[str, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        family, size = _family_and_size(r)
        if size:
            series[family][str(r.get("impl", r["name"]))].append((size, r["median"]))
    written = []
    for family, impls in series.items():
        if max(len(pts) for pts in impls.values()) < 2:
            continue  # one size only: the table says it all
        fig, ax = plt.subplots(figsize=(6, 4))
        for impl, pts in sorted(impls.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] * 1e3 for p in pts], marker="o", label=impl)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("problem size (product of the group's sizes)")
        ax.set_ylabel("median time (ms)")
        ax.set_title(family, fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = Path(out_dir) / (re.sub(r"[^A-Za-z0-9]+", "_", family).strip("_") + ".png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


if __name__ == "__main__":
    print(markdown_table(rows_from_json(sys.argv[1])))
