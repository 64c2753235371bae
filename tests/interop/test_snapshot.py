"""Point-in-time snapshots (copy-before-write) through the real server process.

Clients: ``qemu-io`` (live writes), ``nbdcopy``, ``qemu-img compare``,
``nbdinfo``, libnbd's Python binding (threads of writers and readers),
``qemu.qmp`` and ``nbdfleece snapshot`` (the command line).  Expected
contents and bitmaps come from byte copies of the image and from models of
the acknowledged writes, never from the server's code.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from qemu.qmp import QMPClient

from tests.conftest import ServerProcess, libnbd, qemu_io, require, run
from tests.interop.test_bitmaps import expected_runs, full_map, nbdinfo_map

pytestmark = pytest.mark.interop

KiB = 1 << 10
MiB = 1 << 20
G = 64 * KiB  # bm0's granularity and the copy-before-write cluster
CTX = "qemu:dirty-bitmap:bm0"
DATA_DIR = "D"  # relative: resolved in the server's working folder
SHM = Path("/dev/shm")


@pytest.fixture(params=["disk", "tmpfs"])
def where(request: Any, tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """(folder for the image, --data-dir): on disk, or both on tmpfs, where the copy
    filter copies in the event loop's synchronous fast path (``block/cbw.py``)."""
    if request.param == "disk":
        yield tmp_path, DATA_DIR
        return
    if not SHM.is_dir():
        pytest.skip("no /dev/shm")
    folder = Path(tempfile.mkdtemp(prefix="nbdfleece-test-", dir=SHM))
    try:
        yield folder, str(folder / DATA_DIR)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def cli(server: ServerProcess, *args: str, check: bool = True,
        data_dir: str = DATA_DIR) -> subprocess.CompletedProcess[str]:
    """``nbdfleece snapshot --data-dir D ARGS`` run in the server's folder."""
    proc = subprocess.run(
        [sys.executable, "-m", "nbdfleece", "snapshot", "--data-dir", data_dir, *args],
        cwd=server.workdir, capture_output=True, text=True, timeout=60,
    )
    if check:
        assert proc.returncode == 0, f"{args}: rc {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def nbdcopy(uri: str, out: Path) -> bytes:
    require("nbdcopy")
    run(["nbdcopy", uri, str(out)])
    return out.read_bytes()


def base_allocation(uri: str) -> list[tuple[int, int, int]]:
    require("nbdinfo")
    out = run(["nbdinfo", "--map", uri]).stdout
    return [(int(f[0]), int(f[1]), int(f[2])) for f in (line.split() for line in out.splitlines())]


