#!/usr/bin/env python3
"""core_summary.py - "ours vs each peer" view of a peer_bench.py --json-out file.

peer_bench.py prints ratios against a single baseline column.  This script takes
the per-round records (round i of every server is index i of its list, since the
servers run side by side within a round) and prints, for every workload and every
peer, the median (min-max) of the paired per-round ratio OURS vs PEER, oriented so
that > 1.0 always means "ours is better":

  W1*, W2, W3 (MB/s, IOPS):  ours / peer
  W0 (seconds, lower is better): peer / ours   (i.e. connect *speed* ratio)

then server CPU per W1/W2 run with the paired ratio peer CPU / our CPU (steadier than
wall time on a shared machine), W3 CPU per request and latency, and the targets from the
performance issue with PASS/MISS on the median ratio.
Stdlib only.  Usage: core_summary.py [--ours NAME] RESULT.json
"""
import argparse
import json
import statistics
import sys

# (workload, peer, description) - the targets; >= 1.0 on the oriented ratio is a pass
TARGETS = [
    ("W1a", "nbdkit-file", "sequential read, nbdcopy 4 conn >= 1.0x nbdkit file"),
    ("W1b", "nbdkit-file", "sequential read, nbdcopy -C1 -R1 >= 1.0x nbdkit file"),
    ("W1c", "nbdkit-file", "sequential read, qemu-img convert >= 1.0x nbdkit file"),
    ("W2", "qemu-nbd", "sequential write, nbdcopy >= 1.0x qemu-nbd"),
    ("W3q16", "qemu-nbd", "random 4 KiB read QD16 IOPS >= 1.0x qemu-nbd"),
    ("W0", "nbdkit-file", "connect+handshake+disconnect no slower than nbdkit file"),
]

LOWER_IS_BETTER = ("W0", "W4")


def oriented_ratios(ours, peer, wl):
    out = []
    for a, b in zip(ours, peer, strict=False):
        if not (a.get("ok") and b.get("ok")) or not a["value"] or not b["value"]:
            continue
        if wl.startswith(LOWER_IS_BETTER):
            out.append(b["value"] / a["value"])
        else:
            out.append(a["value"] / b["value"])
    return out


def cpu_ratios(ours, peer):
    """Per-round peer server CPU / our server CPU (> 1.0: ours spent less)."""
    out = []
    for a, b in zip(ours, peer, strict=False):
        if a.get("ok") and b.get("ok") and a.get("server_cpu") and b.get("server_cpu"):
            out.append(b["server_cpu"] / a["server_cpu"])
    return out


def fmt(rs):
    if not rs:
        return "n/a"
    return f"x{statistics.median(rs):.2f} ({min(rs):.2f}-{max(rs):.2f})"


def med(recs, key, prec):
    vals = [r[key] for r in recs if r.get("ok") and key in r]
    return f"{statistics.median(vals):.{prec}f}" if vals else "n/a"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json")
    ap.add_argument("--ours", default="nbdfleece")
    a = ap.parse_args()
    with open(a.json) as f:
        data = json.load(f)
    res = data["results"]
    if a.ours not in res:
        sys.exit(f"core_summary: no server named {a.ours!r} in {a.json} (have {sorted(res)})")
    peers = [n for n in res if n != a.ours]
    wls = data["meta"]["workloads"]

    L = [f"### {a.ours} vs peers (paired per-round ratios, > 1.0 = {a.ours} better)", ""]
    L.append("W0: peer time / our time; all others: our value / peer value. median (min-max) over rounds.")
    L.append("")
    L.append("| workload | " + " | ".join(f"vs {p}" for p in peers) + " |")
    L.append("|---|" + "---|" * len(peers))
    for w in wls:
        cells = [fmt(oriented_ratios(res[a.ours][w], res[p][w], w)) for p in peers]
        L.append(f"| {w} | " + " | ".join(cells) + " |")
    L.append("")

    bulk = [w for w in wls if w.startswith(("W1", "W2"))]
    if bulk:
        names = [a.ours, *peers]
        L.append("Server CPU seconds per run (median; the image is 1 GiB unless SIZE says otherwise), "
                 "and the paired ratio peer CPU / our CPU (> 1.0 = we spend less). CPU moves less "
                 "than wall time when the machine is shared:")
        L.append("")
        L.append("| workload | " + " | ".join(names) + " | " + " | ".join(f"vs {p}" for p in peers) + " |")
        L.append("|---|" + "---|" * (len(names) + len(peers)))
        for w in bulk:
            cpus = [med(res[n][w], "server_cpu", 2) for n in names]
            ratios = [fmt(cpu_ratios(res[a.ours][w], res[p][w])) for p in peers]
            L.append(f"| {w} | " + " | ".join(cpus) + " | " + " | ".join(ratios) + " |")
        L.append("")

    w3 = [w for w in wls if w.startswith("W3")]
    if w3:
        names = [a.ours, *peers]
        L.append("W3 server CPU per request (median us/op; lower is better) and latency p50 / p99 (us):")
        L.append("")
        L.append("| workload | " + " | ".join(names) + " |")
        L.append("|---|" + "---|" * len(names))
        for w in w3:
            L.append(f"| {w} srv us/op | " + " | ".join(med(res[n][w], "srv_us_op", 1) for n in names) + " |")
            L.append(f"| {w} p50 / p99 us | " + " | ".join(
                f"{med(res[n][w], 'p50_us', 0)} / {med(res[n][w], 'p99_us', 0)}" for n in names) + " |")
        L.append("")

    L.append("Targets (PASS if the median paired ratio is >= 1.00; run-to-run noise is about 10 %):")
    L.append("")
    L.append("| target | ratio | verdict |")
    L.append("|---|---|---|")
    for w, peer, desc in TARGETS:
        if w not in wls or peer not in res:
            continue
        rs = oriented_ratios(res[a.ours][w], res[peer][w], w)
        if not rs:
            verdict = "FAILED (no paired rounds)"
        else:
            verdict = "PASS" if statistics.median(rs) >= 1.0 else "MISS"
        L.append(f"| {w}: {desc} | {fmt(rs)} | {verdict} |")
    L.append("")
    print("\n".join(L))


if __name__ == "__main__":
    main()
