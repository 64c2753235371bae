#!/usr/bin/env python3
"""Backup agent benchmark (run by run_backup.sh): full backup vs nbdcopy, incremental vs reading it all.

One nbdfleece server exports a sparse raw disk (half of it random data, in
8 MiB runs every other 8 MiB) with a QMP monitor.  After one untimed full backup
(warm-up), per round, in rotating order:

  full      ``nbdfleece-backup full`` into an empty folder (whole command, wall time),
            with xxh3-128 pieces (the default), ``--checksum sha256`` and ``--checksum crc32``
  nbdcopy   ``nbdfleece snapshot create`` + ``nbdcopy`` of that snapshot export into a
            raw file on the same filesystem + ``snapshot delete`` (wall time of nbdcopy alone)

then, on a chain seeded by one full backup:

  dirty     1 % of the disk rewritten as scattered 64 KiB blocks (this project's NBD client)
  inc       ``nbdfleece-backup incremental`` (wall time, bytes read from the manifest)
  read-all  ``nbdcopy`` of a snapshot of the whole disk to /dev/null (what a backup
            without a bitmap would have to read)

Figures: paired per-round ratios (nbdcopy time / our time: > 1 = we are faster),
medians; the incremental's bytes read against the dirty bytes written.  Two
ratios for the full backup: of the whole command (interpreter start, QMP
snapshot and bitmap, teardown: about 0.3-0.4 s that nbdcopy, timed alone on a
snapshot made beforehand, does not pay), and of its data path alone
(``copy_seconds`` in the manifest: connections, block status, reads, image
written and committed, the same work as the timed nbdcopy).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

from nbdfleece.client import open_client

MiB = 1 << 20
BLOCK = 64 << 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


SERVER_PID = 0
TICK = os.sysconf("SC_CLK_TCK")


def server_cpu() -> float:
    """CPU seconds (user + system) the server process has used so far."""
    fields = Path(f"/proc/{SERVER_PID}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


LAST: dict[str, float] = {}


def timed(cmd: list[str], **kw: Any) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Wall seconds; ``LAST`` gets the CPU seconds of the command and of the server meanwhile."""
    client0, server0 = children_cpu(), server_cpu()
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    elapsed = time.monotonic() - start
    LAST.update(client=children_cpu() - client0, server=server_cpu() - server0)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return elapsed, proc


def make_disk(path: Path, size: int) -> int:
    """Half data: 8 MiB of random bytes every other 8 MiB; returns the data bytes."""
    run = 8 * MiB
    data = 0
    with open(path, "wb") as f:
        f.truncate(size)
        for offset in range(0, size, 2 * run):
            f.seek(offset)
            n = min(run, size - offset)
            f.write(os.urandom(n))
            data += n
    return data


