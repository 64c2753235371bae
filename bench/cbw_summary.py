#!/usr/bin/env python3
"""Summarise a ``run_cbw.sh`` result (the harness's ``--json-out``).

For each ``NAME-cbw`` server with a ``NAME-plain`` partner: the first W2 pass in
MB/s per round, the paired per-round ratio cbw / plain (median and range), and
the server CPU seconds per GiB written, plain and cbw (medians), so that the
cost of copy-before-write reads as CPU per GiB as well as a throughput ratio.

Usage: bench/cbw_summary.py RESULT.json
"""

from __future__ import annotations

import json
import statistics
import sys
from typing import Any


def summary(result: dict[str, Any]) -> list[str]:
    runs = result["results"]
    gib = result["meta"]["image_size"] / (1 << 30)
    lines = [f"first W2 pass, {result['meta']['runs']} rounds, paired per round (cbw / plain):", ""]
    lines.append("| pair | W2 MB/s plain -> cbw (medians) | ratio median (range) | per round | "
                 "server CPU s/GiB plain -> cbw (medians) |")
    lines.append("|---|---|---|---|---|")
    for name in runs:
        if not name.endswith("-cbw") or name[: -len("cbw")] + "plain" not in runs:
            continue
        plain = runs[name[: -len("cbw")] + "plain"]["W2"]
        cbw = runs[name]["W2"]
        pairs = [(p, c) for p, c in zip(plain, cbw, strict=False) if p.get("ok") and c.get("ok")]
        if not pairs:
            continue
        ratios = [c["value"] / p["value"] for p, c in pairs]
        lines.append(
            f"| {name} | {statistics.median(p['value'] for p, _ in pairs):.0f} -> "
            f"{statistics.median(c['value'] for _, c in pairs):.0f} | "
            f"**{statistics.median(ratios):.2f}** ({min(ratios):.2f}-{max(ratios):.2f}) | "
            + " ".join(f"{r:.2f}" for r in ratios) + " | "
            f"{statistics.median(p['server_cpu'] for p, _ in pairs) / gib:.2f} -> "
            f"{statistics.median(c['server_cpu'] for _, c in pairs) / gib:.2f} |"
        )
    return lines


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    with open(argv[1]) as f:
        print("\n".join(summary(json.load(f))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
