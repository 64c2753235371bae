#!/usr/bin/python3
"""nbd_randwrite.py - random 64 KiB first-write load for an NBD export, and the
paired-rounds driver of the random part of the copy-before-write benchmark.

``client``: one libnbd handle (module ``nbd``, Debian python3-libnbd, so run it
with /usr/bin/python3) writes --bs (64 KiB) with aio_pwrite at --qd (16)
requests in flight, at --bs-aligned offsets taken in a seeded random
permutation of the export's clusters: every cluster is written exactly once, so
with a snapshot active every write is a first write that copies.  --count
limits the number of writes, --span the part of the export used.  The data is
a fixed non-zero pattern (zeroes could be special-cased by a server).  Unlike
nbd_randread.py it is not timed by a clock but by the work: every write counts,
from the first submission to the last completion.  Prints one JSON line:
count, seconds, MB/s (1e6 bytes/s), IOPS, latency p50/p90/p99/max (us, from
submission to the moment this single-threaded loop sees the completion, so it
includes the client's own overhead).

``rounds``: paired rounds on several servers given as peer_bench.py templates
(the shared kit's ``Server`` class is imported, so a server is started, made
ready, measured and stopped exactly as peer_bench.py --restart does it: fresh
image copy, own session, CPU of every process in that session from /proc,
SIGTERM to the session).  Each round starts every server in turn (the order
rotates), runs the passes (R64: the first pass, every cluster copied; R64#2:
another permutation over clusters already copied), optionally checks a few
clusters (--check NAME=SNAPSHOT_EXPORT: the snapshot still holds the original
image, the live export holds the pattern), and stops it.  Writes a JSON file
shaped like peer_bench.py's (meta, results[server][workload] = per-round
records) for cbw_summary.py.

Usage:
  nbd_randwrite.py client --uri nbd://127.0.0.1:PORT/EXPORT [--qd 16] [--bs 65536]
                          [--seed 1] [--count N] [--span BYTES]
  nbd_randwrite.py rounds --image IMG --workdir DIR --server NAME=TEMPLATE ...
                          [--runs 5] [--passes 2] [--check NAME=EXPORT ...]
                          [--shared-bench DIR] [--json-out F] [--md-out F]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import statistics
import sys
import time
from types import ModuleType
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))


def pattern(bs: int) -> bytes:
    """The write payload: fixed, non-zero in every byte, not a repeat of 256."""
    return bytes(i % 251 + 1 for i in range(bs))


def pct(sorted_vals: list[float], p: float) -> float | None:
    if not sorted_vals:
        return None
    k = min(len(sorted_vals) - 1, max(0, round(p / 100.0 * (len(sorted_vals) - 1))))
    return sorted_vals[k]


# -- client ------------------------------------------------------------------------
def client(a: argparse.Namespace) -> int:
    import nbd  # type: ignore[import-untyped]  # libnbd: only the system interpreter has it

    h = nbd.NBD()
    h.connect_uri(a.uri)
    if h.is_read_only():
        sys.exit(f"{a.uri}: export is read-only")
    size = h.get_size()
    span = min(a.span or size, size)
    clusters = list(range(span // a.bs))
    random.Random(a.seed).shuffle(clusters)
    if a.count:
        clusters = clusters[: a.count]
    n = len(clusters)
    if n == 0:
        sys.exit(f"{a.uri}: nothing to write (size {size}, span {span}, bs {a.bs})")
    buf = nbd.Buffer.from_bytearray(bytearray(pattern(a.bs)))  # read-only for writes: shared
    done: list[int] = []
    errors: list[int] = []

    def make_cb(slot: int) -> Any:
        def cb(err: Any) -> int:       # must not call into the handle from here
            if err.value:
                errors.append(err.value)
            done.append(slot)
            return 1                   # retire the command
        return cb

    qd = min(a.qd, n)
    cbs = [make_cb(i) for i in range(qd)]
    clock = time.perf_counter
    started = [0.0] * qd
    lat: list[float] = []
    nxt = 0
    t0 = clock()
    for s in range(qd):
        started[s] = clock()
        h.aio_pwrite(buf, clusters[nxt] * a.bs, completion=cbs[s])
        nxt += 1
    while len(lat) < n:
        h.poll(-1)
        now = clock()
        if done:
            slots = done[:]
            del done[:]
            for s in slots:
                lat.append(now - started[s])
                if nxt < n:
                    started[s] = clock()
                    h.aio_pwrite(buf, clusters[nxt] * a.bs, completion=cbs[s])
                    nxt += 1
    wall = clock() - t0
    h.shutdown()
    if errors:
        sys.exit(f"{len(errors)} of {n} writes failed (first errno {errors[0]})")
    lat.sort()

    def us(v: float | None) -> float | None:
        return None if v is None else round(v * 1e6, 1)

    print(json.dumps({"qd": qd, "bs": a.bs, "count": n, "span": span, "seed": a.seed,
                      "seconds": round(wall, 4), "iops": round(n / wall, 1),
                      "MBps": round(n * a.bs / wall / 1e6, 2),
                      "p50_us": us(pct(lat, 50)), "p90_us": us(pct(lat, 90)),
                      "p99_us": us(pct(lat, 99)), "max_us": us(lat[-1])}))
    return 0


# -- rounds ------------------------------------------------------------------------
def load_peer_bench(shared: str) -> ModuleType:
    """The shared kit's peer_bench.py, for its Server class (same start/stop/CPU)."""
    path = os.path.join(shared, "peer_bench.py")
    if not os.path.isfile(path):
        sys.exit(f"missing: {path} (set --shared-bench)")
    spec = importlib.util.spec_from_file_location("peer_bench", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check(srv: Any, a: argparse.Namespace, snapshot: str | None, passes: int, rnd: int) -> str:
    """Spot-check a few clusters after the passes: the live export holds the
    pattern where a pass wrote, the snapshot export the original image."""
    import nbd

    rng = random.Random(1000 + rnd)
    size = os.path.getsize(a.image)
    picks = [rng.randrange(size // a.bs) for _ in range(a.check_clusters)]
    want = pattern(a.bs)
    bad: list[str] = []
    wrote = {c for p in range(passes) for c in planned(rnd, p, a)}
    with open(a.image, "rb") as orig:
        h = nbd.NBD()
        h.connect_uri(f"nbd://127.0.0.1:{srv.port}/{a.export}")
        for c in picks:
            got = h.pread(a.bs, c * a.bs)
            orig.seek(c * a.bs)
            expect = want if c in wrote else orig.read(a.bs)
            if got != expect:
                bad.append(f"live cluster {c}")
        h.shutdown()
        if snapshot:
            h = nbd.NBD()
            h.connect_uri(f"nbd://127.0.0.1:{srv.port}/{snapshot}")
            for c in picks:
                orig.seek(c * a.bs)
                if h.pread(a.bs, c * a.bs) != orig.read(a.bs):
                    bad.append(f"snapshot cluster {c}")
            h.shutdown()
    if bad:
        return "FAILED: " + ", ".join(bad[:5])
    return f"ok ({len(picks)} clusters{', live and snapshot' if snapshot else ''})"


def planned(rnd: int, p: int, a: argparse.Namespace) -> list[int]:
    """The clusters pass p of round rnd writes (the client's permutation)."""
    size = os.path.getsize(a.image)
    span = min(a.span or size, size)
    clusters = list(range(span // a.bs))
    random.Random(seed_of(rnd, p)).shuffle(clusters)
    return clusters[: a.count] if a.count else clusters


def seed_of(rnd: int, p: int) -> int:
    """Every server gets the same permutation in a round (paired), another in the next."""
    return 1 + rnd + 1000 * p


def session_split(sid: int) -> tuple[float, float]:
    """User and system CPU seconds of the processes in session ``sid`` (with their
    reaped children), as peer_bench.session_cpu counts them but kept apart: the
    kernel's share (page allocation, copies) is most of a copy-before-write."""
    tck = os.sysconf("SC_CLK_TCK")
    user = system = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                st = f.read()
        except OSError:
            continue
        fields = st[st.rfind(")") + 2:].split()
        if int(fields[3]) == sid:
            user += int(fields[11]) + int(fields[13])
            system += int(fields[12]) + int(fields[14])
    return user / tck, system / tck


def measure(pb: ModuleType, srv: Any, a: argparse.Namespace, rnd: int, p: int) -> dict[str, Any]:
    argv = [sys.executable, os.path.abspath(__file__), "client", "--uri", srv.uri,
            "--qd", str(a.qd), "--bs", str(a.bs), "--seed", str(seed_of(rnd, p))]
    if a.count:
        argv += ["--count", str(a.count)]
    if a.span:
        argv += ["--span", str(a.span)]
    pb.resource_children_delta()
    u0, s0 = session_split(srv.sid)
    r = pb.run_client(argv, a.client_timeout)
    u1, s1 = session_split(srv.sid)
    c0, c1 = u0 + s0, u1 + s1
    if r is None or r["rc"] != 0:
        pb.log(f"  !! pass {p + 1} on {srv.name} failed: {r and r['err']}")
        return {"ok": False, "err": r and r["err"]}
    j = json.loads(r["out"].strip().splitlines()[-1])
    nbytes = j["count"] * j["bs"]
    return {"ok": True, "value": j["MBps"], "iops": j["iops"], "p50_us": j["p50_us"],
            "p99_us": j["p99_us"], "count": j["count"], "bytes": nbytes, "seconds": j["seconds"],
            "wall": r["wall"], "client_cpu": r["client_cpu"], "server_cpu": c1 - c0,
            "server_user": u1 - u0, "server_sys": s1 - s0,
            "srv_us_op": (c1 - c0) / j["count"] * 1e6}


def rounds(a: argparse.Namespace) -> int:
    pb = load_peer_bench(a.shared_bench)
    os.makedirs(a.workdir, exist_ok=True)
    size = os.path.getsize(a.image)
    hargs = argparse.Namespace(image=a.image, no_copy=False, export=a.export, size=size,
                               workdir=a.workdir, port_base=a.port_base, start_timeout=a.start_timeout,
                               keep=False)
    servers = []
    for i, spec in enumerate(a.server):
        name, tpl = spec.split("=", 1)
        servers.append(pb.Server(name, tpl, hargs, i))
    snap = dict(spec.split("=", 1) for spec in a.check)
    wls = ["R64"] + [f"R64#{p + 1}" for p in range(1, a.passes)]
    results: dict[str, dict[str, list[dict[str, Any]]]] = {s.name: {w: [] for w in wls} for s in servers}
    checks: dict[str, list[str]] = {s.name: [] for s in servers}
    meta = {"title": a.title, "image_size": size, "workdir_fs": pb.fs_type(a.workdir), "runs": a.runs,
            "workloads": wls, "bs": a.bs, "qd": a.qd, "count": a.count, "span": a.span,
            "servers": {s.name: {"cmd": s.template} for s in servers},
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "nproc": os.cpu_count(), "restart": True}
    try:
        for rnd in range(a.runs):
            order = servers[rnd % len(servers):] + servers[:rnd % len(servers)]
            pb.log(f"round {rnd + 1}/{a.runs} order={[s.name for s in order]}")
            for s in order:
                s.start()
                meta["servers"][s.name]["info"] = s.info
                for p, w in enumerate(wls):
                    rec = measure(pb, s, a, rnd, p)
                    results[s.name][w].append(rec)
                    pb.log(f"  {w:8s} {s.name:14s} {short(rec)}")
                if a.check_clusters:
                    verdict = check(s, a, snap.get(s.name), a.passes, rnd)
                    checks[s.name].append(verdict)
                    pb.log(f"  check    {s.name:14s} {verdict}")
                s.stop()
    finally:
        for s in servers:
            s.stop()
    out = {"meta": meta, "results": results, "checks": checks}
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(out, f, indent=1)
    md = render(out)
    print(md)
    if a.md_out:
        with open(a.md_out, "w") as f:
            f.write(md + "\n")
    failed = any(not r.get("ok") for sv in results.values() for rs in sv.values() for r in rs)
    return 1 if failed or any(v.startswith("FAILED") for vs in checks.values() for v in vs) else 0


def short(r: dict[str, Any]) -> str:
    if not r.get("ok"):
        return "FAILED"
    return (f"{r['value']:.0f} MB/s {r['iops']:.0f} IOPS p50={r['p50_us']}us p99={r['p99_us']}us "
            f"({r['seconds']:.2f}s) srvcpu={r['server_cpu']:.2f} (sys {r['server_sys']:.2f}) "
            f"clicpu={r['client_cpu']:.2f}")


def fmt(vals: list[float], prec: int) -> str:
    if not vals:
        return "n/a"
    return f"{statistics.median(vals):.{prec}f} ({min(vals):.{prec}f}-{max(vals):.{prec}f})"


def render(out: dict[str, Any]) -> str:
    meta, results = out["meta"], out["results"]
    names = list(results)
    lines = [f"### {meta['title'] or 'random writes'}  ({meta['started']}, image "
             f"{meta['image_size'] / 2**30:.2f} GiB on {meta['workdir_fs']}, {meta['runs']} rounds, "
             f"fresh server per round, {meta['bs'] // 1024} KiB writes at QD{meta['qd']})", "",
             "median (min-max) over rounds", "",
             "| pass | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    rows = [("MB/s", "value", 0), ("IOPS", "iops", 0), ("p50 us", "p50_us", 0), ("p99 us", "p99_us", 0),
            ("server CPU s", "server_cpu", 2), ("of it system s", "server_sys", 2),
            ("server us/write", "srv_us_op", 1),
            ("client CPU s", "client_cpu", 2)]
    for w in meta["workloads"]:
        for label, key, prec in rows:
            lines.append(f"| {w} {label} | " + " | ".join(
                fmt([r[key] for r in results[n][w] if r.get("ok") and key in r], prec) for n in names) + " |")
    checks = out.get("checks", {})
    if any(checks.values()):
        lines += ["", "Spot checks after the passes: " + "; ".join(
            f"{n}: {', '.join(sorted(set(v)))}" for n, v in checks.items() if v)]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("client", help="one pass of random first writes, one JSON line out")
    c.add_argument("--uri", required=True)
    c.add_argument("--qd", type=int, default=16)
    c.add_argument("--bs", type=int, default=65536)
    c.add_argument("--seed", type=int, default=1)
    c.add_argument("--count", type=int, default=0, help="stop after N writes (0: every cluster)")
    c.add_argument("--span", type=int, default=0, help="only clusters in [0, span) (0: whole export)")
    r = sub.add_parser("rounds", help="paired rounds on several servers (peer_bench.py templates)")
    r.add_argument("--image", required=True, help="source raw image (copied per server and round)")
    r.add_argument("--workdir", required=True)
    r.add_argument("--server", action="append", required=True, metavar="NAME=TEMPLATE")
    r.add_argument("--check", action="append", default=[], metavar="NAME=SNAPSHOT_EXPORT",
                   help="spot-check this server's snapshot export too (others: the live export only)")
    r.add_argument("--check-clusters", type=int, default=32, help="clusters per spot check (0: none)")
    r.add_argument("--runs", type=int, default=5)
    r.add_argument("--passes", type=int, default=2, help="R64 (first writes), then R64#2 ... (copied)")
    r.add_argument("--qd", type=int, default=16)
    r.add_argument("--bs", type=int, default=65536)
    r.add_argument("--count", type=int, default=0)
    r.add_argument("--span", type=int, default=0)
    r.add_argument("--export", default="bench")
    r.add_argument("--port-base", type=int, default=10910)
    r.add_argument("--start-timeout", type=float, default=20)
    r.add_argument("--client-timeout", type=float, default=600)
    r.add_argument("--shared-bench", default=os.path.join(HERE, "..", "..", "shared", "bench"))
    r.add_argument("--title", default="")
    r.add_argument("--json-out")
    r.add_argument("--md-out")
    a = ap.parse_args(argv[1:])
    if a.bs <= 0 or a.qd <= 0:
        ap.error("--bs and --qd must be positive")
    return client(a) if a.cmd == "client" else rounds(a)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
