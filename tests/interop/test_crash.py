"""Crash safety: ``kill -9`` of the server in the middle of heavy writes, many times.

One image, one data folder, several rounds.  In each round a libnbd client keeps
32 writes in flight (about a third with FUA, a flush after every 24 writes), and
the server is killed after a different delay.  The client records which writes
were acknowledged, which with FUA, and which were acknowledged before a FLUSH
that completed.  After every restart:

* every write acknowledged with FUA or before a completed FLUSH is in the image;
  every other byte is either what was there before the round or what a write of
  the round put there (writes of a round never overlap);
* the persistent bitmap comes back ``inconsistent`` (QMP), cannot be exported,
  enabled or merged, only removed;
* the overlay of a snapshot that was active at the kill is gone from the data
  folder (logged), and the target of a push backup job that was running is kept
  but reported on every start, and again when a new job writes to it.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from tests.conftest import ServerProcess, libnbd, make_image
from tests.interop.test_faults import Monitor

pytestmark = pytest.mark.interop

KiB = 1 << 10
MiB = 1 << 20
SIZE = 32 * MiB
SLOT = 2 * KiB
DEPTH = 32
FLUSH_EVERY = 24
KILL_DELAYS = [0.05, 0.4, 0.15, 0.6, 0.25, 0.1]
"""Seconds of load before each ``kill -9``; six rounds, about 1.6 s of load in all."""
INCONSISTENT = "Bitmap 'pb' is inconsistent and cannot be used"


@dataclass
class Write:
    offset: int
    data: bytes
    fua: bool
    acked: bool = False
    durable: bool = False


@dataclass
class Round:
    writes: list[Write] = field(default_factory=list)
    flushes_done: int = 0
    errors: int = 0


def heavy_writes(nbd: ModuleType, server: ServerProcess, delay: float, seed: int) -> Round:
    """Pipelined writes to distinct 2 KiB slots until ``kill -9`` after ``delay`` s."""
    rng = random.Random(seed)
    slots = list(range(SIZE // SLOT))
    rng.shuffle(slots)
    result = Round()
    acked_ids: list[int] = []

    def on_write(i: int, err: Any) -> int:
        if err.value == 0:
            w = result.writes[i]
            w.acked = True
            w.durable = w.fua
            acked_ids.append(i)
        else:
            result.errors += 1
        return 1

    def on_flush(covered: list[int], err: Any) -> int:
        if err.value == 0:
            result.flushes_done += 1
            for i in covered:  # acknowledged before the flush was sent: now durable
                result.writes[i].durable = True
        return 1

    h = nbd.NBD()
    h.connect_uri(server.uri("live"))
    kill_at = time.monotonic() + delay
    while time.monotonic() < kill_at and slots:
        while h.aio_in_flight() < DEPTH and slots:
            slot = slots.pop()
            n = rng.choice([512, 1000, SLOT])
            offset = slot * SLOT + rng.randrange(0, SLOT - n + 1)
            fua = rng.random() < 0.3
            i = len(result.writes)
            result.writes.append(Write(offset, rng.randbytes(n), fua))
            h.aio_pwrite(nbd.Buffer.from_bytearray(result.writes[i].data), offset,
                         completion=lambda err, i=i: on_write(i, err),
                         flags=nbd.CMD_FLAG_FUA if fua else 0)
            if len(result.writes) % FLUSH_EVERY == 0:
                covered = list(acked_ids)
                h.aio_flush(completion=lambda err, c=covered: on_flush(c, err))
        h.poll(5)
    assert slots, "the round ran out of slots before the kill: make the image larger"
    os.kill(server.proc.pid, signal.SIGKILL)
    assert server.stop(signal.SIGKILL) == -signal.SIGKILL
    try:  # the connection is gone: what is still in flight fails, nothing is acknowledged
        while h.aio_in_flight():
            h.poll(1000)
    except nbd.Error:
        pass
    return result


def check_round(image: Path, before: bytes, result: Round) -> tuple[int, int]:
    """The image after the crash against the round's writes; returns (durable, acked)."""
    got = np.frombuffer(image.read_bytes(), np.uint8)
    old = np.frombuffer(before, np.uint8)
    new = old.copy()
    touched = np.zeros(SIZE, dtype=bool)
    must = np.zeros(SIZE, dtype=bool)
    for w in result.writes:
        end = w.offset + len(w.data)
        new[w.offset : end] = np.frombuffer(w.data, np.uint8)
        touched[w.offset : end] = True
        if w.durable:
            must[w.offset : end] = True
    lost = np.flatnonzero(must & (got != new))
    assert not lost.size, f"durable writes lost at {lost[:8].tolist()}"
    stray = np.flatnonzero(~touched & (got != old))
    assert not stray.size, f"bytes changed that no write touched, at {stray[:8].tolist()}"
    mixed = np.flatnonzero(touched & (got != old) & (got != new))
    assert not mixed.size, f"bytes neither old nor new at {mixed[:8].tolist()}"
    durable = sum(1 for w in result.writes if w.durable)
    return durable, sum(1 for w in result.writes if w.acked)


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """A short absolute data folder shared by every restart (Unix socket paths are short)."""
    path = Path(tempfile.mkdtemp(prefix="crash", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def start(server_factory: Any, image: Path, data: Path) -> tuple[ServerProcess, Monitor]:
    (data / "qmp.sock").unlink(missing_ok=True)  # a killed server's socket: wait for the new one
    server: ServerProcess = server_factory(
        "--export", f"live={image}", "--bitmap", "live:pb,persistent",
        "--qmp", "--data-dir", str(data),
    )
    server.wait_listening(data / "qmp.sock")
    return server, Monitor(data / "qmp.sock")


def bitmaps(qmp: Monitor) -> dict[str, dict[str, Any]]:
    nodes = {n["node-name"]: n for n in qmp("query-named-block-nodes", {"flat": True})}
    return {b["name"]: b for b in nodes["live"].get("dirty-bitmaps", [])}


@pytest.mark.slow
def test_kill_9_during_heavy_writes(server_factory: Any, tmp_path: Path, data_dir: Path) -> None:
    nbd = libnbd()
    image = make_image(tmp_path / "live.raw", SIZE)
    server, qmp = start(server_factory, image, data_dir)
    assert bitmaps(qmp)["pb"].get("inconsistent") is None
    totals = [0, 0, 0]
    reported: list[tuple[str, Path]] = []
    for number, delay in enumerate(KILL_DELAYS):
        overlay: Path | None = None
        if number % 3 == 1:  # a snapshot is active at the kill
            overlay = Path(qmp("x-nbdfleece-snapshot-create",
                               {"name": f"s{number}", "export": "live"})["overlay"])
            assert overlay.parent.resolve() == data_dir.resolve() and overlay.exists()
        if number % 3 == 2:  # a push backup job is running at the kill (its target is slow)
            target = make_image(tmp_path / f"target{number}.raw", SIZE)
            qmp("blockdev-add", {"driver": "x-nbdfleece-fault", "node-name": "tgt",
                                 "image": {"driver": "file", "filename": str(target)},
                                 "rules": [{"ops": ["write"], "delay": 0.05}]})
            qmp("blockdev-backup", {"job-id": f"bk{number}", "device": "live", "target": "tgt",
                                    "sync": "full"})
            assert [j["status"] for j in qmp("query-block-jobs")] == ["running"]
            reported.append((f"bk{number}", target))
        qmp.close()
        before = image.read_bytes()
        result = heavy_writes(nbd, server, delay, seed=number)
        server, qmp = start(server_factory, image, data_dir)

        # every write acknowledged after FUA or a completed flush is on disk
        durable, acked = check_round(image, before, result)
        totals[0] += len(result.writes)
        totals[1] += acked
        totals[2] += durable
        if delay >= 0.15:
            assert durable > 0 and result.flushes_done > 0, (number, durable, result.flushes_done)

        # the persistent bitmap is inconsistent: unusable, only removable
        pb = bitmaps(qmp)["pb"]
        assert pb["inconsistent"] is True and pb["recording"] is False, pb
        assert qmp.error("block-export-add", {"type": "nbd", "id": "x", "node-name": "live", "name": "x",
                                              "writable": True, "bitmaps": ["pb"]}) == INCONSISTENT
        assert qmp.error("block-dirty-bitmap-enable", {"node": "live", "name": "pb"}) == INCONSISTENT
        qmp("block-dirty-bitmap-add", {"node": "live", "name": "tmp"})
        assert qmp.error("block-dirty-bitmap-merge",
                         {"node": "live", "target": "tmp", "bitmaps": ["pb"]}) == INCONSISTENT
        qmp("block-dirty-bitmap-remove", {"node": "live", "name": "tmp"})
        qmp("block-dirty-bitmap-remove", {"node": "live", "name": "pb"})
        qmp("block-dirty-bitmap-add", {"node": "live", "name": "pb", "persistent": True})
        assert bitmaps(qmp)["pb"].get("inconsistent") is None

        # what the killed server had under way: cleaned up or reported, never reused silently
        log = server.log()
        assert qmp("x-nbdfleece-query-snapshots") == [] and qmp("query-block-jobs") == []
        if overlay is not None:
            assert not overlay.exists()
            assert f"removed {overlay}, the overlay of snapshot 's{number}'" in log
        for job, target in reported:  # every start reports them again
            assert target.exists()
            assert f"backup job '{job}' was interrupted by a crash: {target} is incomplete" in log
        assert not list(data_dir.glob("*.overlay"))
        assert len(list(data_dir.glob("jobs-*"))) == 0  # the new server has nothing under way

    # a new job writing to an interrupted target is warned about; a full backup clears it
    job, target = reported[0]
    qmp("blockdev-add", {"driver": "file", "node-name": "again", "filename": str(target)})
    qmp("blockdev-backup", {"job-id": "again", "device": "live", "target": "again", "sync": "full"})
    done = qmp.wait_event("BLOCK_JOB_COMPLETED")
    assert done["device"] == "again" and "error" not in done
    assert target.read_bytes() == image.read_bytes()
    log = server.log()
    assert f"writes to {target}, which holds the incomplete result of backup job '{job}'" in log
    qmp("blockdev-del", {"node-name": "again"})
    qmp.close()
    assert server.stop() == 0
    server, qmp = start(server_factory, image, data_dir)
    qmp.close()
    log = server.log()
    assert f"{target} is incomplete" not in log
    assert all(f"{t} is incomplete" in log for _, t in reported[1:])
    # the load was heavy: thousands of writes, most of them acknowledged
    assert totals[0] > 1000 and totals[1] > totals[0] // 2, totals