def clusters(writes: list[tuple[int, int]], size: int) -> int:
    """Bytes a copy-before-write with G-sized clusters copies for ``writes``."""
    touched = {c for off, n in writes for c in range(off // G, (off + n - 1) // G + 1)}
    return sum(min((c + 1) * G, size) - c * G for c in touched)


def apply(image: bytearray, known: bytearray, command: str, off: int, n: int) -> None:
    """The effect of one qemu-io command on a model (discarded bytes become unknown)."""
    if command.startswith("write -P"):
        image[off : off + n] = bytes([int(command.split()[2], 16)]) * n
        known[off : off + n] = b"\1" * n
    elif command.startswith("write -z"):
        image[off : off + n] = bytes(n)
        known[off : off + n] = b"\1" * n
    else:
        assert command.startswith("discard")
        known[off : off + n] = bytes(n)


def same_where_known(got: bytes, image: bytes, known: bytes) -> bool:
    g, i = np.frombuffer(got, np.uint8), np.frombuffer(image, np.uint8)
    k = np.frombuffer(known, np.uint8).astype(bool)
    return bool(np.array_equal(g[k], i[k]))


# -- scenario S0 ----------------------------------------------------------------------------------

SIZE = 32 * MiB + 12 * KiB  # the last cluster is partial
WRITES_A = [
    ("write -P 0x11 0 4k", 0, 4 * KiB),
    ("write -P 0x22 1M 192k", 1 * MiB, 192 * KiB),
    ("write -z 5M 64k", 5 * MiB, 64 * KiB),
    ("discard 7M 128k", 7 * MiB, 128 * KiB),
    ("write -P 0x33 10485860 1", 10485860, 1),
]
WRITES_B = [
    ("write -P 0x44 0 8k", 0, 8 * KiB),
    ("write -P 0x55 1126400 300k", 1126400, 300 * KiB),
    ("write -z 5M 4k", 5 * MiB, 4 * KiB),
    ("discard 3M 64k", 3 * MiB, 64 * KiB),
    ("write -P 0x66 20971519 2", 20971519, 2),
    (f"write -P 0x77 {SIZE - 1} 1", SIZE - 1, 1),
]
WRITES_C = [
    ("write -P 0x88 12M 64k", 12 * MiB, 64 * KiB),
    ("write -P 0x99 100 1", 100, 1),
]


def initial_image(path: Path, size: int, seed: int) -> bytes:
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


def test_s0_snapshot_with_bitmap_rotation(server_factory: Any, tmp_path: Path) -> None:
    require("qemu-io", "nbdcopy", "nbdinfo", "qemu-img")
    nbd = libnbd()
    image = tmp_path / "live.raw"
    initial_image(image, SIZE, 0)
    server: ServerProcess = server_factory(
        "--export", f"live={image},bitmap=bm0", "--qmp", "--data-dir", DATA_DIR,
    )
    server.wait_listening(server.workdir / DATA_DIR / "qmp.sock")
    live, snap = server.uri("live"), server.uri("snap")

    qemu_io(live, [c for c, _, _ in WRITES_A])
    h = nbd.NBD()
    h.connect_uri(live)
    h.flush()
    h.shutdown()
    before = image.read_bytes()  # the image at the snapshot instant
    (tmp_path / "before.raw").write_bytes(before)

    out = cli(server, "create", "snap", "--of", "live", "--bitmap", "bm0").stdout
    assert "snapshot 'snap' of 'live' created" in out, out
    overlay = server.workdir / DATA_DIR / "snapshot-snap.overlay"
    assert overlay.exists()
    # the name is taken; the source must exist
    assert cli(server, "create", "snap", "--of", "live", check=False).returncode == 1
    assert cli(server, "create", "other", "--of", "nope", check=False).returncode == 1

    qemu_io(live, [c for c, _, _ in WRITES_B])

    assert nbdcopy(snap, tmp_path / "out.raw") == before
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(tmp_path / "before.raw"), snap])
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(tmp_path / "out.raw"),
         str(tmp_path / "before.raw")])

    a = [(o, n) for _, o, n in WRITES_A]
    b = [(o, n) for _, o, n in WRITES_B]
    c = [(o, n) for _, o, n in WRITES_C]
    assert nbdinfo_map(snap, CTX) == expected_runs(a, G, SIZE)
    assert nbdinfo_map(live, CTX) == expected_runs(b, G, SIZE)

    # base:allocation of the snapshot never calls the snapshot's data zero
    pos = 0
    for start, length, flags in base_allocation(snap):
        assert start == pos
        pos += length
        if flags & 2:
            assert not any(before[start : start + length]), (start, length, flags)
    assert pos == SIZE

    # read-only, and refused by the server itself (libnbd's own check disabled)
    require("nbdinfo")
    assert run(["nbdinfo", "--is", "read-only", snap], check=False).returncode == 0
    assert run(["nbdinfo", "--is", "read-only", live], check=False).returncode == 2
    h = nbd.NBD()
    h.set_strict_mode(0)
    h.connect_uri(snap)
    attempts: list[Callable[[], object]] = [
        lambda: h.pwrite(b"x", 0), lambda: h.zero(512, 0), lambda: h.trim(G, 0),
    ]
    for attempt in attempts:
        with pytest.raises(nbd.Error) as info:
            attempt()
        assert info.value.errnum == errno.EPERM
    h.shutdown()

    listed = cli(server, "list").stdout.splitlines()
    assert listed == [f"snap\tof live\tcopied {clusters(b, SIZE)} bytes"], listed

    # more live writes: the snapshot and its frozen bitmap stay as they were
    qemu_io(live, [c for c, _, _ in WRITES_C])
    assert nbdinfo_map(snap, CTX) == expected_runs(a, G, SIZE)
    assert nbdinfo_map(live, CTX) == expected_runs(b + c, G, SIZE)
    assert nbdcopy(snap, tmp_path / "out2.raw") == before
    assert cli(server, "list").stdout.splitlines() == [
        f"snap\tof live\tcopied {clusters(b + c, SIZE)} bytes"
    ]

    out = cli(server, "delete", "snap").stdout
    assert "deleted" in out
    assert run(["nbdinfo", snap], check=False).returncode == 1
    assert not overlay.exists()
    assert cli(server, "list").stdout == ""
    assert cli(server, "delete", "snap", check=False).returncode == 1

    # the live disk holds every write, and keeps taking them
    model, known = bytearray(before), bytearray(b"\1" * SIZE)
    for command, off, n in WRITES_B + WRITES_C:
        apply(model, known, command, off, n)
    qemu_io(live, ["write -P 0xaa 0 1"])
    apply(model, known, "write -P 0xaa", 0, 1)
    assert same_where_known(nbdcopy(live, tmp_path / "live.out"), bytes(model), bytes(known))
    assert nbdinfo_map(live, CTX) == expected_runs([*b, *c, (0, 1)], G, SIZE)


