#!/usr/bin/env python3
"""Summarise a ``run_cbw.sh`` result (the harness's ``--json-out``, or the random
phase's ``nbd_randwrite.py rounds --json-out``).

For each ``NAME-cbw`` server with a ``NAME-plain`` partner: the first pass (W2,
sequential, or R64, random 64 KiB writes) in MB/s per round, the paired
per-round ratio cbw / plain (median and range), and the server CPU seconds per
GiB written, plain and cbw (medians), so that the cost of copy-before-write
reads as CPU per GiB as well as a throughput ratio.  The sequential phase also
lists the cbw server's CPU per GiB in each round: on a VM that hands freed
memory back to the host, a round whose overlay got such pages shows up there
(2-3x the CPU of the other rounds).  The random phase adds IOPS, p50/p99
latency and the second pass (R64#2, clusters already copied).  Both phases,
when ``ours-*`` and ``qsd-*`` pairs ran in the same rounds, end with the
per-round quotient of the two overhead ratios and the target verdict.

Usage: bench/cbw_summary.py RESULT.json
"""

from __future__ import annotations

import json
import statistics
import sys
from typing import Any

Rec = dict[str, Any]


def _plain_of(name: str) -> str:
    """The plain partner: ``ours-cbw`` and an A/B variant ``ours-cbw-b`` -> ``ours-plain``."""
    return name.split("-cbw")[0] + "-plain"


def _pairs(runs: dict[str, Any], name: str, wl: str) -> list[tuple[Rec, Rec]]:
    plain = runs[_plain_of(name)].get(wl, [])
    cbw = runs[name].get(wl, [])
    return [(p, c) for p, c in zip(plain, cbw, strict=False) if p.get("ok") and c.get("ok")]


def _cbw_names(runs: dict[str, Any]) -> list[str]:
    return [n for n in runs if "-cbw" in n and _plain_of(n) in runs]


def _ratios(pairs: list[tuple[Rec, Rec]]) -> list[float]:
    return [c["value"] / p["value"] for p, c in pairs]


def _med(vals: Any) -> float:
    return float(statistics.median(vals))


def _by_round(runs: dict[str, Any], name: str, wl: str) -> list[float | None]:
    """cbw / plain per round, None where either run failed (keeps rounds aligned)."""
    plain = runs[_plain_of(name)].get(wl, [])
    cbw = runs[name].get(wl, [])
    return [c["value"] / p["value"] if p.get("ok") and c.get("ok") else None
            for p, c in zip(plain, cbw, strict=False)]


def _verdict(by_round: dict[str, list[float | None]], wl: str) -> list[str]:
    """ours vs qsd in the same rounds: the quotient of the overhead ratios and the target."""
    ours, qsd = by_round.get("ours-cbw"), by_round.get("qsd-cbw")
    if not (ours and qsd):
        return []
    q = [o / s for o, s in zip(ours, qsd, strict=False) if o is not None and s is not None]
    if not q:
        return []
    o_med = _med(r for r in ours if r is not None)
    s_med = _med(r for r in qsd if r is not None)
    return ["", f"ours ratio / qsd ratio, same round: median **{_med(q):.2f}** "
            f"({min(q):.2f}-{max(q):.2f}; " + " ".join(f"{r:.2f}" for r in q) + ")",
            f"target (ours-cbw/ours-plain >= qsd-cbw/qsd-plain on {wl}): {o_med:.2f} vs {s_med:.2f}: "
            + ("met" if o_med >= s_med else "NOT met")
            + (" (within 0.05: a tie on a shared machine)" if abs(o_med - s_med) < 0.05 else "")]


