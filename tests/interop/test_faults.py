"""Storage faults through the real server process (fault layer: ``block/faults.py``).

* Several libnbd clients and qemu-io under load on an export whose writes, zeroes,
  reads and flushes fail at random (``--fault``): the server survives, each failed
  request gets the configured errno and the connection stays usable, a client of
  another export never notices, the recording dirty bitmap covers every granule of
  every write that was tried (failed or not), and the image holds every
  acknowledged write (a failed write's range may hold old or new bytes).
* QEMU's ``blkdebug`` driver over QMP under an export.
* A full disk under a snapshot overlay (``on-cbw-error`` both ways) and under a push
  backup target: a fault node (``x-nbdfleece-fault``, ENOSPC after N writes) and,
  when the tests may mount one, a really full small tmpfs.  The live disk never
  loses an acknowledged write.

Expected contents come from models of the acknowledged requests, never from the
server's code.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from tests.conftest import ServerProcess, libnbd, make_image, require, run
from tests.interop.test_bitmaps import expected_runs, nbdinfo_map

pytestmark = pytest.mark.interop

KiB = 1 << 10
MiB = 1 << 20
CLUSTER = 64 * KiB
DATA_DIR = "D"


class Model:
    """What an image must hold, byte by byte, given the acknowledged requests.

    ``known`` bytes are exact.  A failed write over known bytes leaves them
    *either* the old value (``state``) or the new one (``alt``); anything less
    certain (a failed write over an uncertain byte) becomes unknown.
    """

    def __init__(self, initial: bytes) -> None:
        self.state: npt.NDArray[np.uint8] = np.frombuffer(initial, np.uint8).copy()
        self.alt = np.zeros_like(self.state)
        self.known = np.ones(len(initial), dtype=bool)
        self.either = np.zeros(len(initial), dtype=bool)

    def ok(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        self.state[offset:end] = np.frombuffer(data, np.uint8)
        self.known[offset:end] = True
        self.either[offset:end] = False

    def failed(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        was_known = self.known[offset:end].copy()
        self.alt[offset:end][was_known] = np.frombuffer(data, np.uint8)[was_known]
        self.either[offset:end] = was_known
        self.known[offset:end] = False

    def matches(self, got: bytes, offset: int = 0) -> bool:
        g = np.frombuffer(got, np.uint8)
        end = offset + len(g)
        k, e = self.known[offset:end], self.either[offset:end]
        s, a = self.state[offset:end], self.alt[offset:end]
        return bool(np.array_equal(g[k], s[k]) and np.all((g[e] == s[e]) | (g[e] == a[e])))

    def check(self, got: bytes, what: str) -> None:
        assert len(got) == len(self.state)
        g = np.frombuffer(got, np.uint8)
        bad_known = np.flatnonzero(self.known & (g != self.state))
        assert not bad_known.size, f"{what}: acknowledged bytes lost at {bad_known[:8].tolist()}"
        bad_either = np.flatnonzero(self.either & (g != self.state) & (g != self.alt))
        assert not bad_either.size, f"{what}: bytes neither old nor new at {bad_either[:8].tolist()}"


class Monitor:
    """qemu.qmp driven from synchronous test code (its own event loop); keeps events."""

    def __init__(self, path: Path) -> None:
        qmp = pytest.importorskip("qemu.qmp")
        self.loop = asyncio.new_event_loop()
        self.client = qmp.QMPClient("nbdfleece-faults-test")
        self.error_type: type[Exception] = qmp.ExecuteError
        self.loop.run_until_complete(self.client.connect(str(path)))
        self.seen: list[dict[str, Any]] = []

    def __call__(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        return self.loop.run_until_complete(self.client.execute(command, arguments or {}))

    def error(self, command: str, arguments: dict[str, Any]) -> str:
        """The ``desc`` of the error the command must fail with."""
        with pytest.raises(self.error_type) as info:
            self(command, arguments)
        return str(info.value.error.error.desc)  # type: ignore[attr-defined]

    def wait_event(self, name: str, timeout: float = 30) -> dict[str, Any]:
        async def wait() -> dict[str, Any]:
            while True:
                event = await self.client.events.get()
                self.seen.append(dict(event))
                if event["event"] == name:
                    data: dict[str, Any] = event["data"]
                    return data

        for event in self.seen:
            if event["event"] == name:
                found: dict[str, Any] = event["data"]
                return found
        return self.loop.run_until_complete(asyncio.wait_for(wait(), timeout))

    def close(self) -> None:
        self.loop.run_until_complete(self.client.disconnect())
        self.loop.close()


def random_image(path: Path, size: int, seed: int) -> bytes:
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


def errnum(exc: BaseException) -> int | None:
    return getattr(exc, "errnum", None)


# -- clients under probabilistic faults -----------------------------------------------------

LOAD_SIZE = 20 * MiB
REGION = 4 * MiB
GRAN = 4 * KiB
WORKERS = 4
OPS_PER_WORKER = 200


class Worker:
    """One libnbd connection to ``live``, alone in its 4 MiB region, checking every reply."""

    def __init__(self, nbd: ModuleType, uri: str, index: int, model: Model) -> None:
        self.nbd, self.uri, self.index, self.model = nbd, uri, index, model
        self.base = index * REGION
        self.rng = random.Random(1000 + index)
        self.tried: list[tuple[int, int]] = []
        self.errors: dict[str, int] = {}
        self.ok_after_error = 0
        self.problem: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by the main thread
            self.problem = exc

    def _span(self) -> tuple[int, int]:
        n = self.rng.choice([1, 512, 4096, 5000, 65536, 200_000])
        return self.base + self.rng.randrange(0, REGION - n), n

    def _outcome(self, op: str, expected: int, call: Callable[[], Any]) -> tuple[bool, Any]:
        try:
            result = call()
        except self.nbd.Error as exc:
            assert errnum(exc) == expected, f"{op}: {exc} (errno {errnum(exc)}), expected {expected}"
            self.errors[op] = self.errors.get(op, 0) + 1
            return False, None
        if self.errors:
            self.ok_after_error += 1
        return True, result

    def _run(self) -> None:
        nbd = self.nbd
        h = nbd.NBD()
        h.connect_uri(self.uri)
        for _ in range(OPS_PER_WORKER):
            roll = self.rng.random()
            if roll < 0.45:
                off, n = self._span()
                data = self.rng.randbytes(n)
                flags = nbd.CMD_FLAG_FUA if self.rng.random() < 0.25 else 0
                self.tried.append((off, n))
                done, _ = self._outcome("write", errno.ENOSPC, partial(h.pwrite, data, off, flags))
                (self.model.ok if done else self.model.failed)(off, data)
            elif roll < 0.55:
                off, n = self._span()
                self.tried.append((off, n))
                done, _ = self._outcome("zero", errno.ENOSPC, partial(h.zero, n, off))
                (self.model.ok if done else self.model.failed)(off, bytes(n))
            elif roll < 0.85:
                off, n = self._span()
                done, got = self._outcome("read", errno.EIO, partial(h.pread, n, off))
                if done:
                    assert self.model.matches(got, off), f"worker {self.index}: read {off}+{n}"
            else:
                self._outcome("flush", errno.EIO, h.flush)
        h.shutdown()


def qemu_io_load(uri: str, base: int, model: Model, seed: int) -> list[tuple[int, int]]:
    """One qemu-io process, 40 writes and zeroes in its region; each command's
    outcome (``wrote`` or ``write failed: ...``) is read from its output in order."""
    rng = random.Random(seed)
    commands: list[tuple[str, int, bytes]] = []
    for i in range(40):
        n = rng.choice([512, 4096, 65536])
        off = base + rng.randrange(0, REGION - n)
        if i % 4 == 3:
            commands.append((f"write -z {off} {n}", off, bytes(n)))
        else:
            pattern = rng.randrange(1, 256)
            commands.append((f"write -P {pattern} {off} {n}", off, bytes([pattern]) * n))
    cmd = ["qemu-io", "-f", "raw"]
    for text, _, _ in commands:
        cmd += ["-c", text]
    out = run([*cmd, uri], check=False).stdout
    outcomes = [line for line in out.splitlines() if line.startswith("wrote ") or " failed: " in line]
    assert len(outcomes) == len(commands), out
    for line, (_, off, data) in zip(outcomes, commands, strict=True):
        if line.startswith("wrote "):
            model.ok(off, data)
        else:
            assert line == "write failed: No space left on device", line
            model.failed(off, data)
    assert any(" failed: " in line for line in outcomes), out
    return [(off, len(data)) for _, off, data in commands]


def test_clients_under_probabilistic_faults(server_factory: Any, tmp_path: Path) -> None:
    require("qemu-io", "nbdinfo")
    nbd = libnbd()
    live = tmp_path / "live.raw"
    model = Model(random_image(live, LOAD_SIZE, 1))
    other = make_image(tmp_path / "other.raw", REGION)
    other_model = Model(bytes(REGION))
    server: ServerProcess = server_factory(
        "--export", f"live={live},bitmap=bm0", "--bitmap", "live:bm0,granularity=4K",
        "--export", f"other={other}",
        "--fault", "live:write+zero,errno=ENOSPC,p=0.1,seed=11,partial",
        "--fault", "live:read,errno=EIO,p=0.05,seed=12",
        "--fault", "live:flush,p=0.25,seed=13",
    )
    workers = [Worker(nbd, server.uri("live"), i, model) for i in range(WORKERS)]
    other_problem: list[BaseException] = []

    def other_client() -> None:
        try:
            rng = random.Random(7)
            h = nbd.NBD()
            h.connect_uri(server.uri("other"))
            for _ in range(OPS_PER_WORKER):
                n = rng.choice([512, 4096, 65536])
                off = rng.randrange(0, REGION - n)
                if rng.random() < 0.5:
                    data = rng.randbytes(n)
                    h.pwrite(data, off)
                    other_model.ok(off, data)
                else:
                    assert other_model.matches(h.pread(n, off), off)
            h.flush()
            h.shutdown()
        except BaseException as exc:
            other_problem.append(exc)

    threads = [threading.Thread(target=w.run) for w in workers]
    threads.append(threading.Thread(target=other_client))
    for t in threads:
        t.start()
    qemu_tried = qemu_io_load(server.uri("live"), WORKERS * REGION, model, 99)
    for t in threads:
        t.join(120)
        assert not t.is_alive()
    for w in workers:
        if w.problem is not None:
            raise w.problem
        # every connection got errors and went on working after them
        assert sum(w.errors.values()) >= 1 and w.ok_after_error >= 1, (w.index, w.errors)
    assert not other_problem, other_problem
    assert server.alive()

    # the recording bitmap covers every write that was tried, failed ones included
    tried = [t for w in workers for t in w.tried] + qemu_tried
    assert nbdinfo_map(server.uri("live"), "qemu:dirty-bitmap:bm0") == \
        expected_runs(tried, GRAN, LOAD_SIZE)
    # every acknowledged write is in the image; failed ones left old or new bytes
    model.check(live.read_bytes(), "live image")
    other_model.check(other.read_bytes(), "other image")
    assert "Traceback" not in server.log()
    failed = sum(sum(w.errors.values()) for w in workers)
    assert server.log().count("fails with") >= failed  # each injection is logged (debug)


# -- QEMU's blkdebug over QMP -----------------------------------------------------------------


def test_blkdebug_node_under_an_export(server_factory: Any, tmp_path: Path) -> None:
    require("qemu-io")
    nbd = libnbd()
    disk = make_image(tmp_path / "disk.raw", 4 * MiB)
    server: ServerProcess = server_factory("--qmp", "--data-dir", DATA_DIR)
    sock = server.workdir / DATA_DIR / "qmp.sock"
    server.wait_listening(sock)
    qmp = Monitor(sock)
    try:
        qmp("blockdev-add", {"driver": "file", "node-name": "disk-file", "filename": str(disk)})
        qmp("blockdev-add", {
            "driver": "blkdebug", "node-name": "disk", "image": "disk-file",
            "inject-error": [
                {"event": "write_aio", "iotype": "write", "errno": 28, "sector": 2048, "once": True},
                {"event": "none", "iotype": "flush", "errno": 5, "once": True},
            ],
        })
        qmp("block-export-add", {"type": "nbd", "id": "disk", "node-name": "disk", "writable": True})
        nodes = {n["node-name"]: n for n in qmp("query-named-block-nodes", {"flat": True})}
        assert nodes["disk"]["drv"] == "blkdebug"
        assert qmp.error("blockdev-del", {"node-name": "disk-file"}) == "Block device disk-file is in use"
        h = nbd.NBD()
        h.connect_uri(server.uri("disk"))
        with pytest.raises(nbd.Error) as info:
            h.flush()
        assert info.value.errnum == errno.EIO
        h.flush()  # once
        # qemu-io exits 1 when a command failed
        out = run(["qemu-io", "-f", "raw", "-c", "write -P 1 1M 4k", "-c", "write -P 2 1M 4k",
                   "-c", "write -P 3 0 1M", server.uri("disk")], check=False).stdout
        lines = [ln for ln in out.splitlines() if ln.startswith("wrote") or "failed" in ln]
        assert lines == ["write failed: No space left on device",
                         "wrote 4096/4096 bytes at offset 1048576",
                         "wrote 1048576/1048576 bytes at offset 0"], out
        assert h.pread(4096, MiB) == b"\x02" * 4096
        h.shutdown()
        qmp("block-export-del", {"id": "disk"})
        time.sleep(0.1)
        qmp("blockdev-del", {"node-name": "disk"})
        qmp("blockdev-del", {"node-name": "disk-file"})
    finally:
        qmp.close()
    data = disk.read_bytes()
    assert data[:MiB] == b"\x03" * MiB and data[MiB : MiB + 4096] == b"\x02" * 4096


# -- a full disk under a snapshot overlay or a backup target -------------------------------------

FULL_SIZE = 8 * MiB
FAULT_ROOM = 3
"""Writes the fault node's overlay accepts before ENOSPC (a copy is one write per cluster here)."""