def test_two_snapshots_of_one_export_and_deleting_the_older(server_factory: Any, tmp_path: Path) -> None:
    require("qemu-io", "nbdcopy", "nbdinfo")
    size = 8 * MiB
    image = tmp_path / "live.raw"
    first = initial_image(image, size, 1)
    server: ServerProcess = server_factory(
        "--export", f"live={image},bitmap=bm0", "--qmp", "--data-dir", DATA_DIR,
    )
    server.wait_listening(server.workdir / DATA_DIR / "qmp.sock")
    live = server.uri("live")
    cli(server, "create", "s1", "--of", "live", "--bitmap", "bm0")
    x = [("write -P 0x01 100 70k", 100, 70 * KiB), ("write -z 3M 1", 3 * MiB, 1)]
    qemu_io(live, [cmd for cmd, _, _ in x])
    model, known = bytearray(first), bytearray(b"\1" * size)
    for cmd, off, n in x:
        apply(model, known, cmd, off, n)
    second = bytes(model)
    cli(server, "create", "s2", "--of", "live", "--bitmap", "bm0")
    y = [("write -P 0x02 0 200k", 0, 200 * KiB), ("write -P 0x03 3M 64k", 3 * MiB, 64 * KiB),
         ("write -P 0x04 7M 1", 7 * MiB, 1)]
    qemu_io(live, [cmd for cmd, _, _ in y])
    for cmd, off, n in y:
        apply(model, known, cmd, off, n)
    assert nbdcopy(server.uri("s1"), tmp_path / "s1.raw") == first
    assert nbdcopy(server.uri("s2"), tmp_path / "s2.raw") == second
    assert nbdinfo_map(server.uri("s1"), CTX) == expected_runs([], G, size)
    assert nbdinfo_map(server.uri("s2"), CTX) == expected_runs([(o, n) for _, o, n in x], G, size)

    cli(server, "delete", "s1")
    z = [("write -P 0x05 5M 100k", 5 * MiB, 100 * KiB), ("write -P 0x06 1 1", 1, 1)]
    qemu_io(live, [cmd for cmd, _, _ in z])
    for cmd, off, n in z:
        apply(model, known, cmd, off, n)
    assert nbdcopy(server.uri("s2"), tmp_path / "s2b.raw") == second
    assert nbdcopy(live, tmp_path / "live1.raw") == bytes(model)
    cli(server, "delete", "s2")
    qemu_io(live, ["write -P 0x07 6M 64k"])
    apply(model, known, "write -P 0x07", 6 * MiB, 64 * KiB)
    assert nbdcopy(live, tmp_path / "live2.raw") == bytes(model)
    assert not list((server.workdir / DATA_DIR).glob("*.overlay"))


