"""Whole-export sequential read: nbdfleece's client against nbdcopy, paired rounds.

Both clients read the same export to nowhere with the same shape of I/O:
4 connections x 8 requests in flight x 2 MiB (nbdcopy: ``--connections=4
--requests=8 --request-size=2M ... null:``).  Each round runs every client
against every server, the client order alternating between rounds; the
table gives median (min-max) MB/s (10^6 bytes/s) and the median of the
per-round ratios ours/nbdcopy.

Timing: nbdcopy is timed as a whole process (start-up included, a few ms);
our client is timed inside its process from the first connect to the last
byte (Python start-up and imports, ~0.2 s, excluded and reported apart).

Usage:  .venv/bin/python bench/client_read.py [--size 1G] [--rounds 5]
        [--servers qemu-nbd,nbdfleece] [--tmp /dev/shm]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[1]

READER = r"""
import sys, time, trio
from nbdfleece.client import open_client

uri, mode, conns, depth, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])

async def main():
    start = time.perf_counter()
    total = 0
    async with open_client(uri) as probe:
        export_size = probe.size
    next_offset = 0

    async def connection():
        nonlocal next_offset, total
        async with open_client(uri, max_in_flight=depth) as c:
            async def task():
                nonlocal next_offset, total
                buf = memoryview(bytearray(size))
                while next_offset < export_size:
                    offset = next_offset
                    next_offset += size
                    n = min(size, export_size - offset)
                    if mode == "pread":
                        data = await c.pread(offset, n)  # not `total += len(await ...)`: racy
                        total += len(data)
                    else:
                        await c.pread_into(offset, buf[:n])
                        total += n
            async with trio.open_nursery() as nursery:
                for _ in range(depth):
                    nursery.start_soon(task)

    async with trio.open_nursery() as nursery:
        for _ in range(conns):
            nursery.start_soon(connection)
    elapsed = time.perf_counter() - start
    assert total == export_size, (total, export_size)
    print(f"{elapsed} {total}")

trio.run(main)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("server did not start")


def start_server(kind: str, image: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    if kind == "qemu-nbd":
        cmd = ["qemu-nbd", "-f", "raw", "-t", "-e", "8", "-b", "127.0.0.1", "-p", str(port),
               "-x", "bench", str(image)]
    elif kind == "nbdfleece":
        cmd = [sys.executable, "-m", "nbdfleece", "serve", "--listen", f"127.0.0.1:{port}",
               "--export", f"bench={image}", "--log-level", "warning"]
    elif kind == "nbdkit":
        cmd = ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "-e", "bench", "file", str(image)]
    else:
        raise SystemExit(f"unknown server {kind}")
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    wait_port(port, proc)
    return proc


def child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_ours(uri: str, mode: str) -> tuple[float, float, float]:
    """(in-process seconds, whole-process seconds, CPU seconds of the process)."""
    cpu, t0 = child_cpu(), time.perf_counter()
    out = subprocess.run([sys.executable, "-c", READER, uri, mode, "4", "8", str(2 * MiB)],
                         capture_output=True, text=True, cwd=REPO, check=True)
    wall = time.perf_counter() - t0
    return float(out.stdout.split()[0]), wall, child_cpu() - cpu


def run_nbdcopy(uri: str) -> tuple[float, float]:
    cpu, t0 = child_cpu(), time.perf_counter()
    subprocess.run(["nbdcopy", "--connections=4", "--requests=8", f"--request-size={2 * MiB}",
                    uri, "null:"], check=True, capture_output=True)
    return time.perf_counter() - t0, child_cpu() - cpu


def startup_cpu() -> float:
    """CPU seconds of starting Python and importing trio and the client (no I/O)."""
    cpu = child_cpu()
    subprocess.run([sys.executable, "-c", "import trio, nbdfleece.client"], check=True, cwd=REPO)
    return child_cpu() - cpu


def cell(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1G")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--servers", default="qemu-nbd,nbdfleece")
    parser.add_argument("--tmp", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    parser.add_argument("--json", help="write every run here")
    args = parser.parse_args()
    for tool in ("nbdcopy", "head"):
        if shutil.which(tool) is None:
            raise SystemExit(f"missing: {tool}")
    servers = args.servers.split(",")
    scratch = Path(tempfile.mkdtemp(prefix="nbdfleece-client-bench.", dir=args.tmp))
    procs: list[subprocess.Popen[bytes]] = []
    records: list[dict[str, object]] = []
    try:
        image = scratch / "image.raw"
        subprocess.run(f"head -c {args.size} /dev/urandom > {image}", shell=True, check=True)
        size = image.stat().st_size
        uris = {}
        for kind in servers:
            port = free_port()
            procs.append(start_server(kind, image, port, scratch / f"{kind}.log"))
            uris[kind] = f"nbd://127.0.0.1:{port}/bench"
        clients = ["ours-pread_into", "ours-pread", "nbdcopy"]
        for r in range(args.rounds):
            order = clients if r % 2 == 0 else clients[::-1]
            for kind in servers[r % len(servers):] + servers[: r % len(servers)]:
                for client in order:
                    if client == "nbdcopy":
                        seconds, cpu = run_nbdcopy(uris[kind])
                        wall = seconds
                    else:
                        seconds, wall, cpu = run_ours(uris[kind], client.split("-")[1])
                    records.append({"round": r, "server": kind, "client": client, "seconds": seconds,
                                    "wall": wall, "cpu": cpu, "mbps": size / seconds / 1e6})
                    print(f"round {r} {kind:10} {client:16} {size / seconds / 1e6:8.0f} MB/s "
                          f"(process {wall:.2f} s, client CPU {cpu:.2f} s)", file=sys.stderr)
        startup = statistics.median(startup_cpu() for _ in range(3))
        print(f"\n{size / MiB:.0f} MiB random raw image on {args.tmp or 'the default tmp'}, "
              f"{args.rounds} rounds, 4 connections x 8 requests x 2 MiB; Python start-up and "
              f"imports cost {startup:.2f} CPU s (included in 'client CPU' of ours)\n")
        print("| server | client | MB/s median (min-max) | ratio to nbdcopy (paired median) "
              "| process s (median) | client CPU s (median) |")
        print("|---|---|---|---|---|---|")
        for kind in servers:
            base = {rec["round"]: rec["mbps"] for rec in records
                    if rec["server"] == kind and rec["client"] == "nbdcopy"}
            for client in clients:
                mine = [rec for rec in records if rec["server"] == kind and rec["client"] == client]
                mbps = [float(rec["mbps"]) for rec in mine]  # type: ignore[arg-type]
                ratios = [float(rec["mbps"]) / float(base[rec["round"]]) for rec in mine]  # type: ignore[arg-type]
                walls = [float(rec["wall"]) for rec in mine]  # type: ignore[arg-type]
                cpus = [float(rec["cpu"]) for rec in mine]  # type: ignore[arg-type]
                print(f"| {kind} | {client} | {cell(mbps)} | x{statistics.median(ratios):.2f} "
                      f"| {statistics.median(walls):.2f} | {statistics.median(cpus):.2f} |")
        if args.json:
            Path(args.json).write_text(json.dumps(records, indent=1))
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
