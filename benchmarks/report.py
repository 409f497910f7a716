"""Side-by-side tables from pytest-benchmark results.

Every benchmark records ``extra_info``: ``impl`` (what ran), ``role`` ("fastad" or
"peer") and optionally ``peak_mib``. Within a group (one problem size), each
fastad implementation gets its speed-up over every peer: peer median / fastad median.

    python benchmarks/report.py results.json     # Markdown table from a --benchmark-json file
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from typing import Iterable, Mapping


def rows_from_json(path: str) -> list[dict]:
    with open(path) as f:
        data = json.load(f)
    return [
        {"group": b.get("group") or b["name"], "name": b["name"], "median": b["stats"]["median"],
         **(b.get("extra_info") or {})}
        for b in data["benchmarks"]
    ]


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


if __name__ == "__main__":
    print(markdown_table(rows_from_json(sys.argv[1])))