def test_client_still_connected_to_a_deleted_snapshot_gets_no_live_data(
    server_factory: Any, tmp_path: Path
) -> None:
    """Deleting a snapshot while a client is connected to it: that client may
    get errors, or the snapshot's data, but never the live disk's new data."""
    nbd = libnbd()
    size = 4 * MiB
    image = tmp_path / "live.raw"
    before = initial_image(image, size, 3)
    server: ServerProcess = server_factory(
        "--export", f"live={image}", "--qmp", "--data-dir", DATA_DIR,
    )
    server.wait_listening(server.workdir / DATA_DIR / "qmp.sock")
    cli(server, "create", "snap", "--of", "live")
    s = nbd.NBD()
    s.connect_uri(server.uri("snap"))
    h = nbd.NBD()
    h.connect_uri(server.uri("live"))
    h.pwrite(b"\x01" * 100, 0)  # cluster 0 is copied
    assert s.pread(G, 0) == before[:G]
    cli(server, "delete", "snap")
    h.pwrite(b"\x02" * 100, 5 * G)  # cluster 5 was never copied
    h.pwrite(b"\x03" * 100, 0)
    h.shutdown()
    for offset in (0, 5 * G):
        try:
            got = s.pread(G, offset)
        except nbd.Error:
            continue  # refusing is fine
        assert got == before[offset : offset + G], f"live data served as the snapshot at {offset}"
    s.shutdown()


# -- stress: writers on three connections while the snapshot is taken and read ---------------------

STRESS_SIZE = 8 * MiB + 4 * KiB
STRIPE = 40000  # writers own interleaved, unaligned stripes: clusters are shared
WRITERS = 3


@dataclass
class Op:
    kind: str  # "write", "zero" or "trim"
    start: int
    end: int
    data: bytes | None
    issued: float
    acked: float


def owner_mask(w: int) -> npt.NDArray[np.bool_]:
    stripe_of = np.arange(STRESS_SIZE) // STRIPE
    mask: npt.NDArray[np.bool_] = stripe_of % WRITERS == w
    return mask


def qmp_execute(path: Path, command: str, arguments: dict[str, Any]) -> tuple[Any, float, float]:
    """Run one QMP command; also return the times just before sending and after the reply."""

    async def main() -> tuple[Any, float, float]:
        client = QMPClient("nbdfleece-test")
        await client.connect(str(path))
        try:
            t0 = time.monotonic()
            result = await client.execute(command, arguments)
            return result, t0, time.monotonic()
        finally:
            await client.disconnect()

    return asyncio.run(main())


