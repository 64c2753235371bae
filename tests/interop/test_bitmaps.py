"""Dirty bitmaps seen by real clients through the real server process.

Expected maps are computed here from the list of writes and the
granularity (every written range rounded out to whole granules), never
from the server's code.  Clients: ``qemu-io`` (writes), ``nbdinfo --map``,
``qemu-img map`` with ``x-dirty-bitmap`` (QEMU's inverted sense: dirty is
``"data": false``) and libnbd's Python binding.
"""

from __future__ import annotations

import itertools
import json
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.conftest import PYTHON, ServerProcess, libnbd, make_image, qemu_io, require, run

pytestmark = pytest.mark.interop

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
CTX = "qemu:dirty-bitmap:"

Run = tuple[int, int, int]
"""(start, length, flag) with flag 1 = dirty."""


# -- the independent model ---------------------------------------------------------------

def expected_runs(writes: Iterable[tuple[int, int]], granularity: int, size: int) -> list[Run]:
    """The whole export as alternating runs: written ranges rounded out to granules."""
    spans = sorted(
        (off // granularity * granularity, min(-(-(off + n) // granularity) * granularity, size))
        for off, n in writes if n > 0
    )
    merged: list[list[int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    runs: list[Run] = []
    pos = 0
    for start, end in merged:
        if start > pos:
            runs.append((pos, start - pos, 0))
        runs.append((start, end - start, 1))
        pos = end
    if pos < size:
        runs.append((pos, size - pos, 0))
    return runs


def clip(runs: list[Run], offset: int, length: int) -> list[Run]:
    """The part of ``runs`` inside ``[offset, offset + length)``."""
    end = offset + length
    out = []
    for start, n, flag in runs:
        lo, hi = max(start, offset), min(start + n, end)
        if lo < hi:
            out.append((lo, hi - lo, flag))
    return out


# -- clients ---------------------------------------------------------------------------------

def nbdinfo_map(uri: str, context: str) -> list[Run]:
    require("nbdinfo")
    out = run(["nbdinfo", f"--map={context}", uri]).stdout
    rows = []
    for line in out.splitlines():
        start, length, flags, *desc = line.split()
        assert desc == (["dirty"] if int(flags) else ["clean"]), line
        rows.append((int(start), int(length), int(flags)))
    return rows


def qemu_img_map(server: ServerProcess, export: str, context: str) -> list[Run]:
    """QEMU's view through ``x-dirty-bitmap``, turned back into dirty = 1."""
    require("qemu-img")
    opts = (f"driver=nbd,export={export},server.type=inet,server.host=127.0.0.1,"
            f"server.port={server.port},x-dirty-bitmap={context}")
    entries = json.loads(run(["qemu-img", "map", "--output=json", "--image-opts", opts]).stdout)
    rows = []
    for e in entries:
        assert e["present"] == e["data"], e
        assert e["zero"] is False, e
        rows.append((e["start"], e["length"], 0 if e["data"] else 1))
    return rows


def connect(nbd: ModuleType, uri: str, *contexts: str) -> Any:
    h = nbd.NBD()
    for c in contexts:
        h.add_meta_context(c)
    h.connect_uri(uri)
    for c in contexts:
        assert h.can_meta_context(c), c
    return h


def block_status(nbd: ModuleType, h: Any, length: int, offset: int, context: str,
                 flags: int = 0) -> list[Run]:
    """One BLOCK_STATUS request: the extents of ``context`` as runs from ``offset``."""
    got: dict[str, list[int]] = {}

    def cb(ctx: str, off: int, entries: list[int], err: Any) -> int:
        assert ctx not in got, f"two chunks for {ctx}"
        assert off == offset
        got[ctx] = list(entries)
        return 0

    h.block_status(length, offset, cb, flags)
    entries = got[context]
    runs, pos = [], offset
    for i in range(0, len(entries), 2):
        runs.append((pos, entries[i], entries[i + 1]))
        pos += entries[i]
    return runs


def full_map(nbd: ModuleType, h: Any, context: str, size: int, step: int = 64 * MiB) -> list[Run]:
    runs: list[Run] = []
    pos = 0
    while pos < size:
        part = block_status(nbd, h, min(step, size - pos), pos, context)
        assert part and part[0][0] == pos
        for r in part:
            if runs and runs[-1][2] == r[2]:
                runs[-1] = (runs[-1][0], runs[-1][1] + r[1], r[2])
            else:
                runs.append(r)
        pos = part[-1][0] + part[-1][1]
    return runs


def check_well_formed(runs: list[Run], offset: int, length: int) -> None:
    assert runs, "no extent"
    assert runs[0][0] == offset
    pos = offset
    for start, n, flag in runs:
        assert start == pos and n > 0 and flag in (0, 1), runs
        pos += n
    assert pos == offset + length, (pos, offset + length)
    assert all(a[2] != b[2] for a, b in itertools.pairwise(runs)), "equal neighbours"


# -- tests -------------------------------------------------------------------------------------

SIZE = 64 * MiB + 12 * KiB  # the last 64 KiB and 1 MiB granules are partial
GRANULARITIES = {"b512": 512, "bm0": 64 * KiB, "b1m": 1 * MiB}

TCP_WRITES = [
    ("write -P 0x11 0 4k", 0, 4 * KiB),
    ("write -P 0x22 1M 192k", 1 * MiB, 192 * KiB),
    ("write -z 5M 64k", 5 * MiB, 64 * KiB),
    ("discard 7M 128k", 7 * MiB, 128 * KiB),
    ("write -P 0x44 10485860 1", 10485860, 1),
    ("write -P 0x55 20971519 2", 20971519, 2),  # one byte each side of 20 MiB
]
UNIX_WRITES = [
    ("write -P 0x66 31457380 1000", 31457380, 1000),
    ("write -z -u 33M 4k", 33 * MiB, 4 * KiB),
]


@pytest.fixture
def bitmap_server(server_factory: Any, tmp_path: Path) -> ServerProcess:
    image = make_image(tmp_path / "live.raw", SIZE)
    server: ServerProcess = server_factory(
        "--export", f"live={image},bitmap=bm0,bitmap=b512,bitmap=b1m,bitmap=off",
        "--bitmap", "live:b512,granularity=512",
        "--bitmap", "live:b1m,granularity=1M",
        "--bitmap", "live:off,disabled",
    )
    return server


def test_maps_after_writes_from_several_connections(bitmap_server: ServerProcess) -> None:
    nbd = libnbd()
    server = bitmap_server
    qemu_io(server.uri("live"), [c for c, _, _ in TCP_WRITES])
    qemu_io(server.unix_uri("live"), [c for c, _, _ in UNIX_WRITES])
    writes = [(o, n) for _, o, n in TCP_WRITES + UNIX_WRITES]
    # A third connection through libnbd: write, zero and trim near the end.
    h = connect(nbd, server.unix_uri("live"))
    h.pwrite(b"\x77", SIZE - 1)
    h.zero(512, 40 * MiB + 512)
    h.trim(64 * KiB, 50 * MiB)
    h.flush()
    h.shutdown()
    writes += [(SIZE - 1, 1), (40 * MiB + 512, 512), (50 * MiB, 64 * KiB)]

    for name, g in GRANULARITIES.items():
        context = CTX + name
        expected = expected_runs(writes, g, SIZE)
        assert nbdinfo_map(server.uri("live"), context) == expected, name
        assert nbdinfo_map(server.unix_uri("live"), context) == expected, name
        assert qemu_img_map(server, "live", context) == expected, name

    # A disabled bitmap is offered but records nothing.
    assert nbdinfo_map(server.uri("live"), CTX + "off") == [(0, SIZE, 0)]

    # The 64 KiB map spelled out, as a check of the model itself.
    assert expected_runs(writes, 64 * KiB, SIZE) == [
        (0, 64 * KiB, 1), (64 * KiB, 960 * KiB, 0),
        (1 * MiB, 192 * KiB, 1), (1 * MiB + 192 * KiB, 3 * MiB + 832 * KiB, 0),
        (5 * MiB, 64 * KiB, 1), (5 * MiB + 64 * KiB, 2 * MiB - 64 * KiB, 0),
        (7 * MiB, 128 * KiB, 1), (7 * MiB + 128 * KiB, 3 * MiB - 128 * KiB, 0),
        (10 * MiB, 64 * KiB, 1), (10 * MiB + 64 * KiB, 10 * MiB - 128 * KiB, 0),
        (20 * MiB - 64 * KiB, 128 * KiB, 1), (20 * MiB + 64 * KiB, 10 * MiB - 64 * KiB, 0),
        (30 * MiB, 64 * KiB, 1), (30 * MiB + 64 * KiB, 3 * MiB - 64 * KiB, 0),
        (33 * MiB, 64 * KiB, 1), (33 * MiB + 64 * KiB, 7 * MiB - 64 * KiB, 0),
        (40 * MiB, 64 * KiB, 1), (40 * MiB + 64 * KiB, 10 * MiB - 64 * KiB, 0),
        (50 * MiB, 64 * KiB, 1), (50 * MiB + 64 * KiB, 14 * MiB - 64 * KiB, 0),
        (64 * MiB, 12 * KiB, 1),
    ]

    # libnbd with all three contexts on one connection: whole map, then windows.
    h = connect(nbd, server.uri("live"), *(CTX + n for n in GRANULARITIES))
    rnd = random.Random(7)
    for name, g in GRANULARITIES.items():
        context = CTX + name
        expected = expected_runs(writes, g, SIZE)
        assert full_map(nbd, h, context, SIZE, step=7 * MiB + 3) == expected, name
        for _ in range(20):
            offset = rnd.randrange(SIZE)
            length = rnd.randrange(1, SIZE - offset + 1)
            got = block_status(nbd, h, length, offset, context)
            check_well_formed(got, offset, length)
            assert got == clip(expected, offset, length), (name, offset, length)
            # REQ_ONE: exactly one extent, from the offset to the end of its run.
            one = block_status(nbd, h, length, offset, context, nbd.CMD_FLAG_REQ_ONE)
            assert one == clip(expected, offset, length)[:1], (name, offset, length)
        # REQ_ONE at named places: a 1-byte write's granule, mid-granule, the partial tail.
        for offset in (0, 10485860, 20 * MiB - 1, SIZE - 1, SIZE - 12 * KiB, 3 * MiB + 1):
            one = block_status(nbd, h, SIZE - offset, offset, context, nbd.CMD_FLAG_REQ_ONE)
            assert one == clip(expected, offset, SIZE - offset)[:1], (name, offset)
    h.shutdown()


def test_request_of_4g_minus_512_is_clipped(server_factory: Any, tmp_path: Path) -> None:
    """Clients send block-status requests of up to 4 GiB; an 8 GiB sparse export."""
    nbd = libnbd()
    size = 8 * GiB
    image = make_image(tmp_path / "big.raw", size)
    server: ServerProcess = server_factory(
        "--export", f"big={image},bitmap=bm0,bitmap=fine", "--bitmap", "big:fine,granularity=512",
    )
    h = connect(nbd, server.uri("big"), "base:allocation", CTX + "bm0", CTX + "fine")
    writes = [(100, 1), (4 * GiB - 1000, 2000), (6 * GiB + 12345, 70000), (size - 1, 1)]
    for offset, length in writes:
        h.pwrite(b"\x5a" * length, offset)
    length = 4 * GiB - 512
    for offset in (0, 512, 4 * GiB + 512, 4 * GiB - 1000):
        for name, g in (("bm0", 64 * KiB), ("fine", 512)):
            expected = clip(expected_runs(writes, g, size), offset, length)
            got = block_status(nbd, h, length, offset, CTX + name)
            check_well_formed(got, offset, length)
            assert got == expected, (name, offset)
            one = block_status(nbd, h, length, offset, CTX + name, nbd.CMD_FLAG_REQ_ONE)
            assert one == expected[:1], (name, offset)
        alloc = block_status(nbd, h, length, offset, "base:allocation")
        assert alloc[0][0] == offset and sum(n for _, n, _ in alloc) <= length
    assert nbdinfo_map(server.uri("big"), CTX + "bm0") == expected_runs(writes, 64 * KiB, size)
    h.shutdown()


def test_concurrent_writers_and_reader_monotonic(server_factory: Any, tmp_path: Path) -> None:
    nbd = libnbd()
    size = 64 * MiB
    g = 64 * KiB
    image = make_image(tmp_path / "live.raw", size)
    server: ServerProcess = server_factory("--export", f"live={image},bitmap=bm0")
    stop = threading.Event()
    errors: list[BaseException] = []
    written: list[list[tuple[int, int]]] = [[] for _ in range(4)]
    reads = 0

    def guarded(fn: Callable[[], None]) -> Callable[[], None]:
        def body() -> None:
            try:
                fn()
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)
                stop.set()
        return body

    def writer(i: int) -> Callable[[], None]:
        def work() -> None:
            rnd = random.Random(i)
            uri = server.uri("live") if i % 2 else server.unix_uri("live")
            h = connect(nbd, uri)
            # Up to 200 KiB anywhere: the 1024 granules fill up over 400 writes
            # each, so the map keeps changing while the reader reads it.
            while not stop.is_set() and len(written[i]) < 400:
                offset = rnd.randrange(size - 200 * KiB)
                length = rnd.randrange(1, 200 * KiB)
                if rnd.random() < 0.2:
                    h.zero(length, offset)
                else:
                    h.pwrite(bytes([i + 1]) * length, offset)
                written[i].append((offset, length))  # after the reply: acknowledged
            h.shutdown()
        return work

    def reader() -> None:
        nonlocal reads
        h = connect(nbd, server.uri("live"), CTX + "bm0")
        seen: set[int] = set()
        rnd = random.Random(99)
        while not stop.is_set():
            if rnd.random() < 0.5:
                offset, length = 0, size
            else:
                offset = rnd.randrange(size)
                length = rnd.randrange(1, size - offset + 1)
            snapshot = [list(w) for w in written]  # acknowledged before the request
            runs = block_status(nbd, h, length, offset, CTX + "bm0")
            check_well_formed(runs, offset, length)
            dirty = {
                gi for start, n, flag in runs if flag
                for gi in range(start // g, (start + n - 1) // g + 1)
            }
            lo, hi = offset // g, (offset + length - 1) // g
            window_seen = {gi for gi in seen if lo <= gi <= hi}
            assert window_seen <= dirty, f"granules went clean: {sorted(window_seen - dirty)[:5]}"
            must = {
                gi for w in snapshot for o, n in w for gi in range(o // g, (o + n - 1) // g + 1)
                if lo <= gi <= hi
            }
            assert must <= dirty, f"acknowledged writes missing: {sorted(must - dirty)[:5]}"
            seen |= dirty
            reads += 1
        h.shutdown()

    threads = [threading.Thread(target=guarded(writer(i))) for i in range(4)]
    threads.append(threading.Thread(target=guarded(reader)))
    for t in threads:
        t.start()
    for t in threads[:4]:
        t.join(60)
    time.sleep(0.05)
    stop.set()
    threads[4].join(60)
    assert not any(t.is_alive() for t in threads)
    if errors:
        raise errors[0]
    assert reads >= 10
    everything = [w for ws in written for w in ws]
    assert len(everything) == 1600
    assert nbdinfo_map(server.uri("live"), CTX + "bm0") == expected_runs(everything, g, size)


# -- persistence across restarts ---------------------------------------------------------------

def serve_args(image: Path, *, export_bitmap: bool = True) -> list[str]:
    return [
        "--export", f"live={image}" + (",bitmap=pb" if export_bitmap else ""),
        "--bitmap", "live:pb,persistent",
    ]


def serve_once(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``nbdfleece serve`` expecting it to refuse to start."""
    workdir.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [PYTHON, "-m", "nbdfleece", "serve", "--listen", f"unix:{workdir / 'refused.sock'}", *args],
        capture_output=True, text=True, timeout=30, cwd=workdir,
    )


def test_persistent_bitmap_survives_clean_restart(server_factory: Any, tmp_path: Path) -> None:
    size = 64 * MiB
    image = make_image(tmp_path / "live.raw", size)
    sidecar = Path(f"{image}.nbdfleece-bitmaps")
    first: ServerProcess = server_factory(*serve_args(image))
    # The listening socket exists before the exports do: a first client waits for them.
    qemu_io(first.uri("live"), ["write -P 1 0 1", "write -P 2 3M 100k", "write -z 9M 64k"])
    assert json.loads(sidecar.read_text())["in_use"] is True
    writes = [(0, 1), (3 * MiB, 100 * KiB), (9 * MiB, 64 * KiB)]
    before = nbdinfo_map(first.uri("live"), CTX + "pb")
    assert before == expected_runs(writes, 64 * KiB, size)
    assert first.stop(signal.SIGTERM) == 0
    assert json.loads(sidecar.read_text())["in_use"] is False

    second: ServerProcess = server_factory(*serve_args(image))
    assert nbdinfo_map(second.uri("live"), CTX + "pb") == before
    qemu_io(second.unix_uri("live"), ["write -P 3 40M 1"])
    writes.append((40 * MiB, 1))
    assert nbdinfo_map(second.uri("live"), CTX + "pb") == expected_runs(writes, 64 * KiB, size)
    assert second.stop(signal.SIGTERM) == 0

    third: ServerProcess = server_factory(*serve_args(image))
    assert nbdinfo_map(third.uri("live"), CTX + "pb") == expected_runs(writes, 64 * KiB, size)


def test_kill_9_makes_persistent_bitmap_inconsistent(server_factory: Any, tmp_path: Path) -> None:
    nbd = libnbd()
    image = make_image(tmp_path / "live.raw", 64 * MiB)
    doomed: ServerProcess = server_factory(*serve_args(image))
    qemu_io(doomed.uri("live"), ["write -P 1 1M 4k"])
    assert doomed.stop(signal.SIGKILL) == -signal.SIGKILL

    # Exporting the inconsistent bitmap is refused: exit code 2 and a clear message.
    refused = serve_once(tmp_path / "refused", *serve_args(image))
    assert refused.returncode == 2, refused
    assert "Bitmap 'pb' is inconsistent and cannot be used" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr

    # Declared but not exported: the server starts and never offers the bitmap.
    server: ServerProcess = server_factory(*serve_args(image, export_bitmap=False))
    out = run(["nbdinfo", "--list", server.uri()]).stdout
    contexts = [ln.strip() for ln in out.splitlines() if ln.startswith("\t\t")]
    assert contexts == ["base:allocation"], out
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(server.uri("live"))
    seen: list[str] = []
    h.add_meta_context(CTX)
    assert h.opt_list_meta_context(lambda name: seen.append(name)) == 0
    assert seen == []
    h.opt_abort()
    h = nbd.NBD()
    h.add_meta_context(CTX + "pb")
    h.connect_uri(server.uri("live"))
    assert not h.can_meta_context(CTX + "pb")
    h.pwrite(b"x", 0)  # writes still work; the bitmap does not record them
    h.shutdown()
    assert server.stop(signal.SIGTERM) == 0

    # Still inconsistent after that clean shutdown: never trusted again.
    again = serve_once(tmp_path / "again", *serve_args(image))
    assert again.returncode == 2, again
    assert "Bitmap 'pb' is inconsistent and cannot be used" in again.stderr


GARBAGE_SIDECARS = {
    "binary": b"\x00\xffnot json",
    "json list": b"[1, 2]",
    "data of the wrong length": json.dumps({
        "format": "nbdfleece-bitmaps", "version": 1, "in_use": False, "image_size": MiB,
        "bitmaps": [{"name": "pb", "granularity": 65536, "recording": True,
                     "inconsistent": False, "data": "AAAA"}],
    }).encode(),
}


@pytest.mark.parametrize("content", GARBAGE_SIDECARS.values(), ids=GARBAGE_SIDECARS.keys())
def test_unusable_sidecar_is_a_clean_start_up_error(tmp_path: Path, content: bytes) -> None:
    """An unusable bitmap file: exit code 2 and a message naming it, never a traceback."""
    image = make_image(tmp_path / "live.raw", MiB)
    Path(f"{image}.nbdfleece-bitmaps").write_bytes(content)
    proc = serve_once(tmp_path / "srv", "--export", f"live={image}")
    assert proc.returncode == 2, proc
    assert "Traceback" not in proc.stderr, proc.stderr
    assert f"{image}.nbdfleece-bitmaps" in proc.stderr, proc.stderr
