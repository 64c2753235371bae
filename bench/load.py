"""Load benchmark: many concurrent NBD clients against one server while snapshots come and go.

Not a test: it prints figures (ops/s, p50/p99 latency per operation, server
peak RSS) and counts what must stay zero (protocol errors, verification
failures).  ``bench/run_load.sh`` runs it on tmpfs; see bench/README.md.

The data model
--------------
Each export is cut into 64 KiB *blocks*, and each client owns a contiguous,
disjoint run of blocks of the export it is connected to.  Only the owner
writes (or zeroes) its blocks, one request at a time, so it always knows their
exact contents.  A block written with *version* v holds, in each 4 KiB page,
the 16-byte unit ``(export, client, page, block, v)`` repeated, so a page that
landed in the wrong place, or a torn mix of two writes, is recognised.  Every
modification is logged per block as ``(issued, completed, version)`` with one
clock (``time.monotonic``) shared by every thread, which allows these checks:

* own reads: exactly the last version written (or zeros);
* reads of other clients' blocks: each 8-byte word belongs to a version that
  was written there at some time, or to zeros (a read may mix old and new
  data of a concurrent write, even inside a page);
* ``base:allocation``: nothing that the model says holds data is reported as
  reading zeros (the converse is not checked: a zeroed range may stay allocated);
* the live dirty bitmap: a block modified since the last rotation
  (``snapshot create --bitmap``) that could have run before the query must be
  dirty; a block not modified since a rotation that ended before the query
  began must be clean (bits from other clients' writes would show here);
* each snapshot: a random sample of blocks read from the snapshot export must
  hold exactly the version that was current when the snapshot was taken (or,
  for blocks modified while the ``snapshot create`` command ran, word by word
  one of the versions involved), and its frozen bitmap is checked
  over the whole export against the window between this and the previous
  rotation;
* at the end, after the server stopped, every block of every image file is
  exactly the model's last version.

A controller thread creates a snapshot every ``--snapshot-interval`` seconds
with ``nbdfleece snapshot create NAME --of EXPORT --bitmap BITMAP`` (the real
CLI over QMP), round-robin over the exports, and deletes the oldest one
(``nbdfleece snapshot delete``) when more than ``--keep`` exist.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbd
import numpy as np

BLOCK = 64 * 1024
PAGE = 4096
PAGES = BLOCK // PAGE
UNIT = struct.Struct(">BBHIQ")  # export, client, page, block, version
ZERO_BLOCK = bytes(BLOCK)
INF = float("inf")
STATE_ZERO = 2  # base:allocation NBD_STATE_ZERO
DIRTY = 1


def close(h: nbd.NBD) -> None:
    """Free a handle now (libnbd 1.14's binding has no ``close``; the handle goes with GC)."""
    closer = getattr(h, "close", None)
    if closer is not None:
        closer()


def page_bytes(export: int, client: int, page: int, block: int, version: int) -> bytes:
    return UNIT.pack(export, client, page, block, version) * (PAGE // UNIT.size)


def block_bytes(export: int, client: int, block: int, version: int) -> bytes:
    if version == 0:
        return ZERO_BLOCK
    return b"".join(page_bytes(export, client, p, block, version) for p in range(PAGES))


@dataclass
class Mod:
    """One modification of a block: issued and completed times, version (0: zeroes)."""

    issued: float
    version: int
    done: float = INF


@dataclass
class Rotation:
    """One ``snapshot create --bitmap``: its command's start and end."""

    export: int
    name: str
    start: float
    end: float


@dataclass
class Stats:
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    protocol_errors: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    harness_errors: list[str] = field(default_factory=list)
    """Exceptions in this script's own threads: the run proves nothing then."""
    checks: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fail(self, text: str) -> None:
        with self.lock:
            self.failures.append(text)

    def error(self, text: str) -> None:
        with self.lock:
            self.protocol_errors.append(text)


class Model:
    """Who owns which block, every modification, and every version ever written."""

    def __init__(self, exports: int, blocks: int, clients: int) -> None:
        self.exports = exports
        self.blocks = blocks
        self.owner: list[list[int]] = [[-1] * blocks for _ in range(exports)]
        self.ranges: dict[int, tuple[int, int, int]] = {}
        """client -> (export, first block, end block)."""
        self.history: list[list[list[Mod]]] = [[[] for _ in range(blocks)] for _ in range(exports)]
        self.ever: list[list[set[int]]] = [[{0} for _ in range(blocks)] for _ in range(exports)]
        self.rotations: list[list[Rotation]] = [[] for _ in range(exports)]
        self.rot_lock = threading.Lock()
        per_export: dict[int, list[int]] = defaultdict(list)
        for c in range(clients):
            per_export[c % exports].append(c)
        for e, members in per_export.items():
            share = blocks // len(members)
            for i, c in enumerate(members):
                first = i * share
                end = blocks if i == len(members) - 1 else first + share
                self.ranges[c] = (e, first, end)
                for b in range(first, end):
                    self.owner[e][b] = c

    def current(self, e: int, b: int) -> int:
        hist = self.history[e][b]
        return hist[-1].version if hist else 0

    def version_at(self, e: int, b: int, start: float, end: float) -> set[int]:
        """Versions block b may show in a snapshot taken between ``start`` and ``end``."""
        allowed: set[int] = set()
        base = 0
        for mod in reversed(self.history[e][b]):
            if mod.done < start:
                base = mod.version
                break
            if mod.issued < end:
                allowed.add(mod.version)  # overlaps the snapshot's window
        allowed.add(base)
        return allowed

    def dirty_expectation(self, e: int, b: int, window: tuple[float, float],
                          prev_end: float, prev_start: float | None) -> bool | None:
        """True: must be dirty; False: must be clean; None: cannot tell.

        ``window``: when the bitmap was read (or frozen).  ``prev_end``: end of the
        latest rotation that may have happened before that instant (-inf if none);
        ``prev_start``: start of the latest rotation surely done before it (None if
        none, i.e. the bitmap was empty at the start).
        """
        w_start, w_end = window
        hist = self.history[e][b]
        if any(m.issued > prev_end and m.done < w_start for m in hist):
            return True
        floor = prev_start if prev_start is not None else -INF
        if all(m.done < floor or m.issued > w_end for m in hist):
            return False
        return None

    def check_block(self, e: int, b: int, data: bytes, allowed: set[int]) -> str | None:
        """None if every 8-byte word of block b is one of the ``allowed`` versions'.

        A read that overlaps a write may see a mix of old and new data (Linux
        makes no promise of atomicity between read and write, even within a
        page), so when several versions are allowed each aligned word is judged
        on its own: headers must be this place's (or zero, if zeros are
        allowed), versions among ``allowed``.  With one version allowed, this is
        an exact comparison.
        """
        if len(allowed) == 1:
            (v,) = allowed
            if data == block_bytes(e, self.owner[e][b], b, v):
                return None
        words = np.frombuffer(data, dtype=">u8").reshape(PAGES, PAGE // UNIT.size, 2)
        headers = np.array([int.from_bytes(UNIT.pack(e, self.owner[e][b], p, b, 0)[:8], "big")
                            for p in range(PAGES)], dtype=np.uint64)
        good = words[:, :, 0] == headers[:, None]
        if 0 in allowed:
            good |= words[:, :, 0] == 0
        good &= np.isin(words[:, :, 1], np.array(sorted(allowed), dtype=np.uint64))
        if good.all():
            return None
        page, unit = (int(i) for i in np.argwhere(~good)[0])
        header, version = (int(x) for x in words[page, unit])
        return (f"page {page} word {unit}: header {header:#018x} version {version}, "
                f"allowed {sorted(allowed)[:8]}{'...' if len(allowed) > 8 else ''}")


class Client(threading.Thread):
    """One NBD connection doing a random mix of operations, one at a time."""

    def __init__(self, cid: int, uri: str, model: Model, stats: Stats, stop: threading.Event,
                 start_barrier: threading.Barrier, seed: int) -> None:
        super().__init__(name=f"client-{cid}", daemon=True)
        self.cid = cid
        self.uri = uri
        self.model = model
        self.stats = stats
        self.stop = stop
        self.barrier = start_barrier
        self.rng = random.Random(seed)
        self.export, self.first, self.end = model.ranges[cid]
        self.version = 0
        self.lat: dict[str, list[float]] = defaultdict(list)
        self.checks: dict[str, int] = defaultdict(int)

    def run(self) -> None:
        h = nbd.NBD()
        try:
            h.add_meta_context("base:allocation")
            h.add_meta_context(f"qemu:dirty-bitmap:bm{self.export}")
            h.connect_uri(self.uri)
        except nbd.Error as exc:
            self.stats.error(f"client {self.cid}: connect: {exc}")
            self.barrier.abort()
            return
        try:
            self.barrier.wait()
        except threading.BrokenBarrierError:
            close(h)
            return
        ops = (("read", 25), ("read_other", 15), ("write", 30), ("zero", 10), ("block_status", 20))
        names = [o for o, _ in ops]
        weights = [w for _, w in ops]
        try:
            while not self.stop.is_set():
                op = self.rng.choices(names, weights)[0]
                try:
                    getattr(self, "op_" + op)(h)
                except nbd.Error as exc:
                    self.stats.error(f"client {self.cid} {op}: {exc}")
                    if not h.aio_is_ready() and not h.aio_is_processing():
                        return  # connection is dead
        finally:
            with self.stats.lock:
                for k, v in self.lat.items():
                    self.stats.latencies[k].extend(v)
                for k, n in self.checks.items():
                    self.stats.checks[k] += n
            try:
                if h.aio_is_ready():
                    h.shutdown()
            except nbd.Error as exc:
                self.stats.error(f"client {self.cid}: shutdown: {exc}")
            close(h)

    def own_range(self, max_blocks: int = 16) -> tuple[int, int]:
        n = self.rng.randint(1, max_blocks)
        b = self.rng.randrange(self.first, self.end)
        return b, min(n, self.end - b)

    # -- operations ---------------------------------------------------------
    def op_write(self, h: nbd.NBD) -> None:
        b, n = self.own_range()
        self.version += 1
        v = self.version
        e = self.export
        data = b"".join(block_bytes(e, self.cid, b + i, v) for i in range(n))
        mods = []
        for i in range(n):
            self.model.ever[e][b + i].add(v)  # before it can be seen
        t0 = time.monotonic()
        for i in range(n):
            mod = Mod(t0, v)
            self.model.history[e][b + i].append(mod)
            mods.append(mod)
        h.pwrite(data, b * BLOCK)
        t1 = time.monotonic()
        for mod in mods:
            mod.done = t1
        self.lat["write"].append(t1 - t0)

    def op_zero(self, h: nbd.NBD) -> None:
        b, n = self.own_range()
        e = self.export
        t0 = time.monotonic()
        mods = [Mod(t0, 0) for _ in range(n)]
        for i, mod in enumerate(mods):
            self.model.history[e][b + i].append(mod)
        flags = nbd.CMD_FLAG_NO_HOLE if self.rng.random() < 0.3 else 0
        h.zero(n * BLOCK, b * BLOCK, flags)
        t1 = time.monotonic()
        for mod in mods:
            mod.done = t1
        self.lat["zero"].append(t1 - t0)

    def op_read(self, h: nbd.NBD) -> None:
        b, n = self.own_range()
        t0 = time.monotonic()
        data = h.pread(n * BLOCK, b * BLOCK)
        self.lat["read"].append(time.monotonic() - t0)
        e = self.export
        for i in range(n):
            expected = block_bytes(e, self.cid, b + i, self.model.current(e, b + i))
            self.checks["own blocks read"] += 1
            if data[i * BLOCK : (i + 1) * BLOCK] != expected:
                self.stats.fail(f"client {self.cid}: export {e} block {b + i} differs from version "
                                f"{self.model.current(e, b + i)}")

    def op_read_other(self, h: nbd.NBD) -> None:
        e = self.export
        n = self.rng.randint(1, 4)
        b = self.rng.randrange(0, self.model.blocks - n + 1)
        t0 = time.monotonic()
        data = h.pread(n * BLOCK, b * BLOCK)
        self.lat["read"].append(time.monotonic() - t0)
        for i in range(n):
            ever = set(self.model.ever[e][b + i])
            self.checks["blocks of others read"] += 1
            problem = self.model.check_block(e, b + i, data[i * BLOCK : (i + 1) * BLOCK], ever)
            if problem:
                self.stats.fail(f"client {self.cid}: export {e} block {b + i} (read by another "
                                f"client): {problem}")

    def op_block_status(self, h: nbd.NBD) -> None:
        b, n = self.own_range(64)
        e = self.export
        found: dict[str, list[tuple[int, int, int]]] = defaultdict(list)

        def callback(context: str, offset: int, entries: list[int], err: int) -> int:
            pos = offset
            for i in range(0, len(entries), 2):
                found[context].append((pos, entries[i], entries[i + 1]))
                pos += entries[i]
            return 0

        t0 = time.monotonic()
        h.block_status(n * BLOCK, b * BLOCK, callback)
        t1 = time.monotonic()
        self.lat["block_status"].append(t1 - t0)
        start, end = b * BLOCK, (b + n) * BLOCK
        for context in ("base:allocation", f"qemu:dirty-bitmap:bm{e}"):
            extents = found.get(context)
            if not extents or extents[0][0] != start:
                self.stats.fail(f"client {self.cid}: no {context} extents from {start}")
                return
        alloc = found["base:allocation"]
        for offset, length, flags in alloc:
            if not flags & STATE_ZERO:
                continue
            for blk in range(offset // BLOCK, min(-(-(offset + length) // BLOCK), b + n)):
                self.checks["zero extents checked"] += 1
                if self.model.current(e, blk):
                    self.stats.fail(f"client {self.cid}: export {e} block {blk} reported zero, holds "
                                    f"version {self.model.current(e, blk)}")
        # Rotations that may have happened before the bitmap was read: any that began before t1.
        with self.model.rot_lock:
            rotations = list(self.model.rotations[e])
        prev_end = max((r.end for r in rotations if r.start < t1), default=-INF)
        done = [r for r in rotations if r.end < t0]
        prev_start = done[-1].start if done else None
        bitmap = found[f"qemu:dirty-bitmap:bm{e}"]
        for offset, length, flags in bitmap:
            if offset >= end:
                break
            # Only blocks the extent covers whole (granularity = BLOCK: all of them).
            for blk in range(-(-offset // BLOCK), min((offset + length) // BLOCK, b + n)):
                want = self.model.dirty_expectation(e, blk, (t0, t1), prev_end, prev_start)
                if want is None:
                    continue
                self.checks["live bitmap blocks checked"] += 1
                if want != bool(flags & DIRTY):
                    seen = "dirty" if flags & DIRTY else "clean"
                    self.stats.fail(f"client {self.cid}: export {e} block {blk} live bitmap says "
                                    f"{seen}, model {'dirty' if want else 'clean'}")


class Controller(threading.Thread):
    """Creates, verifies and deletes snapshots on a schedule, through the CLI."""

    def __init__(self, args: argparse.Namespace, port: int, qmp: str, model: Model, stats: Stats,
                 stop: threading.Event) -> None:
        super().__init__(name="controller", daemon=True)
        self.args = args
        self.port = port
        self.qmp = qmp
        self.model = model
        self.stats = stats
        self.stop = stop
        self.rng = random.Random(args.seed)
        self.created = 0
        self.deleted = 0
        self.live: list[str] = []
        self.lat: dict[str, list[float]] = defaultdict(list)

    def cli(self, *words: str) -> bool:
        cmd = [self.args.python, "-m", "nbdfleece", "snapshot", "--qmp", self.qmp, *words]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=self.args.repo, timeout=120)
        if proc.returncode != 0:
            self.stats.error(f"{' '.join(words)}: exit {proc.returncode}: {proc.stderr.strip()}")
            return False
        return True

    def run(self) -> None:
        k = 0
        while not self.stop.wait(self.args.snapshot_interval):
            e = k % self.model.exports
            name = f"snap{k}"
            k += 1
            rotations = self.model.rotations[e]
            previous = rotations[-1] if rotations else None
            # Registered before the command: clients must know a rotation may be under way.
            rotation = Rotation(e, name, time.monotonic(), INF)
            with self.model.rot_lock:
                rotations.append(rotation)
            ok = self.cli("create", name, "--of", f"e{e}", "--bitmap", f"bm{e}")
            t1 = time.monotonic()
            with self.model.rot_lock:
                if ok:
                    rotation.end = t1
                else:  # the command is atomic: a failed one rotated nothing
                    rotations.remove(rotation)
            if not ok:
                continue
            self.lat["snapshot create"].append(t1 - rotation.start)
            self.created += 1
            self.live.append(name)
            self.verify(rotation, previous)
            while len(self.live) > self.args.keep:
                self.delete(self.live.pop(0))
        while self.live:
            self.delete(self.live.pop(0))

    def delete(self, name: str) -> None:
        t0 = time.monotonic()
        if self.cli("delete", name):
            self.deleted += 1
            self.lat["snapshot delete"].append(time.monotonic() - t0)

    def verify(self, rot: Rotation, previous: Rotation | None) -> None:
        """Read a sample of the snapshot and map its frozen bitmap; compare with the model."""
        e, model = rot.export, self.model
        h = nbd.NBD()
        try:
            h.add_meta_context(f"qemu:dirty-bitmap:bm{e}")
            h.connect_uri(f"nbd://127.0.0.1:{self.port}/{rot.name}")
            for b in self.rng.sample(range(model.blocks), min(self.args.sample, model.blocks)):
                data = h.pread(BLOCK, b * BLOCK)
                allowed = model.version_at(e, b, rot.start, rot.end)
                self.stats.checks["snapshot blocks read"] += 1
                problem = model.check_block(e, b, data, allowed)
                if problem:
                    self.stats.fail(f"{rot.name}: export {e} block {b}: {problem}")
            frozen: list[tuple[int, int, int]] = []

            def callback(context: str, offset: int, entries: list[int], err: int) -> int:
                pos = offset
                for i in range(0, len(entries), 2):
                    frozen.append((pos, entries[i], entries[i + 1]))
                    pos += entries[i]
                return 0

            size = model.blocks * BLOCK
            offset = 0
            while offset < size:
                before = len(frozen)
                h.block_status(min(size - offset, 1 << 30), offset, callback)
                if len(frozen) == before:
                    self.stats.fail(f"{rot.name}: empty block status at {offset}")
                    break
                offset = frozen[-1][0] + frozen[-1][1]
            prev_end = previous.end if previous else -INF
            prev_start = previous.start if previous else None
            for off, length, flags in frozen:
                for blk in range(-(-off // BLOCK), min((off + length) // BLOCK, model.blocks)):
                    want = model.dirty_expectation(e, blk, (rot.start, rot.end), prev_end, prev_start)
                    if want is None:
                        continue
                    self.stats.checks["frozen bitmap blocks checked"] += 1
                    if want != bool(flags & DIRTY):
                        self.stats.fail(f"{rot.name}: frozen bitmap block {blk} "
                                        f"{'dirty' if flags & DIRTY else 'clean'}, model "
                                        f"{'dirty' if want else 'clean'}")
            h.shutdown()
        except nbd.Error as exc:
            self.stats.error(f"{rot.name}: {exc}")
        finally:
            close(h)


class RssSampler(threading.Thread):
    def __init__(self, pid: int, stop: threading.Event) -> None:
        super().__init__(name="rss", daemon=True)
        self.pid = pid
        self.stop = stop
        self.samples: list[tuple[float, int]] = []

    def run(self) -> None:
        t0 = time.monotonic()
        while not self.stop.wait(0.5):
            rss = proc_status(self.pid).get("VmRSS")
            if rss is not None:
                self.samples.append((time.monotonic() - t0, rss))


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM... of a process, in KiB."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.startswith("Vm"):
                out[key] = int(value.split()[0])
    except (OSError, ValueError):
        pass
    return out


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(port: int, qmp: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"load.py: server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            if qmp.exists():
                return
        except OSError:
            pass
        time.sleep(0.1)
    sys.exit(f"load.py: server not ready after 30 s:\n{log.read_text()}")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def verify_images(model: Model, images: list[Path], stats: Stats) -> None:
    """After the server stopped: every block of every image is the model's last version."""
    for e, path in enumerate(images):
        with open(path, "rb") as f:
            for b in range(model.blocks):
                data = f.read(BLOCK)
                v = model.current(e, b)
                stats.checks["final image blocks"] += 1
                if data != block_bytes(e, model.owner[e][b], b, v):
                    stats.fail(f"final image e{e}: block {b} is not version {v}")


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def main() -> int:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, type=Path, help="scratch folder (tmpfs)")
    parser.add_argument("--out", type=Path, default=here / "results")
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs nbdfleece")
    parser.add_argument("--repo", default=str(here.parent))
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--exports", type=int, default=3)
    parser.add_argument("--size", default="256M", help="per export")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--snapshot-interval", type=float, default=3)
    parser.add_argument("--keep", type=int, default=2, help="snapshots alive at a time")
    parser.add_argument("--sample", type=int, default=64, help="blocks read from each snapshot")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    args.python = os.path.abspath(args.python) if os.sep in args.python else args.python

    size = parse_size(args.size)
    blocks = size // BLOCK
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    images = []
    for e in range(args.exports):
        path = work / f"e{e}.raw"
        with open(path, "wb") as f:
            f.truncate(blocks * BLOCK)
        images.append(path)
    port = free_port()
    qmp = work / "qmp.sock"
    log = work / "server.log"
    cmd = [args.python, "-m", "nbdfleece", "serve", "--listen", f"127.0.0.1:{port}",
           "--qmp", f"unix:{qmp}", "--data-dir", str(work / "data"), "--log-level", "warning"]
    for e, path in enumerate(images):
        cmd += ["--export", f"e{e}={path},bitmap=bm{e}"]
    with open(log, "wb") as logf:
        server = subprocess.Popen(cmd, cwd=args.repo, stdout=logf, stderr=subprocess.STDOUT)
    try:
        wait_ready(port, qmp, server, log)
        idle = proc_status(server.pid)
        cpu0 = cpu_seconds(server.pid)
        load0 = os.getloadavg()

        model = Model(args.exports, blocks, args.clients)
        stats = Stats()

        def record(info: threading.ExceptHookArgs) -> None:
            with stats.lock:
                stats.harness_errors.append(f"{info.thread.name if info.thread else '?'}: "
                                            f"{info.exc_type.__name__}: {info.exc_value}")
            threading.__excepthook__(info)

        threading.excepthook = record
        stop = threading.Event()
        barrier = threading.Barrier(args.clients + 1)
        clients = [
            Client(c, f"nbd://127.0.0.1:{port}/e{model.ranges[c][0]}", model, stats, stop, barrier,
                   args.seed * 1000 + c)
            for c in range(args.clients)
        ]
        for c in clients:
            c.start()
        try:
            barrier.wait(timeout=120)
        except threading.BrokenBarrierError:
            stop.set()
            for c in clients:
                c.join()
            print("load.py: clients failed to connect:", *stats.protocol_errors[:10], sep="\n  ")
            return 1
        rss = RssSampler(server.pid, stop)
        client_cpu0 = cpu_seconds(os.getpid())
        controller = Controller(args, port, f"unix:{qmp}", model, stats, stop)
        t_start = time.monotonic()
        rss.start()
        controller.start()
        stop.wait(args.seconds)
        stop.set()
        for c in clients:
            c.join()
        elapsed = time.monotonic() - t_start
        controller.join()
        rss.join()
        peak = proc_status(server.pid)
        cpu = cpu_seconds(server.pid) - cpu0
        client_cpu = cpu_seconds(os.getpid()) - client_cpu0
        load1 = os.getloadavg()
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
        try:
            rc = server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            rc = server.wait()
    if rc != 0:
        stats.error(f"server exited {rc} on SIGTERM")
    verify_images(model, images, stats)
    server_log = log.read_text(errors="replace")
    bad_lines = [line for line in server_log.splitlines()
                 if any(w in line for w in ("protocol error", "internal error", "Traceback",
                                            "failed unexpectedly", "ERROR"))]
    for line in bad_lines:
        stats.error(f"server log: {line}")

    for k, v in controller.lat.items():
        stats.latencies[k].extend(v)
    result = report(args, stats, elapsed, idle, peak, rss.samples, (cpu, client_cpu), controller,
                    load0, load1)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.out / f"load-{stamp}.json").write_text(json.dumps(result["json"], indent=1))
    (args.out / f"load-{stamp}.md").write_text(result["md"])
    (args.out / f"load-{stamp}.server.log").write_text(server_log)
    print(result["md"])
    print(f"load.py: saved {args.out}/load-{stamp}.{{md,json,server.log}}", file=sys.stderr)
    return 0 if not (stats.protocol_errors or stats.failures or stats.harness_errors) else 1


def report(args: argparse.Namespace, stats: Stats, elapsed: float, idle: dict[str, int],
           peak: dict[str, int], samples: list[tuple[float, int]], cpus: tuple[float, float],
           controller: Controller,
           load0: tuple[float, float, float], load1: tuple[float, float, float]) -> dict[str, Any]:
    rev = subprocess.run(["git", "-C", args.repo, "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "-C", args.repo, "status", "--porcelain", "--untracked-files=no",
                            "--", "nbdfleece"], capture_output=True, text=True).stdout.strip()
    versions = {
        "nbdfleece": rev + ("+dirty" if dirty else ""),
        "python (server)": subprocess.run([args.python, "-c", "import sys; print(sys.version.split()[0])"],
                                          capture_output=True, text=True).stdout.strip(),
        "libnbd": nbd.NBD().get_version(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
    }
    ops = {k: v for k, v in stats.latencies.items() if not k.startswith("snapshot")}
    total_ops = sum(len(v) for v in ops.values())
    rows = []
    for name in sorted(stats.latencies):
        lat = stats.latencies[name]
        if not lat:
            continue
        rows.append({
            "op": name, "count": len(lat),
            "per_s": len(lat) / elapsed,
            "p50_ms": percentile(lat, 0.5) * 1e3, "p99_ms": percentile(lat, 0.99) * 1e3,
            "max_ms": max(lat) * 1e3, "mean_ms": statistics.fmean(lat) * 1e3,
        })
    cpu, client_cpu = cpus
    quarter = [samples[min(len(samples) - 1, int(q * len(samples)))][1] if samples else 0
               for q in (0.25, 0.5, 0.75, 1.0)]
    data = {
        "versions": versions,
        "config": {"clients": args.clients, "exports": args.exports, "size": args.size,
                   "seconds": args.seconds, "snapshot_interval": args.snapshot_interval,
                   "keep": args.keep, "sample": args.sample, "block": BLOCK, "seed": args.seed},
        "elapsed_s": elapsed, "ops": total_ops, "ops_per_s": total_ops / elapsed, "latency": rows,
        "protocol_errors": stats.protocol_errors, "verification_failures": stats.failures,
        "harness_errors": stats.harness_errors,
        "checks": dict(stats.checks),
        "snapshots_created": controller.created, "snapshots_deleted": controller.deleted,
        "rss_kib": {"idle": idle.get("VmRSS"), "peak_VmHWM": peak.get("VmHWM"),
                    "end": peak.get("VmRSS"), "quartiles": quarter},
        "rss_samples": samples, "server_cpu_s": cpu, "client_cpu_s": client_cpu,
        "loadavg_start": load0, "loadavg_end": load1,
    }
    md = [
        f"# nbdfleece load benchmark ({time.strftime('%Y-%m-%d %H:%M')})", "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"Config: {args.clients} clients on {args.exports} exports of {args.size}, {elapsed:.1f} s, "
        f"64 KiB blocks, a snapshot every {args.snapshot_interval:g} s (at most {args.keep} alive), "
        f"seed {args.seed}.",
        f"Load average (1 min) {load0[0]:.1f} at the start, {load1[0]:.1f} at the end "
        "(a shared machine: other work ran at the same time).", "",
        f"**{total_ops} operations, {total_ops / elapsed:.0f} ops/s; protocol errors "
        f"{len(stats.protocol_errors)}; verification failures {len(stats.failures)}; snapshots created "
        f"{controller.created}, deleted {controller.deleted}.**", "",
        "| operation | count | ops/s | p50 ms | p99 ms | max ms |", "|---|---|---|---|---|---|",
    ]
    md += [f"| {r['op']} | {r['count']} | {r['per_s']:.1f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
           f"{r['max_ms']:.1f} |" for r in rows]
    mib = 1024
    md += [
        "",
        f"Server RSS: idle {idle.get('VmRSS', 0) / mib:.0f} MiB, **peak (VmHWM) "
        f"{peak.get('VmHWM', 0) / mib:.0f} MiB**, at the end {peak.get('VmRSS', 0) / mib:.0f} MiB; "
        f"sampled at 25/50/75/100 % of the run: "
        + " / ".join(f"{q / mib:.0f}" for q in quarter) + " MiB. "
        f"CPU: server {cpu:.1f} s ({cpu / elapsed:.2f} cores), this client process "
        f"{client_cpu:.1f} s ({client_cpu / elapsed:.2f} cores; the snapshot CLI runs not included).",
        "",
        "Checks: " + ", ".join(f"{k} {n}" for k, n in sorted(stats.checks.items())) + ".",
    ]
    if stats.harness_errors:
        md += ["", f"**{len(stats.harness_errors)} errors in the benchmark's own threads: "
               "the figures above are not valid.**"]
    problems = stats.harness_errors + stats.protocol_errors + stats.failures
    if problems:
        md += ["", "First problems:", *[f"- {t}" for t in problems[:20]]]
    return {"json": data, "md": "\n".join(md) + "\n"}


if __name__ == "__main__":
    sys.exit(main())