@pytest.fixture
def small_tmpfs() -> Iterator[Callable[[str], Path]]:
    """``mount(size)``: a fresh tmpfs of that size (skips unless the tests may mount)."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a small tmpfs needs root")
        where = Path(tempfile.mkdtemp(prefix="nbdf", dir="/tmp"))
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700",
                               "nbdfleece-test", str(where)], capture_output=True, text=True)
        if proc.returncode != 0:
            where.rmdir()
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)
        shutil.rmtree(where, ignore_errors=True)


def live_server(server_factory: Any, tmp_path: Path, data_dir: str = DATA_DIR
                ) -> tuple[ServerProcess, Monitor, Path, bytes]:
    live = tmp_path / "live.raw"
    initial = random_image(live, FULL_SIZE, 5)
    server: ServerProcess = server_factory("--export", f"live={live}", "--qmp", "--data-dir", data_dir)
    sock = Path(data_dir) / "qmp.sock" if os.path.isabs(data_dir) else server.workdir / data_dir / "qmp.sock"
    server.wait_listening(sock)
    return server, Monitor(sock), live, initial


def cluster_data(i: int) -> bytes:
    return bytes([0x40 + i % 64]) * CLUSTER


def write_clusters(nbd: ModuleType, h: Any, model: Model, count: int) -> list[bool]:
    """Write ``cluster_data(i)`` to clusters ``0..count-1``, one request each; the only
    failure allowed is ENOSPC.  ``model`` learns every outcome; returns which succeeded."""
    outcomes = []
    for i in range(count):
        data = cluster_data(i)
        try:
            h.pwrite(data, i * CLUSTER)
        except nbd.Error as exc:
            assert exc.errnum == errno.ENOSPC, exc
            outcomes.append(False)
            model.failed(i * CLUSTER, data)
        else:
            outcomes.append(True)
            model.ok(i * CLUSTER, data)
    return outcomes


@pytest.mark.parametrize("policy", ["break-guest-write", "break-snapshot"])
@pytest.mark.parametrize("medium", ["fault-node", "full-tmpfs"])
def test_full_disk_under_a_snapshot_overlay(server_factory: Any, tmp_path: Path,
                                            small_tmpfs: Callable[[str], Path],
                                            medium: str, policy: str) -> None:
    nbd = libnbd()
    room_dir = small_tmpfs("256k") if medium == "full-tmpfs" else None
    server, qmp, live, initial = live_server(server_factory, tmp_path,
                                             str(room_dir) if room_dir else DATA_DIR)
    try:
        if room_dir is None:
            # the QEMU >= 7.0 recipe, with a fault node between the filter and its target
            overlay = make_image(tmp_path / "overlay.raw", FULL_SIZE)
            qmp("blockdev-add", {"driver": "file", "node-name": "ovl-file", "filename": str(overlay)})
            qmp("blockdev-add", {"driver": "x-nbdfleece-fault", "node-name": "ovl", "image": "ovl-file",
                                 "rules": [{"ops": ["write"], "errno": "ENOSPC", "after": FAULT_ROOM}]})
            qmp("blockdev-add", {"driver": "copy-before-write", "node-name": "cbw", "file": "live",
                                 "target": "ovl", "on-cbw-error": policy})
            qmp("blockdev-add", {"driver": "snapshot-access", "node-name": "snap", "file": "cbw"})
            qmp("block-export-add", {"type": "nbd", "id": "snap", "node-name": "snap"})
        else:
            # nbdfleece's own snapshot, its overlay in a data folder on a 256 KiB tmpfs
            qmp("x-nbdfleece-snapshot-create", {"name": "snap", "export": "live", "on-cbw-error": policy})
        model = Model(initial)
        h = nbd.NBD()
        h.connect_uri(server.uri("live"))
        outcomes = write_clusters(nbd, h, model, 12)  # one copy each, until the overlay is full
        h.pwrite(b"\x99" * 100, 10)  # a cluster already copied: no copy needed
        model.ok(10, b"\x99" * 100)
        h.flush()
        s = nbd.NBD()
        s.connect_uri(server.uri("snap"))
        if policy == "break-guest-write":
            first_failure = outcomes.index(False)
            assert first_failure >= 1 and not any(outcomes[first_failure:]), outcomes
            if room_dir is None:
                assert first_failure == FAULT_ROOM
            # a failed guest write never reached the live disk, and the snapshot is whole
            for i in range(first_failure, 12):
                assert h.pread(CLUSTER, i * CLUSTER) == initial[i * CLUSTER : (i + 1) * CLUSTER]
            assert b"".join(s.pread(MiB, o) for o in range(0, FULL_SIZE, MiB)) == initial
        else:
            assert all(outcomes), outcomes
            for offset in (0, 5 * CLUSTER, FULL_SIZE - 1):
                with pytest.raises(nbd.Error) as info:
                    s.pread(1, offset)
                assert info.value.errnum == errno.EIO
        s.shutdown()
        model.check(h.pread(FULL_SIZE, 0), "live export")
        h.shutdown()
        model.check(live.read_bytes(), "live image")
        if room_dir is None:
            qmp("block-export-del", {"id": "snap"})
            time.sleep(0.1)
            for node in ("snap", "cbw", "ovl", "ovl-file"):
                qmp("blockdev-del", {"node-name": node})
        else:
            listed = qmp("x-nbdfleece-query-snapshots")
            assert listed[0]["broken"] == (policy == "break-snapshot")
            qmp("x-nbdfleece-snapshot-delete", {"name": "snap"})
            assert not list(room_dir.glob("*.overlay"))
    finally:
        qmp.close()
    assert server.alive()


@pytest.mark.parametrize("medium", ["fault-node", "full-tmpfs"])
def test_full_disk_under_a_backup_target(server_factory: Any, tmp_path: Path,
                                         small_tmpfs: Callable[[str], Path], medium: str) -> None:
    """The job fails with ENOSPC; guest writes, also those that overtake the job and
    would need a copy into the full target, all succeed and all reach the live disk."""
    nbd = libnbd()
    server, qmp, live, initial = live_server(server_factory, tmp_path)
    try:
        target = (small_tmpfs("256k") if medium == "full-tmpfs" else tmp_path) / "target.raw"
        make_image(target, FULL_SIZE)
        qmp("blockdev-add", {"driver": "file", "node-name": "tgt-file", "filename": str(target)})
        # The job's first step (its first MiB) is held for a second, so the guest writes
        # below overtake it and need copies of their own into the full target.
        rules: list[dict[str, Any]] = [{"ops": ["write"], "delay": 1.0, "once": True,
                                        "ranges": [{"offset": 0, "length": MiB}]}]
        if medium == "fault-node":
            rules.append({"ops": ["write"], "errno": "ENOSPC",
                          "ranges": [{"offset": 6 * MiB, "length": 2 * MiB}]})
        qmp("blockdev-add", {"driver": "x-nbdfleece-fault", "node-name": "tgt", "image": "tgt-file",
                             "rules": rules})
        model = Model(initial)
        h = nbd.NBD()
        h.connect_uri(server.uri("live"))
        qmp("blockdev-backup", {"job-id": "bk", "device": "live", "target": "tgt", "sync": "full"})
        # clusters far ahead of the job first, then everywhere: all must succeed
        for i in [100, 110, 120, 127, 3, 50, 64, 1]:
            data = cluster_data(i)
            h.pwrite(data, i * CLUSTER)
            model.ok(i * CLUSTER, data)
        done = qmp.wait_event("BLOCK_JOB_COMPLETED")
        assert done["device"] == "bk" and done["error"] == "No space left on device", done
        assert done["offset"] < done["len"] == FULL_SIZE
        assert qmp("query-block-jobs") == []
        for i in range(0, 128, 9):  # after the failure too
            data = cluster_data(i + 1)
            h.pwrite(data, i * CLUSTER + 17)
            model.ok(i * CLUSTER + 17, data)
        h.flush()
        model.check(h.pread(FULL_SIZE, 0), "live export")
        h.shutdown()
        model.check(live.read_bytes(), "live image")
        qmp("blockdev-del", {"node-name": "tgt"})
        qmp("blockdev-del", {"node-name": "tgt-file"})
    finally:
        qmp.close()
    assert server.alive()


def test_really_full_disk_under_the_live_export(server_factory: Any,
                                                small_tmpfs: Callable[[str], Path]) -> None:
    """The live image itself on a full filesystem: ENOSPC for the write, not a lost connection."""
    nbd = libnbd()
    live = small_tmpfs("256k") / "live.raw"
    make_image(live, FULL_SIZE)
    server: ServerProcess = server_factory("--export", f"live={live}")
    model = Model(bytes(FULL_SIZE))
    h = nbd.NBD()
    h.connect_uri(server.uri("live"))
    outcomes = write_clusters(nbd, h, model, 8)
    assert True in outcomes and False in outcomes, outcomes
    model.check(h.pread(FULL_SIZE, 0), "live export")  # the same connection still works
    h.shutdown()
    model.check(live.read_bytes(), "live image")


@pytest.mark.parametrize("teardown", ["blockdev-del", "block-job-cancel", "snapshot-delete"])
def test_a_guest_write_whose_copy_is_under_way_survives_the_filters_teardown(
    server_factory: Any, tmp_path: Path, teardown: str
) -> None:
    """The copy-before-write filter is taken out and its target closed while a guest
    write's copy is still reading the old data (``--fault ...,delay=1,once``): the
    write must succeed; the filter's end must not cost an acknowledged write."""
    nbd = libnbd()
    size = 8 * MiB
    live = tmp_path / "live.raw"
    random_image(live, size, 21)
    server: ServerProcess = server_factory(
        "--export", f"live={live}", "--qmp", "--data-dir", DATA_DIR,
        "--fault", "live:read,delay=1,once",
    )
    qmp = Monitor(server.workdir / DATA_DIR / "qmp.sock")
    try:
        node = qmp("query-named-block-nodes")[0]["node-name"]
        if teardown != "snapshot-delete":
            target = make_image(tmp_path / "tgt.raw", size)
            qmp("blockdev-add", {"driver": "file", "node-name": "tgt", "filename": str(target)})
        if teardown == "blockdev-del":
            qmp("blockdev-add", {"driver": "copy-before-write", "node-name": "cbw", "file": node,
                                 "target": "tgt"})
        elif teardown == "block-job-cancel":
            qmp("blockdev-backup", {"job-id": "fl", "device": node, "target": "tgt", "sync": "none"})
        else:
            qmp("x-nbdfleece-snapshot-create", {"name": "snap", "export": "live"})
        h = nbd.NBD()
        h.connect_uri(server.uri("live"))
        data = b"N" * 4096
        cookie = h.aio_pwrite(data, 64 * KiB)  # its copy reads the old cluster for 1 s
        time.sleep(0.3)
        if teardown == "blockdev-del":
            qmp("blockdev-del", {"node-name": "cbw"})
        elif teardown == "block-job-cancel":
            qmp("block-job-cancel", {"device": "fl"})
            deadline = time.monotonic() + 30
            while qmp("query-jobs"):  # dismissed: the target is free to delete
                assert time.monotonic() < deadline, "the cancelled job never went away"
                time.sleep(0.01)
        else:
            qmp("x-nbdfleece-snapshot-delete", {"name": "snap"})
        if teardown != "snapshot-delete":
            qmp("blockdev-del", {"node-name": "tgt"})
        while not h.aio_command_completed(cookie):  # raises if the write failed
            h.poll(1)
        assert h.pread(len(data), 64 * KiB) == data
        h.shutdown()
    finally:
        qmp.close()
    assert live.read_bytes()[64 * KiB : 64 * KiB + 4096] == data