def granules(ops: list[Op]) -> npt.NDArray[np.bool_]:
    out = np.zeros(-(-STRESS_SIZE // G), dtype=bool)
    for op in ops:
        out[op.start // G : (op.end - 1) // G + 1] = True
    return out


def dirty(runs: list[tuple[int, int, int]]) -> npt.NDArray[np.bool_]:
    out = np.zeros(-(-STRESS_SIZE // G), dtype=bool)
    for start, length, flag in runs:
        if flag:
            out[start // G : -(-(start + length) // G)] = True
    return out


STRESS_SEEDS = [int(s) for s in os.environ.get("NBDFLEECE_STRESS_SEEDS", "11,22").split(",")]
"""More rounds: NBDFLEECE_STRESS_SEEDS=1,2,3,... (each seed runs on disk and on tmpfs)."""


@pytest.mark.parametrize("seed", STRESS_SEEDS)
def test_snapshot_under_concurrent_writers(
    server_factory: Any, tmp_path: Path, short_dir: Path, seed: int, where: tuple[Path, str]
) -> None:
    require("nbdcopy")
    nbd = libnbd()
    folder, data_dir = where
    image = folder / "live.raw"
    initial = initial_image(image, STRESS_SIZE, seed)
    qmp = short_dir / "qmp.sock"
    server: ServerProcess = server_factory(
        "--export", f"live={image},bitmap=bm0", "--qmp", f"unix:{qmp}", "--data-dir", data_dir,
    )
    server.wait_listening(qmp)
    uris = [server.uri("live"), server.unix_uri("live")]
    stop = threading.Event()
    errors: list[BaseException] = []
    logs: list[list[Op]] = [[] for _ in range(WRITERS)]

    def guarded(fn: Any) -> Any:
        def body() -> None:
            try:
                fn()
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)
                stop.set()
        return body

    def writer(w: int) -> None:
        rng = random.Random(seed * 100 + w)
        mine = list(range(w * STRIPE, STRESS_SIZE, WRITERS * STRIPE))
        h = nbd.NBD()
        h.connect_uri(uris[w % 2])
        assert h.can_trim() and h.can_zero()
        while not stop.is_set():
            s = rng.choice(mine)
            e = min(s + STRIPE, STRESS_SIZE)
            a = rng.randrange(s, e)
            b = rng.randrange(a, min(e, a + 3 * G)) + 1
            r = rng.random()
            t0 = time.monotonic()
            if r < 0.6:
                data = rng.randbytes(b - a)
                h.pwrite(data, a)
                op = Op("write", a, b, data, t0, time.monotonic())
            elif r < 0.85:
                flags = nbd.CMD_FLAG_NO_HOLE if rng.random() < 0.3 else 0
                h.zero(b - a, a, flags)
                op = Op("zero", a, b, None, t0, time.monotonic())
            else:
                h.trim(b - a, a)
                op = Op("trim", a, b, None, t0, time.monotonic())
            logs[w].append(op)
        h.shutdown()

    passes: list[bytes] = []
    passes_lock = threading.Lock()

    def reader(r: int) -> None:
        rng = random.Random(seed * 1000 + r)
        h = nbd.NBD()
        h.connect_uri(server.uri("snap") if r % 2 else server.unix_uri("snap"))
        for i in range(2):
            if i:
                time.sleep(0.3)  # later in time, while the writers go on
            buf = bytearray()
            while len(buf) < STRESS_SIZE:
                n = min(rng.randrange(1, 300 * KiB), STRESS_SIZE - len(buf))
                buf += h.pread(n, len(buf))
            with passes_lock:
                passes.append(bytes(buf))
        h.shutdown()

    def snapshot_map() -> list[tuple[int, int, int]]:
        h = nbd.NBD()
        h.add_meta_context(CTX)
        h.connect_uri(server.uri("snap"))
        runs = full_map(nbd, h, CTX, STRESS_SIZE)
        h.shutdown()
        return runs

    writers = [threading.Thread(target=guarded(lambda w=w: writer(w))) for w in range(WRITERS)]
    for t in writers:
        t.start()
    try:
        time.sleep(0.4)
        result, t_start, t_end = qmp_execute(
            qmp, "x-nbdfleece-snapshot-create", {"name": "snap", "export": "live", "bitmap": "bm0"}
        )
        assert result["name"] == "snap"
        frozen_early = snapshot_map()
        copier = subprocess.Popen(
            ["nbdcopy", server.uri("snap"), str(tmp_path / "snap.raw")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        readers = [threading.Thread(target=guarded(lambda r=r: reader(r))) for r in range(2)]
        for t in readers:
            t.start()
        for t in readers:
            t.join(60)
        copier_out = copier.communicate(timeout=60)[0]
        assert copier.returncode == 0, copier_out
        time.sleep(0.3)
        frozen = snapshot_map()
    finally:
        stop.set()
        for t in writers:
            t.join(60)
    assert not errors, errors
    assert all(len(log) > 20 for log in logs), [len(log) for log in logs]

    # the snapshot is one and the same image at every read, however late
    assert len(passes) == 4
    snapshot = (tmp_path / "snap.raw").read_bytes()
    for p in passes:
        assert p == snapshot
    assert frozen == frozen_early

    # and it is a point in time: per writer, the state after exactly k of its
    # (sequential) requests, with every request acknowledged before the
    # command was sent included, and none sent after its reply
    snap_arr = np.frombuffer(snapshot, np.uint8)
    state = np.frombuffer(initial, np.uint8).copy()
    known = np.ones(STRESS_SIZE, dtype=bool)

    def do(op: Op) -> None:
        if op.kind == "write":
            assert op.data is not None
            state[op.start : op.end] = np.frombuffer(op.data, np.uint8)
            known[op.start : op.end] = True
        elif op.kind == "zero":
            state[op.start : op.end] = 0
            known[op.start : op.end] = True
        else:
            known[op.start : op.end] = False

    in_snapshot: list[Op] = []
    after_snapshot: list[Op] = []
    either: list[Op] = []
    for w, log in enumerate(logs):
        k_min = sum(1 for op in log if op.acked < t_start)
        k_max = sum(1 for op in log if op.issued < t_end)
        assert all(op.acked < t_start for op in log[:k_min])
        for op in log[:k_min]:
            do(op)
        mine = owner_mask(w)
        window = np.zeros(STRESS_SIZE, dtype=bool)
        for op in log[k_min:k_max]:
            window[op.start : op.end] = True
        outside = mine & ~window & known
        assert np.array_equal(snap_arr[outside], state[outside]), f"writer {w}: outside the window"
        candidates = []
        for k in range(k_min, k_max + 1):
            m = mine & window & known
            if np.array_equal(snap_arr[m], state[m]):
                candidates.append(k)
            if k < k_max:
                do(log[k])
        assert candidates, f"writer {w}: the snapshot is no state between {k_min} and {k_max} requests"
        k_lo, k_hi = candidates[0], candidates[-1]
        in_snapshot += log[:k_lo]
        either += log[k_lo:k_hi]
        after_snapshot += log[k_hi:]
        for op in log[k_max:]:
            do(op)

    # the bitmap was rotated at the same instant
    h = nbd.NBD()
    h.add_meta_context(CTX)
    h.connect_uri(server.uri("live"))
    live_dirty = dirty(full_map(nbd, h, CTX, STRESS_SIZE))
    frozen_dirty = dirty(frozen)
    assert not (granules(in_snapshot) & ~frozen_dirty).any(), "a write in the snapshot is not in its bitmap"
    assert not (granules(after_snapshot) & ~live_dirty).any(), "a later write is not in the live bitmap"
    assert not (granules(either) & ~(frozen_dirty | live_dirty)).any()
    assert not (frozen_dirty & ~granules(in_snapshot + either)).any(), "frozen bitmap has later writes"
    assert not (live_dirty & ~granules(after_snapshot + either)).any(), "live bitmap has earlier writes"

    # the live disk holds every acknowledged write
    h.flush()
    live_now = bytearray()
    while len(live_now) < STRESS_SIZE:
        live_now += h.pread(min(4 * MiB, STRESS_SIZE - len(live_now)), len(live_now))
    h.shutdown()
    live_arr = np.frombuffer(bytes(live_now), np.uint8)
    assert np.array_equal(live_arr[known], state[known])

    result, _, _ = qmp_execute(qmp, "x-nbdfleece-snapshot-delete", {"name": "snap"})
    assert not list((server.workdir / data_dir).glob("*.overlay"))


# -- a target that cannot grow ------------------------------------------------------------------------

FAULT_SIZE = 8 * MiB
LIMIT = 6 * MiB + 512  # RLIMIT_FSIZE: writes end at this offset in every file the server writes


@pytest.mark.parametrize("policy", ["break-snapshot", "break-guest-write"])
def test_copy_before_write_failure(server_factory: Any, tmp_path: Path, policy: str,
                                   where: tuple[Path, str]) -> None:
    """Past the limit a write is cut short, then fails with EFBIG.  A guest write of
    ``[LIMIT - 400, LIMIT)`` fits, but its cluster's copy to the overlay does not.
    On tmpfs the copy is made in the event loop's fast path (``copy_file_range``),
    elsewhere by a worker: both must fail the same way."""
    require("nbdcopy")
    nbd = libnbd()
    folder, data_dir = where
    image = folder / "live.raw"
    before = initial_image(image, FAULT_SIZE, 5)
    server: ServerProcess = server_factory(
        "--export", f"live={image}", "--qmp", "--data-dir", data_dir,
    )
    server.wait_listening(server.workdir / data_dir / "qmp.sock")
    cli(server, "create", "snap", "--of", "live", "--on-cbw-error", policy, data_dir=data_dir)
    h = nbd.NBD()
    h.connect_uri(server.uri("live"))
    model = bytearray(before)
    h.pwrite(b"\x01" * 1000, 10)  # copied while there is room
    model[10:1010] = b"\x01" * 1000
    pid = server.proc.pid
    old_limit = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (LIMIT, old_limit[1]))  # soft only
    try:
        big = b"\x02" * 400
        if policy == "break-snapshot":
            h.pwrite(big, LIMIT - 400)  # the copy fails, the write goes on
            model[LIMIT - 400 : LIMIT] = big
        else:
            with pytest.raises(nbd.Error) as info:
                h.pwrite(big, LIMIT - 400)
            assert info.value.errnum == errno.ENOSPC
        # other live writes: an uncopied cluster below the limit, a copied one
        h.pwrite(b"\x03" * 5000, 2 * MiB + 7)
        model[2 * MiB + 7 : 2 * MiB + 5007] = b"\x03" * 5000
        h.zero(100, 20)
        model[20:120] = bytes(100)
        h.flush()
        assert h.pread(FAULT_SIZE, 0) == bytes(model)
        assert image.read_bytes() == bytes(model)  # durable, in the file itself

        s = nbd.NBD()
        s.connect_uri(server.uri("snap"))
        listed = cli(server, "list", data_dir=data_dir).stdout
        if policy == "break-snapshot":
            for offset in (0, 3 * MiB, LIMIT - 400, FAULT_SIZE - 1):
                with pytest.raises(nbd.Error) as info:
                    s.pread(1, offset)
                assert info.value.errnum == errno.EIO
            assert "BROKEN" in listed
            assert run(["nbdcopy", server.uri("snap"), str(tmp_path / "o.raw")],
                       check=False).returncode != 0
        else:
            assert s.pread(FAULT_SIZE, 0) == before
            assert "BROKEN" not in listed
        s.shutdown()
    finally:
        resource.prlimit(pid, resource.RLIMIT_FSIZE, old_limit)
    if policy == "break-guest-write":
        h.pwrite(b"\x02" * 400, LIMIT - 400)  # there is room again
        model[LIMIT - 400 : LIMIT] = b"\x02" * 400
        assert nbdcopy(server.uri("snap"), tmp_path / "o.raw") == before
    else:
        s = nbd.NBD()  # sticky
        s.connect_uri(server.uri("snap"))
        with pytest.raises(nbd.Error):
            s.pread(1, 0)
        s.shutdown()
    h.pwrite(b"\x04", FAULT_SIZE - 1)
    model[-1:] = b"\x04"
    h.flush()
    assert h.pread(FAULT_SIZE, 0) == bytes(model)
    h.shutdown()
    cli(server, "delete", "snap", data_dir=data_dir)
    assert image.read_bytes() == bytes(model)