async def dirty(uri: str, size: int, fraction: float, seed: int) -> int:
    """Rewrite ``fraction`` of the disk as distinct scattered 64 KiB blocks; returns the bytes."""
    rng = random.Random(seed)
    count = int(size * fraction) // BLOCK
    blocks = rng.sample(range(size // BLOCK), count)
    payload = os.urandom(BLOCK)
    async with open_client(uri) as client:
        async with trio.open_nursery() as nursery:
            sem = trio.Semaphore(16)

            async def one(b: int) -> None:
                async with sem:
                    await client.pwrite(b * BLOCK, payload)

            for b in blocks:
                nursery.start_soon(one, b)
        await client.flush()
    return count * BLOCK


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scratch", type=Path, required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--ab", type=Path, metavar="DIR",
                    help="a folder holding another nbdfleece_backup package (e.g. from git archive), "
                    "and maybe an nbdfleece package (then its NBD client is used): its full backup joins "
                    "the rounds as '<--ab-checksum>-ab'")
    ap.add_argument("--ab-checksum", default="sha256", help="the piece checksum of the A/B full backup")
    ap.add_argument("--checksums", default="xxh3-128,sha256,crc32",
                    help="comma-separated piece checksums of the full backups in each round")
    ap.add_argument("--settle", type=float, default=0.0, metavar="SECONDS",
                    help="pause before each timed full backup and each timed nbdcopy, so that "
                    "every command starts with the memory the previous one freed already handed "
                    "back to the host (see the README's note on free page reporting)")
    args = ap.parse_args()
    py = args.python
    scratch: Path = args.scratch
    disk = scratch / "live.raw"
    data_bytes = make_disk(disk, args.size)
    port = free_port()
    qmp = scratch / "qmp.sock"
    log = open(scratch / "server.log", "wb")  # noqa: SIM115 - closed at the end
    global SERVER_PID
    server = subprocess.Popen([py, "-m", "nbdfleece", "serve", "--listen", f"127.0.0.1:{port}",
                               "--export", f"live={disk}", "--qmp", f"unix:{qmp}", "--data-dir",
                               str(scratch / "data"), "--log-level", "warning"], stdout=log, stderr=log)
    SERVER_PID = server.pid
    nbd = f"nbd://127.0.0.1:{port}"
    agent = [py, "-m", "nbdfleece_backup"]
    snap = [py, "-m", "nbdfleece", "snapshot", "--qmp", f"unix:{qmp}"]
    records: list[dict[str, Any]] = []
    try:
        for _ in range(300):
            if qmp.exists():
                break
            time.sleep(0.05)
        # -- warm-up: the first backup after the disk was written ran 1.5-3x slower than the
        # later ones (page cache, server start), and it was always round 0's first variant.
        warm = scratch / "warm-up"
        timed([*agent, "full", "--quiet", "--server", nbd, "--qmp", str(qmp), "--export", "live",
               "--to", str(warm)])
        shutil.rmtree(warm)
        # -- full backup (xxh3-128, sha256 and crc32 pieces) vs nbdcopy of a snapshot -------
        ab_variant = f"{args.ab_checksum}-ab"
        variants = [*args.checksums.split(","), "nbdcopy"] + ([ab_variant] if args.ab else [])
        ours_variants = [v for v in variants if v != "nbdcopy"]
        for r in range(args.rounds):
            k = r % len(variants)
            order = variants[k:] + variants[:k]
            rec: dict[str, Any] = {"round": r, "order": order, "load": os.getloadavg()[0]}
            for what in order:
                if what != "nbdcopy":
                    folder = scratch / f"full-{r}"
                    env = None
                    if what.endswith("-ab"):
                        env = dict(os.environ, PYTHONPATH=f"{args.ab}:{os.environ.get('PYTHONPATH', '')}")
                    time.sleep(args.settle)
                    t, _ = timed([*agent, "full", "--quiet", "--checksum", what.removesuffix("-ab"),
                                  "--server", nbd, "--qmp", str(qmp), "--export", "live",
                                  "--to", str(folder)], env=env)
                    point = json.loads((folder / "manifest.json").read_text())["points"][0]
                    rec[what] = {"s": t, "cpu": LAST["client"], "server_cpu": LAST["server"],
                                 "read": point["bytes_read"], "inner_s": point["seconds"],
                                 "copy_s": point.get("copy_seconds") or point["seconds"],
                                 "image": point["image_size"]}
                    shutil.rmtree(folder)
                else:
                    timed([*snap, "create", f"s{r}", "--of", "live"])
                    out = scratch / f"copy-{r}.raw"
                    time.sleep(args.settle)
                    t, _ = timed(["nbdcopy", f"{nbd}/s{r}", str(out)])
                    rec["nbdcopy"] = {"s": t, "cpu": LAST["client"], "server_cpu": LAST["server"]}
                    timed([*snap, "delete", f"s{r}"])
                    os.unlink(out)
            peer = rec["nbdcopy"]
            line = [f"round {r} (load {rec['load']:.1f}): nbdcopy {peer['s']:.2f} s "
                    f"({data_bytes / peer['s'] / MiB:.0f} MiB/s, "
                    f"CPU {peer['cpu']:.2f}+{peer['server_cpu']:.2f} s)"]
            for algo in ours_variants:
                ours = rec[algo]
                ours["ratio"] = peer["s"] / ours["s"]
                ours["copy_ratio"] = peer["s"] / ours["copy_s"]
                ours["cpu_ratio"] = (peer["cpu"] + peer["server_cpu"]) / (ours["cpu"] + ours["server_cpu"])
                line.append(f"full/{algo} {ours['s']:.2f} s ({ours['read'] / ours['s'] / MiB:.0f} MiB/s, "
                            f"CPU {ours['cpu']:.2f}+{ours['server_cpu']:.2f} s) ratio {ours['ratio']:.2f} "
                            f"(CPU ratio {ours['cpu_ratio']:.2f}; data path {ours['copy_s']:.2f} s, "
                            f"ratio {ours['copy_ratio']:.2f})")
            records.append(rec)
            print("; ".join(line), flush=True)
        # -- incremental with 1 % scattered dirty data ------------------------------------
        chain = scratch / "chain"
        timed([*agent, "full", "--quiet", "--server", nbd, "--qmp", str(qmp), "--export", "live",
               "--to", str(chain)])
        inc_records: list[dict[str, Any]] = []
        for r in range(args.rounds):
            written = trio.run(dirty, f"{nbd}/live", args.size, 0.01, r)
            rec = {"round": r, "dirty_written": written, "load": os.getloadavg()[0]}
            order = ["inc", "readall"] if r % 2 == 0 else ["readall", "inc"]
            for what in order:
                if what == "inc":
                    t, _ = timed([*agent, "incremental", "--quiet", "--server", nbd, "--qmp", str(qmp),
                                  "--export", "live", "--to", str(chain)])
                    point = json.loads((chain / "manifest.json").read_text())["points"][-1]
                    assert point["kind"] == "incremental", point
                    rec.update(inc_s=t, inc_read=point["bytes_read"], inc_dirty=point["dirty_bytes"],
                               inc_inner_s=point["seconds"])
                else:
                    timed([*snap, "create", f"a{r}", "--of", "live"])
                    t, _ = timed(["nbdcopy", f"{nbd}/a{r}", "null:"])
                    timed([*snap, "delete", f"a{r}"])
                    rec["readall_s"] = t
            rec["ratio"] = rec["readall_s"] / rec["inc_s"]
            rec["read_over_dirty"] = rec["inc_read"] / rec["dirty_written"]
            inc_records.append(rec)
            print(f"round {r}: incremental {rec['inc_s']:.2f} s, read {rec['inc_read']} B for "
                  f"{rec['dirty_written']} B written dirty (x{rec['read_over_dirty']:.3f}); "
                  f"nbdcopy of the whole disk {rec['readall_s']:.2f} s; ratio {rec['ratio']:.1f}", flush=True)
    finally:
        server.terminate()
        server.wait(60)
        log.close()
    versions = {
        "nbdcopy": subprocess.run(["nbdcopy", "--version"], capture_output=True, text=True).stdout.split()[1],
        "python": sys.version.split()[0],
        "trio": trio.__version__,
    }
    summary = {
        "size": args.size, "data_bytes": data_bytes, "rounds": args.rounds, "versions": versions,
        "settle_s": args.settle,
        "full": records, "incremental": inc_records,
        "nbdcopy_mib_s_median": statistics.median(data_bytes / r["nbdcopy"]["s"] / MiB for r in records),
        "nbdcopy_cpu_median": statistics.median(r["nbdcopy"]["cpu"] + r["nbdcopy"]["server_cpu"]
                                                for r in records),
        **{f"full_{algo}_cpu_median": statistics.median(r[algo]["cpu"] + r[algo]["server_cpu"]
                                                        for r in records)
           for algo in ours_variants},
        **{f"full_{algo}_agent_cpu_median": statistics.median(r[algo]["cpu"] for r in records)
           for algo in ours_variants},
        **{f"full_{algo}_{key}_median": statistics.median(r[algo][key] for r in records)
           for algo in ours_variants for key in ("ratio", "cpu_ratio", "copy_ratio")},
        **{f"full_{algo}_mib_s_median": statistics.median(r[algo]["read"] / r[algo]["s"] / MiB
                                                          for r in records)
           for algo in ours_variants},
        **{f"full_{algo}_ratio_{name}": fn(r[algo]["ratio"] for r in records)
           for algo in ours_variants for name, fn in (("min", min), ("max", max))},
        "load_median": statistics.median(r["load"] for r in records + inc_records),
        "inc_ratio_median": statistics.median(r["ratio"] for r in inc_records),
        "inc_read_over_dirty_max": max(r["read_over_dirty"] for r in inc_records),
        "inc_s_median": statistics.median(r["inc_s"] for r in inc_records),
        "readall_s_median": statistics.median(r["readall_s"] for r in inc_records),
    }
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, list)}, indent=2))


if __name__ == "__main__":
    main()