def summary(result: dict[str, Any]) -> list[str]:
    if "R64" in result["meta"].get("workloads", []):
        return random_summary(result)
    runs = result["results"]
    gib = result["meta"]["image_size"] / (1 << 30)
    lines = [f"first W2 pass, {result['meta']['runs']} rounds, paired per round (cbw / plain):", ""]
    lines.append("| pair | W2 MB/s plain -> cbw (medians) | ratio median (range) | per round | "
                 "server CPU s/GiB plain -> cbw (medians) | cbw server CPU s/GiB per round |")
    lines.append("|---|---|---|---|---|---|")
    by_round: dict[str, list[float | None]] = {}
    for name in _cbw_names(runs):
        pairs = _pairs(runs, name, "W2")
        if not pairs:
            continue
        ratios = _ratios(pairs)
        by_round[name] = _by_round(runs, name, "W2")
        lines.append(
            f"| {name} | {_med(p['value'] for p, _ in pairs):.0f} -> "
            f"{_med(c['value'] for _, c in pairs):.0f} | "
            f"**{_med(ratios):.2f}** ({min(ratios):.2f}-{max(ratios):.2f}) | "
            + " ".join(f"{r:.2f}" for r in ratios) + " | "
            f"{_med(p['server_cpu'] for p, _ in pairs) / gib:.2f} -> "
            f"{_med(c['server_cpu'] for _, c in pairs) / gib:.2f} | "
            + " ".join(f"{c['server_cpu'] / gib:.2f}" for _, c in pairs) + " |"
        )
    return lines + _verdict(by_round, "W2")


def _per_gib(rec: Rec, key: str = "server_cpu") -> float:
    """Server CPU seconds (or its ``server_sys`` part) per GiB that this pass wrote."""
    return float(rec[key]) / (float(rec["bytes"]) / (1 << 30))


def random_summary(result: dict[str, Any]) -> list[str]:
    """The random phase: R64 (first writes) and R64#2 (clusters already copied)."""
    meta, runs = result["meta"], result["results"]
    second = next((w for w in meta["workloads"] if w != "R64"), None)
    lines = [f"random {meta['bs'] // 1024} KiB writes at QD{meta['qd']}, first pass (R64: every write "
             f"copies a cluster), {meta['runs']} rounds, paired per round (cbw / plain):", ""]
    lines.append("| pair | R64 MB/s plain -> cbw | IOPS plain -> cbw | **ratio** median (range) | "
                 "per round | p50 / p99 us plain -> cbw | server CPU s/GiB plain -> cbw | "
                 "server us/write plain -> cbw |"
                 + (f" {second} ratio (copied) |" if second else ""))
    lines.append("|---|---|---|---|---|---|---|---|" + ("---|" if second else ""))
    by_round: dict[str, list[float | None]] = {}
    for name in _cbw_names(runs):
        pairs = _pairs(runs, name, "R64")
        if not pairs:
            continue
        ratios = _ratios(pairs)
        by_round[name] = _by_round(runs, name, "R64")

        def m(key: str, side: int, prec: int = 0, _pairs: list[tuple[Rec, Rec]] = pairs) -> str:
            return f"{_med(pc[side][key] for pc in _pairs):.{prec}f}"

        row = (f"| {name} | {m('value', 0)} -> {m('value', 1)} | {m('iops', 0)} -> {m('iops', 1)} | "
               f"**{_med(ratios):.2f}** ({min(ratios):.2f}-{max(ratios):.2f}) | "
               + " ".join(f"{r:.2f}" for r in ratios) + " | "
               f"{m('p50_us', 0)} / {m('p99_us', 0)} -> {m('p50_us', 1)} / {m('p99_us', 1)} | "
               f"{_med(_per_gib(p) for p, _ in pairs):.2f} -> {_med(_per_gib(c) for _, c in pairs):.2f}"
               + (f" (system {_med(_per_gib(p, 'server_sys') for p, _ in pairs):.2f} -> "
                  f"{_med(_per_gib(c, 'server_sys') for _, c in pairs):.2f})"
                  if all("server_sys" in r for pc in pairs for r in pc) else "") + " | "
               f"{m('srv_us_op', 0, 1)} -> {m('srv_us_op', 1, 1)} |")
        if second:
            again = _ratios(_pairs(runs, name, second))
            row += (f" {_med(again):.2f} ({min(again):.2f}-{max(again):.2f}) |" if again else " n/a |")
        lines.append(row)
    lines += _verdict(by_round, "R64")
    checks = result.get("checks", {})
    failed = [f"{n}: {v}" for n, vs in checks.items() for v in vs if v.startswith("FAILED")]
    if checks:
        lines += ["", "spot checks (live export holds the pattern, snapshot the original image): "
                  + ("; ".join(failed) if failed else
                     f"all {sum(len(v) for v in checks.values())} passed")]
    return lines


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print((__doc__ or "").strip().splitlines()[-1], file=sys.stderr)
        return 2
    with open(argv[1]) as f:
        print("\n".join(summary(json.load(f))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
