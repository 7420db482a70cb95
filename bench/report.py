#!/usr/bin/env python3
"""Print the results JSON of bench/run.py as a Markdown table, for docs/benchmarks.md.

Run: python3 bench/report.py [bench/results/full.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

DEFAULT = Path(__file__).resolve().parent / "results" / "full.json"


def number(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value:.3f} s" if value < 10 else f"{value:.1f} s"
    return f"{value:.2f} {unit.split()[0]}" if unit.startswith("%") else f"{value:.1f} {unit.split()[0]}"


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else DEFAULT
    data = json.loads(path.read_text())
    print("| Scenario | quil-cluster median | Peer | Peer median | Ratio | Runs | Target |")
    print("|---|---|---|---|---|---|---|")
    for row in data["results"]:
        ratio = f"{row['ratio']:.2f}" if row["ratio"] is not None else "-"
        print(f"| {row['scenario']} | {number(row['ours_median'], row['unit'])} | {row['peer']} | "
              f"{number(row['peer_median'], row['unit'])} | {ratio} | {len(row['ours'])} / {len(row['peer_runs'])} "
              f"| {row['target']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
