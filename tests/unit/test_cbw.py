"""Copy-before-write in-process: the filter, its range locks and the snapshot view.

Sources and targets are ``MemoryStore``s, so every byte can be checked
against a model.  Interleavings are forced with layers that park a chosen
request on a ``trio.Event`` (``Blocker``), or that yield at random points
(``Jitter``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdfleece.block.cbw import (
    BREAK_GUEST_WRITE,
    BREAK_SNAPSHOT,
    CopyBeforeWrite,
    RangeLocks,
    SnapshotView,
)
from nbdfleece.block.memory import MemoryStore
from nbdfleece.block.node import BlockNode, Extent, Layer, Segment
from nbdfleece.block.tracking import DirtyTracking
from nbdfleece.constants import AllocationState, Errno
from nbdfleece.errors import RequestError

C = 4096  # cluster size used by most tests
SIZE = 16 * C + 1000  # the last cluster is partial


def noise(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def source_with(data: bytes, name: str = "src") -> MemoryStore:
    store = MemoryStore(name, len(data))
    store.data[:] = data
    return store


async def snap(cbw: CopyBeforeWrite, offset: int = 0, length: int | None = None) -> bytes:
    buf = bytearray(cbw.size - offset if length is None else length)
    await cbw.snapshot_read(offset, memoryview(buf))
    return bytes(buf)


def wrap(data: bytes) -> memoryview:
    return memoryview(bytearray(data))


class Hold:
    """One parked request: ``entered`` when it arrives, it goes on at ``release``."""

    def __init__(self) -> None:
        self.entered = trio.Event()
        self.release = trio.Event()


class Blocker(Layer):
    """Parks the requests chosen with ``hold(op, offset)``; the rest pass through."""

    def __init__(self, child: BlockNode, name: str = "blocker") -> None:
        super().__init__(name, child)
        self.holds: dict[tuple[str, int], Hold] = {}
        self.log: list[tuple[str, int, int]] = []

    def hold(self, op: str, offset: int) -> Hold:
        h = self.holds[op, offset] = Hold()
        return h

    async def _gate(self, op: str, offset: int, length: int) -> None:
        self.log.append((op, offset, length))
        h = self.holds.pop((op, offset), None)
        if h is not None:
            h.entered.set()
            await h.release.wait()

    async def read(self, offset: int, buf: memoryview, *, sparse: bool = False) -> list[Segment]:
        await self._gate("read", offset, len(buf))
        return await super().read(offset, buf, sparse=sparse)

    async def write(self, offset: int, data: memoryview, *, fua: bool = False) -> None:
        await self._gate("write", offset, len(data))
        await super().write(offset, data, fua=fua)

    async def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool, fua: bool = False, fast: bool = False
    ) -> None:
        await self._gate("zero", offset, length)
        await super().write_zeroes(offset, length, may_trim=may_trim, fua=fua, fast=fast)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        await self._gate("status", offset, length)
        return await super().block_status(offset, length)


class ZeroAware(MemoryStore):
    """Reports all-zero ranges as holes, like a sparse file does."""

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        if not any(self.data[offset : offset + length]):
            return [Extent(length, AllocationState.HOLE | AllocationState.ZERO)]
        return [Extent(length, AllocationState(0))]


class FaultyTarget(Layer):
    """Writes fail with ``err`` while ``failing`` is set."""

    def __init__(self, child: MemoryStore, err: int = errno.ENOSPC) -> None:
        super().__init__("faulty", child)
        self.failing = True
        self.err = err
        self.failures = 0

    async def write(self, offset: int, data: memoryview, *, fua: bool = False) -> None:
        if self.failing:
            self.failures += 1
            raise OSError(self.err, "injected target failure")
        await super().write(offset, data, fua=fua)


class ClosableStore(MemoryStore):
    """Reads fail with EBADF once ``closed``, as a closed file's do."""

    closed = False

    async def read(self, offset: int, buf: memoryview, *, sparse: bool = False) -> list[Segment]:
        if self.closed:
            raise OSError(errno.EBADF, "closed")
        return await super().read(offset, buf, sparse=sparse)


class NowaitStore(MemoryStore):
    """A memory store with the synchronous fast paths (``read_nowait`` only
    with ``nowait_reads``, so that a source without it can be modelled)."""

    def __init__(self, name: str, size: int, *, nowait_reads: bool = True) -> None:
        super().__init__(name, size)
        self.nowait_reads = nowait_reads

    def read_nowait(self, offset: int, buf: memoryview, *, sparse: bool = False) -> list[Segment] | None:
        if not self.nowait_reads:
            return None
        buf[:] = self.data[offset : offset + len(buf)]
        return [Segment(0, len(buf), False)]

    def write_nowait(self, offset: int, data: memoryview) -> bool:
        self.data[offset : offset + len(data)] = data
        return True


def nowait_source(seed: int) -> tuple[bytes, NowaitStore]:
    """A fast-path source of SIZE noise bytes: (its initial contents, the store)."""
    old = noise(SIZE, seed)
    src = NowaitStore("src", SIZE)
    src.data[:] = old
    return old, src


class Jitter(Layer):
    """Yields a random number of times before and after each request."""

    def __init__(self, child: BlockNode, rng: random.Random) -> None:
        super().__init__("jitter", child)
        self.rng = rng

    async def _jit(self) -> None:
        for _ in range(self.rng.randrange(4)):
            await trio.lowlevel.checkpoint()

    async def read(self, offset: int, buf: memoryview, *, sparse: bool = False) -> list[Segment]:
        await self._jit()
        got = await super().read(offset, buf, sparse=sparse)
        await self._jit()
        return got

    async def write(self, offset: int, data: memoryview, *, fua: bool = False) -> None:
        await self._jit()
        await super().write(offset, data, fua=fua)
        await self._jit()

    async def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool, fua: bool = False, fast: bool = False
    ) -> None:
        await self._jit()
        await super().write_zeroes(offset, length, may_trim=may_trim, fua=fua, fast=fast)
        await self._jit()


# -- plain semantics ---------------------------------------------------------------------

async def test_snapshot_keeps_the_data_at_activation() -> None:
    old = noise(SIZE, 1)
    src = source_with(old)
    tgt = MemoryStore("tgt", SIZE)
    cbw = CopyBeforeWrite("cbw", src, tgt, cluster_size=C)
    model = bytearray(old)
    assert await snap(cbw) == old
    assert cbw.copied_bytes == 0 and not cbw.done.any()

    # unaligned, across three clusters (0, 1, 2)
    await cbw.write(4000, wrap(b"A" * 5000))
    model[4000:9000] = b"A" * 5000
    assert bytes(src.data) == model
    assert await snap(cbw) == old
    assert tgt.data[: 3 * C] == old[: 3 * C]
    assert cbw.copied_bytes == 3 * C
    assert cbw.done.tolist()[:4] == [True, True, True, False]

    # a second write to copied clusters copies nothing more
    await cbw.write(100, wrap(b"B" * 50))
    model[100:150] = b"B" * 50
    assert cbw.copied_bytes == 3 * C
    assert await snap(cbw, 0, 3 * C) == old[: 3 * C]

    # write_zeroes inside cluster 4, fua and may_trim variants
    await cbw.write_zeroes(4 * C + 17, 100, may_trim=True, fua=True)
    model[4 * C + 17 : 4 * C + 117] = bytes(100)
    assert cbw.copied_bytes == 4 * C
    # trim of clusters 9..11 (MemoryStore keeps the bytes, but the copy is made)
    await cbw.trim(40000, 2 * C)
    assert cbw.done[9:12].all() and cbw.copied_bytes == 7 * C
    assert tgt.data[9 * C : 12 * C] == old[9 * C : 12 * C]
    # the partial last cluster: the copy is clipped to the size
    await cbw.write(SIZE - 10, wrap(b"Z" * 10), fua=True)
    model[SIZE - 10 :] = b"Z" * 10
    assert cbw.copied_bytes == 7 * C + 1000
    assert tgt.data[16 * C :] == old[16 * C :]

    assert bytes(src.data) == model
    assert await snap(cbw) == old
    # unaligned reads straddling copied and uncopied clusters
    for off, n in [(1, 1), (C - 1, 2), (2 * C + 5, 3 * C), (3 * C - 7, 9 * C), (SIZE - 1001, 1001)]:
        assert await snap(cbw, off, n) == old[off : off + n], (off, n)
    # target bytes of never-copied clusters were never written
    assert not any(tgt.data[5 * C : 9 * C])


async def test_never_written_clusters_are_read_from_the_source() -> None:
    old = noise(SIZE, 2)
    src = source_with(old)
    tgt = MemoryStore("tgt", SIZE)
    cbw = CopyBeforeWrite("cbw", src, tgt, cluster_size=C)
    await cbw.write(0, wrap(b"x" * C))
    # change the source behind the filter's back: uncopied clusters show it,
    # copied ones do not (proof of where each read comes from)
    src.data[:] = b"\xee" * SIZE
    got = await snap(cbw)
    assert got[:C] == old[:C]
    assert got[C:] == b"\xee" * (SIZE - C)


async def test_snapshot_view_is_read_only_and_reads_the_snapshot() -> None:
    old = noise(SIZE, 3)
    src = ZeroAware("src", SIZE)
    src.data[: 8 * C] = old[: 8 * C]  # clusters 8.. are zero in the source
    tgt = MemoryStore("tgt", SIZE)
    cbw = CopyBeforeWrite("cbw", src, tgt, cluster_size=C)
    view = SnapshotView("snap", cbw)
    assert view.read_only and view.size == SIZE
    await cbw.write(C, wrap(b"n" * 10))
    buf = bytearray(3 * C)
    segs = await view.read(0, memoryview(buf))
    assert bytes(buf) == old[: 3 * C]
    assert sum(s.length for s in segs) == 3 * C
    for call in (
        view.write(0, wrap(b"x")),
        view.write_zeroes(0, 1, may_trim=False),
        view.trim(0, C),
    ):
        with pytest.raises(OSError) as info:
            await call
        assert info.value.errno == errno.EROFS
    assert src.data[: 8 * C] == b"".join([old[:C], b"n" * 10, old[C + 10 : 8 * C]])
    await view.flush()
    # status: an uncopied zero region is a hole; a copied region is data
    status = await view.block_status(10 * C, 2 * C)
    assert status[0].flags & AllocationState.ZERO
    status = await view.block_status(0, 2 * C)
    assert not status[0].flags & AllocationState.ZERO


def test_bad_parameters_are_refused() -> None:
    src = MemoryStore("src", SIZE)
    with pytest.raises(ValueError):
        CopyBeforeWrite("cbw", src, MemoryStore("t", SIZE - 1))
    with pytest.raises(ValueError):
        CopyBeforeWrite("cbw", src, MemoryStore("t", SIZE), on_cbw_error="ignore")


async def test_range_locks() -> None:
    locks = RangeLocks()
    a = await locks.acquire(0, 3, exclusive=False)
    b = await locks.acquire(2, 5, exclusive=False)  # shared + shared: fine
    assert locks.busy(3, 3) and not locks.busy(6, 9)
    got: list[int] = []

    async def exclusive() -> None:
        got.append(await locks.acquire(5, 5, exclusive=True))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(exclusive)
        await trio.testing.wait_all_tasks_blocked()
        assert not got
        locks.release(a)
        await trio.testing.wait_all_tasks_blocked()
        assert not got  # b still overlaps cluster 5
        locks.release(b)
    assert len(got) == 1
    locks.release(got[0])
    assert not locks.busy(0, 100)


# -- forced interleavings ------------------------------------------------------------------

async def test_snapshot_read_racing_a_guest_write_never_sees_new_data() -> None:
    old = noise(SIZE, 4)
    src = source_with(old)
    blocker = Blocker(src)
    tgt = MemoryStore("tgt", SIZE)
    cbw = CopyBeforeWrite("cbw", blocker, tgt, cluster_size=C)
    h = blocker.hold("read", 2 * C)
    events: list[str] = []
    result: list[bytes] = []

    async def reader() -> None:
        result.append(await snap(cbw, 2 * C, C))
        events.append("read done")

    async def writer() -> None:
        await cbw.write(2 * C + 100, wrap(b"N" * 200))
        events.append("write done")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await h.entered.wait()  # the snapshot read is inside source.read
        nursery.start_soon(writer)
        await trio.testing.wait_all_tasks_blocked()
        assert events == []
        assert src.data[2 * C : 3 * C] == old[2 * C : 3 * C]  # the write has not passed
        assert not cbw.done[2]
        h.release.set()
    assert events == ["read done", "write done"]
    assert result == [old[2 * C : 3 * C]]
    assert src.data[2 * C + 100 : 2 * C + 300] == b"N" * 200
    assert await snap(cbw) == old


@pytest.mark.parametrize("where", ["copy-read", "copy-write", "source-write"])
async def test_guest_write_under_way_then_snapshot_read(where: str) -> None:
    """A guest write is parked at each step of its copy; a snapshot read arrives."""
    old = noise(SIZE, 5)
    src = source_with(old)
    below = Blocker(src, "below")
    tgt_store = MemoryStore("tgt", SIZE)
    tgt = Blocker(tgt_store, "tgt")
    cbw = CopyBeforeWrite("cbw", below, tgt, cluster_size=C)
    h = {
        "copy-read": lambda: below.hold("read", 3 * C),
        "copy-write": lambda: tgt.hold("write", 3 * C),
        "source-write": lambda: below.hold("write", 3 * C + 5),
    }[where]()
    result: list[bytes] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cbw.write, 3 * C + 5, wrap(b"W" * 2 * C))  # clusters 3, 4, 5
        await h.entered.wait()

        async def reader() -> None:
            result.append(await snap(cbw, 3 * C - 10, 3 * C + 20))

        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        h.release.set()
    assert result == [old[3 * C - 10 : 6 * C + 10]]
    assert src.data[3 * C + 5 : 5 * C + 5] == b"W" * 2 * C
    assert await snap(cbw) == old


async def test_status_racing_a_guest_zero_write_never_reports_old_data_as_zero() -> None:
    """``snapshot_status`` of an uncopied cluster asks the source; a guest
    write_zeroes that runs meanwhile must not make it report the snapshot's
    (non-zero) data as zero."""
    old = noise(SIZE, 6)
    src = ZeroAware("src", SIZE)
    src.data[:] = old
    blocker = Blocker(src)
    cbw = CopyBeforeWrite("cbw", blocker, MemoryStore("tgt", SIZE), cluster_size=C)
    h = blocker.hold("status", C)
    status: list[list[Extent]] = []

    async def ask() -> None:
        status.append(await cbw.snapshot_status(C, C))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask)
        await h.entered.wait()
        nursery.start_soon(partial(cbw.write_zeroes, C, C, may_trim=True))
        await trio.testing.wait_all_tasks_blocked()  # the zeroing done, or waiting for the status
        h.release.set()
    assert await snap(cbw, C, C) == old[C : 2 * C]  # the snapshot's data is not zero...
    assert not status[0][0].flags & AllocationState.ZERO  # ...so its status must not say so


STRIPE = 3001  # four writers own interleaved, unaligned byte stripes: clusters are shared


async def test_random_concurrent_writers_and_snapshot_readers() -> None:
    for seed in range(20):
        rng = random.Random(seed)
        old = noise(SIZE, 100 + seed)
        src = NowaitStore("src", SIZE, nowait_reads=seed % 3 != 0)  # fast-path copies or not
        src.data[:] = old
        tgt = NowaitStore("tgt", SIZE)
        cbw = CopyBeforeWrite("cbw", Jitter(src, rng), Jitter(tgt, rng), cluster_size=C)
        model = bytearray(old)
        bad: list[tuple[int, int]] = []

        async def writer(w: int, rng: random.Random = rng, model: bytearray = model,
                         cbw: CopyBeforeWrite = cbw) -> None:
            mine = [s for s in range(w * STRIPE, SIZE, 4 * STRIPE)]
            for _ in range(25):
                start = rng.choice(mine)
                end = min(start + STRIPE, SIZE)
                a = rng.randrange(start, end)
                b = rng.randrange(a, end) + 1
                kind = rng.randrange(3)
                if kind == 0:
                    data = rng.randbytes(b - a)
                    model[a:b] = data
                    if not (rng.random() < 0.5 and cbw.write_nowait(a, wrap(data))):
                        await cbw.write(a, wrap(data))
                elif kind == 1:
                    model[a:b] = bytes(b - a)
                    await cbw.write_zeroes(a, b - a, may_trim=rng.random() < 0.5)
                else:
                    await cbw.trim(a, b - a)

        async def reader(cbw: CopyBeforeWrite = cbw, old: bytes = old, rng: random.Random = rng,
                         bad: list[tuple[int, int]] = bad) -> None:
            for _ in range(40):
                off = rng.randrange(SIZE)
                n = rng.randrange(1, min(3 * C, SIZE - off) + 1)
                if await snap(cbw, off, n) != old[off : off + n]:
                    bad.append((off, n))

        async with trio.open_nursery() as nursery:
            for w in range(4):
                nursery.start_soon(writer, w)
            for _ in range(2):
                nursery.start_soon(reader)
        assert not bad, (seed, bad)
        assert bytes(src.data) == model, seed
        assert await snap(cbw) == old, seed
        for i in range(len(cbw.done)):
            if cbw.done[i]:
                assert tgt.data[i * C : (i + 1) * C] == old[i * C : (i + 1) * C]


# -- requests already below the insertion point -----------------------------------------

class PreSetup:
    """tracking -> blocker -> source with one write W parked below tracking,
    then the filter inserted the way ``Daemon.create_snapshot`` does it."""

    def __init__(self, nursery: trio.Nursery, w_offset: int, w_data: bytes, *,
                 nowait_target: bool = False) -> None:
        self.old, self.src = nowait_source(7)
        self.blocker = Blocker(self.src)
        self.tracking = DirtyTracking("live", self.blocker)
        self.w_offset = w_offset
        self.w_data = w_data
        self.w_hold = self.blocker.hold("write", w_offset)
        self.w_done = trio.Event()
        nursery.start_soon(self._w)
        self.tgt = NowaitStore("tgt", SIZE) if nowait_target else MemoryStore("tgt", SIZE)
        self.cbw: CopyBeforeWrite | None = None

    async def _w(self) -> None:
        await self.tracking.write(self.w_offset, wrap(self.w_data))
        self.w_done.set()

    async def activate(self) -> CopyBeforeWrite:
        await self.w_hold.entered.wait()
        assert [(s, e) for s, e, _ in self.tracking.in_flight()] == [
            (self.w_offset, self.w_offset + len(self.w_data))
        ]
        cbw = CopyBeforeWrite("cbw", self.tracking.child, self.tgt, cluster_size=C,
                              pre_inflight=self.tracking.in_flight())
        self.tracking.child = cbw
        self.cbw = cbw
        return cbw

    def expected(self) -> bytes:
        """The snapshot: the image with W whole (W counts as before it)."""
        img = bytearray(self.old)
        img[self.w_offset : self.w_offset + len(self.w_data)] = self.w_data
        return bytes(img)


async def test_pre_inflight_write_is_seen_whole_by_a_snapshot_read() -> None:
    w_off, w_data = C - 100, b"P" * 200  # clusters 0 and 1
    result: list[bytes] = []
    async with trio.open_nursery() as nursery:
        pre = PreSetup(nursery, w_off, w_data)
        cbw = await pre.activate()

        async def reader() -> None:
            result.append(await snap(cbw, 0, 3 * C))

        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert not result  # waits for W
        pre.w_hold.release.set()
    assert result == [pre.expected()[: 3 * C]]
    assert await snap(cbw) == pre.expected()


@pytest.mark.parametrize(
    ("g_offset", "g_len"),
    [
        pytest.param(C - 50, 10, id="guest-write-inside-W"),
        pytest.param(C - 300, 4 * C, id="guest-write-covering-W"),
        pytest.param(10, 10, id="guest-write-same-cluster-other-bytes"),
        pytest.param(2 * C - 10, 20, id="guest-write-cluster-1-other-bytes"),
    ],
)
async def test_pre_inflight_write_is_captured_whole_by_a_later_copy(g_offset: int, g_len: int) -> None:
    """A guest write after the snapshot instant, while W (from before it) is
    still under way below: its copy must wait for W, so the snapshot holds W
    whole, never torn, never without it."""
    w_off, w_data = C - 100, b"P" * 200  # clusters 0 and 1
    g_data = b"G" * g_len
    async with trio.open_nursery() as nursery:
        pre = PreSetup(nursery, w_off, w_data)
        cbw = await pre.activate()
        g_done = trio.Event()

        async def guest() -> None:
            assert pre.tracking.child is cbw
            await pre.tracking.write(g_offset, wrap(g_data))
            g_done.set()

        nursery.start_soon(guest)
        await trio.testing.wait_all_tasks_blocked()
        pre.w_hold.release.set()
        await g_done.wait()
    assert pre.w_done.is_set()
    expected = pre.expected()
    got = await snap(cbw)
    assert got[w_off : w_off + len(w_data)] == w_data, "the snapshot lost or tore the in-flight write"
    assert got == expected
    live = bytearray(expected)
    live[g_offset : g_offset + g_len] = g_data  # where G overlaps W, G came later: it wins
    assert bytes(pre.src.data) == bytes(live)


async def test_pre_inflight_blocks_fast_path_copies() -> None:
    """While W (from before the snapshot) is under way, a fast-path write that
    needs a copy is refused (its copy would have to wait for W, wherever W is);
    one to an already copied cluster needs no copy and may pass."""
    async with trio.open_nursery() as nursery:
        pre = PreSetup(nursery, 5 * C, b"P" * 10, nowait_target=True)
        cbw = await pre.activate()
        await cbw.write(9 * C, wrap(b"c"))  # cluster 9 copied (W is elsewhere)
        assert cbw.write_nowait(10 * C, wrap(b"x")) is False  # needs a copy: refused
        assert cbw.write_nowait(5 * C, wrap(b"x")) is False  # W's own cluster: refused
        assert not cbw.done[10] and not cbw.done[5]
        assert cbw.write_nowait(9 * C + 1, wrap(b"y")) is True  # copied already
        pre.w_hold.release.set()
    assert cbw.write_nowait(10 * C, wrap(b"x")) is True  # W done: copied in the fast path
    assert cbw.done[10] and pre.tgt.data[10 * C : 11 * C] == pre.old[10 * C : 11 * C]
    assert await snap(cbw) == pre.expected()


# -- on-cbw-error ------------------------------------------------------------------------

@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
async def test_break_guest_write_fails_the_write_and_keeps_the_snapshot(err: int) -> None:
    old = noise(SIZE, 8)
    src = source_with(old)
    tgt_store = MemoryStore("tgt", SIZE)
    tgt = FaultyTarget(tgt_store, err)
    tgt.failing = False
    cbw = CopyBeforeWrite("cbw", src, tgt, cluster_size=C, on_cbw_error=BREAK_GUEST_WRITE)
    await cbw.write(0, wrap(b"1" * 10))  # cluster 0 copied while the target works
    tgt.failing = True
    calls: list[Callable[[], Awaitable[None]]] = [
        lambda: cbw.write(2 * C + 1, wrap(b"2" * 3 * C)),
        lambda: cbw.write_zeroes(7 * C, 10, may_trim=False),
        lambda: cbw.trim(9 * C, C),
    ]
    for call in calls:
        with pytest.raises(OSError) as info:
            await call()
        assert info.value.errno == err
    assert src.data[C:] == old[C:]  # nothing of the failed writes reached the source
    assert cbw.broken is None
    assert not cbw.locks.busy(0, 100)  # failed writes released their locks
    model = bytearray(old)
    model[:10] = b"1" * 10
    assert bytes(src.data) == model
    assert await snap(cbw) == old
    # writes to already copied clusters need no copy: they go on
    await cbw.write(5, wrap(b"3"))
    model[5:6] = b"3"
    # the target recovers: the same write now succeeds
    tgt.failing = False
    await cbw.write(2 * C + 1, wrap(b"2" * 3 * C))
    model[2 * C + 1 : 5 * C + 1] = b"2" * 3 * C
    assert bytes(src.data) == model
    assert await snap(cbw) == old


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
async def test_break_snapshot_lets_writes_go_and_fails_every_snapshot_read(err: int) -> None:
    old = noise(SIZE, 9)
    src = source_with(old)
    tgt_store = MemoryStore("tgt", SIZE)
    tgt = FaultyTarget(tgt_store, err)
    tgt.failing = False
    cbw = CopyBeforeWrite("cbw", src, tgt, cluster_size=C, on_cbw_error=BREAK_SNAPSHOT)
    view = SnapshotView("snap", cbw)
    await cbw.write(0, wrap(b"1" * 10))
    assert await snap(cbw, 0, C) == old[:C]
    tgt.failing = True
    model = bytearray(old)
    model[:10] = b"1" * 10
    await cbw.write(3 * C, wrap(b"4" * 10))  # the copy fails: the write goes on
    model[3 * C : 3 * C + 10] = b"4" * 10
    assert cbw.broken is not None
    await cbw.write_zeroes(6 * C, 10, may_trim=True)
    model[6 * C : 6 * C + 10] = bytes(10)
    await cbw.trim(8 * C, C)
    tgt.failing = False  # sticky: recovery does not unbreak it
    await cbw.write(10 * C, wrap(b"5" * 10))
    model[10 * C : 10 * C + 10] = b"5" * 10
    assert bytes(src.data) == model
    assert not cbw.locks.busy(0, 100)

    async def snapshot_read() -> None:
        await snap(cbw, 0, C)

    async def view_read() -> None:
        await view.read(12 * C, memoryview(bytearray(10)))

    async def view_status() -> None:
        await view.block_status(0, C)

    for _ in range(2):
        for call in (snapshot_read, view_read, view_status):
            with pytest.raises(OSError) as info:
                await call()
            assert info.value.errno == errno.EIO


async def test_break_snapshot_during_a_snapshot_read_fails_that_read() -> None:
    """A read that started before the break and spans both kinds of clusters."""
    old = noise(SIZE, 10)
    src = source_with(old)
    blocker = Blocker(src)
    tgt = FaultyTarget(MemoryStore("tgt", SIZE))
    cbw = CopyBeforeWrite("cbw", blocker, tgt, cluster_size=C, on_cbw_error=BREAK_SNAPSHOT)
    h = blocker.hold("read", 0)
    failed: list[int | None] = []

    async def reader() -> None:
        try:
            await snap(cbw, 0, C)
        except OSError as exc:
            failed.append(exc.errno)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await h.entered.wait()
        await cbw.write(5 * C, wrap(b"x"))  # other cluster: no lock conflict; the copy fails
        assert cbw.broken is not None
        h.release.set()
    assert failed == [errno.EIO]


# -- the synchronous fast path -----------------------------------------------------------

async def test_write_nowait_never_bypasses_a_needed_copy() -> None:
    old, src = nowait_source(11)
    tgt = MemoryStore("tgt", SIZE)
    cbw = CopyBeforeWrite("cbw", src, tgt, cluster_size=C)
    assert cbw.write_nowait(C + 1, wrap(b"x" * 10)) is False  # uncopied
    assert bytes(src.data) == old and cbw.copied_bytes == 0
    await cbw.write(C, wrap(b"y"))
    assert cbw.write_nowait(C + 1, wrap(b"x" * 10)) is True  # copied: fast path allowed
    assert src.data[C : C + 11] == b"y" + b"x" * 10
    assert cbw.write_nowait(2 * C - 5, wrap(b"z" * 10)) is False  # spans an uncopied cluster
    assert src.data[2 * C - 5 : 2 * C + 5] == old[2 * C - 5 : 2 * C + 5]
    assert await snap(cbw) == old

    # a snapshot read in progress on the cluster: no fast path either
    blocker_src = NowaitStore("src2", SIZE)
    blocker_src.data[:] = old
    blocker = Blocker(blocker_src)
    cbw2 = CopyBeforeWrite("cbw2", blocker, MemoryStore("t2", SIZE), cluster_size=C)
    assert cbw2.write_nowait(0, wrap(b"q")) is False
    h = blocker.hold("read", 4 * C)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(snap, cbw2, 4 * C, C)
        await h.entered.wait()
        assert cbw2.write_nowait(4 * C, wrap(b"q")) is False
        h.release.set()

    # a child without the fast path: always False
    plain = CopyBeforeWrite("cbw3", source_with(old), MemoryStore("t3", SIZE), cluster_size=C)
    await plain.write(0, wrap(b"y"))
    assert plain.write_nowait(1, wrap(b"x")) is False


async def test_write_nowait_through_tracking_marks_and_respects_copies() -> None:
    from nbdfleece.bitmap import DirtyBitmap

    old, src = nowait_source(12)
    tracking = DirtyTracking("live", src)
    cbw = CopyBeforeWrite("cbw", tracking.child, MemoryStore("t", SIZE), cluster_size=C,
                          pre_inflight=tracking.in_flight())
    tracking.child = cbw
    tracking.bitmaps["b"] = DirtyBitmap("b", SIZE, 512)
    assert tracking.write_nowait(0, wrap(b"x")) is False
    await tracking.write(0, wrap(b"x"))
    assert tracking.write_nowait(1, wrap(b"y")) is True
    assert await snap(cbw) == old
    assert src.data[:2] == b"xy"


# -- model-based -------------------------------------------------------------------------

Op = tuple[str, int, int, int]


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[int, int, list[Op]]:
    cluster = draw(st.sampled_from([512, 4096, 65536]))
    size = draw(st.integers(1, 6)) * cluster + draw(st.sampled_from([0, 1, 511, cluster // 2]))
    size = max(size, 1)
    ops: list[Op] = []
    n = draw(st.integers(0, 30))
    for _ in range(n):
        kind = draw(st.sampled_from(["write", "zero", "trim", "read", "read"]))
        off = draw(st.integers(0, size - 1))
        length = draw(st.integers(1, min(size - off, 3 * cluster)))
        ops.append((kind, off, length, draw(st.integers(0, 255))))
    return cluster, size, ops


@settings(max_examples=150, deadline=None)
@given(scenarios(), st.integers(0, 2**32 - 1))
def test_model(scenario: tuple[int, int, list[Op]], seed: int) -> None:
    cluster, size, ops = scenario

    async def main() -> None:
        old = noise(size, seed)
        rng = random.Random(seed)
        src = NowaitStore("src", size, nowait_reads=rng.random() < 0.7)
        src.data[:] = old
        tgt = NowaitStore("tgt", size) if rng.random() < 0.7 else MemoryStore("tgt", size)
        cbw = CopyBeforeWrite("cbw", src, tgt, cluster_size=cluster)
        model = bytearray(old)
        touched: set[int] = set()
        for kind, off, n, byte in ops:
            if kind == "read":
                assert await snap(cbw, off, n) == old[off : off + n]
                continue
            if kind == "write":
                model[off : off + n] = bytes([byte]) * n
                if not (byte & 2 and cbw.write_nowait(off, wrap(bytes([byte]) * n))):
                    await cbw.write(off, wrap(bytes([byte]) * n))
            elif kind == "zero":
                model[off : off + n] = bytes(n)
                await cbw.write_zeroes(off, n, may_trim=bool(byte & 1))
            else:
                await cbw.trim(off, n)  # MemoryStore keeps the bytes
            touched.update(range(off // cluster, (off + n - 1) // cluster + 1))
            assert bytes(src.data) == model
        assert await snap(cbw) == old
        assert bytes(src.data) == model
        assert set(cbw.done.nonzero()[0].tolist()) == touched
        assert cbw.copied_bytes == sum(min((i + 1) * cluster, size) - i * cluster for i in touched)
        for i in touched:
            lo, hi = i * cluster, min((i + 1) * cluster, size)
            assert tgt.data[lo:hi] == old[lo:hi]

    trio.run(main)


# -- fast-path copies ----------------------------------------------------------------------

async def test_fast_path_copies_runs_of_pending_clusters() -> None:
    old, src = nowait_source(20)
    tgt = NowaitStore("tgt", SIZE)
    cbw = CopyBeforeWrite("cbw", src, tgt, cluster_size=C)
    await cbw.write(3 * C, wrap(b"a"))  # cluster 3 copied by the async path
    # clusters 1..5 minus 3: two runs copied, the copied cluster left alone
    assert cbw.write_nowait(C + 7, wrap(b"F" * (4 * C))) is True
    assert cbw.done[1:6].all() and not cbw.done[0] and not cbw.done[6]
    assert cbw.copied_bytes == 5 * C
    assert tgt.data[C : 6 * C] == old[C : 6 * C]
    assert src.data[C + 7 : 5 * C + 7] == b"F" * (4 * C)
    # the partial last cluster
    assert cbw.write_nowait(SIZE - 3, wrap(b"end")) is True
    assert tgt.data[16 * C :] == old[16 * C :] and cbw.copied_bytes == 5 * C + 1000
    assert await snap(cbw) == old


class BrokenNowaitTarget(NowaitStore):
    """Its fast path fails the way a disk can, its slow path by ``failing``."""

    def __init__(self, name: str, size: int) -> None:
        super().__init__(name, size)
        self.failing = True

    def write_nowait(self, offset: int, data: memoryview) -> bool:
        raise OSError(errno.ENOSPC, "no space (fast path)")

    async def write(self, offset: int, data: memoryview, *, fua: bool = False) -> None:
        if self.failing:
            raise OSError(errno.ENOSPC, "no space")
        await super().write(offset, data, fua=fua)


async def test_a_failed_fast_path_copy_is_redone_and_reported_by_the_async_path() -> None:
    old, src = nowait_source(21)
    tgt = BrokenNowaitTarget("tgt", SIZE)
    cbw = CopyBeforeWrite("cbw", src, tgt, cluster_size=C)
    assert cbw.write_nowait(0, wrap(b"x")) is False  # the error is not swallowed...
    assert not cbw.done.any() and bytes(src.data) == old
    with pytest.raises(OSError) as info:  # ...the async path reports it
        await cbw.write(0, wrap(b"x"))
    assert info.value.errno == errno.ENOSPC and cbw.copy_op == "write"
    tgt.failing = False
    await cbw.write(0, wrap(b"x"))
    assert await snap(cbw) == old


async def test_a_source_read_failure_is_reported_as_read() -> None:
    class FailingReads(MemoryStore):
        async def read(self, offset: int, buf: memoryview, *, sparse: bool = False) -> list[Segment]:
            raise OSError(errno.EIO, "bad sector")

    cbw = CopyBeforeWrite("cbw", FailingReads("src", SIZE), MemoryStore("t", SIZE), cluster_size=C)
    with pytest.raises(OSError):
        await cbw.write(0, wrap(b"x"))
    assert cbw.copy_op == "read"


# -- the bitmap option -----------------------------------------------------------------------

async def test_bitmap_limits_copies_and_snapshot_access() -> None:
    """QEMU 7.0+ ``bitmap``: only its clusters are copied and readable; other
    snapshot reads and status fail (EACCES in QEMU, NBD_EINVAL on the wire)."""
    from nbdfleece.bitmap import DirtyBitmap
    from nbdfleece.errors import RequestError

    old, src = nowait_source(22)
    tgt = NowaitStore("tgt", SIZE)
    bitmap = DirtyBitmap("b", SIZE, 512, recording=False)
    bitmap.mark(2 * C + 100, 1)  # cluster 2
    bitmap.mark(6 * C - 1, 2)  # clusters 5 and 6 (granules straddle nothing else)
    bitmap.mark(SIZE - 1, 1)  # the partial last cluster
    cbw = CopyBeforeWrite("cbw", src, tgt, cluster_size=C, bitmap=bitmap)
    assert cbw.pending.nonzero()[0].tolist() == [2, 5, 6, 16]
    bitmap.clear()  # later changes of the user's bitmap do not matter
    # writes outside the bitmap are not copied, even through the async path
    await cbw.write(0, wrap(b"o" * (2 * C)))
    assert cbw.write_nowait(8 * C, wrap(b"o")) is True
    assert cbw.copied_bytes == 0 and not tgt.data.strip(b"\0")
    # inside it, old data is kept
    await cbw.write(2 * C, wrap(b"i" * (5 * C)))  # clusters 2..6: copies 2, 5 and 6 only
    assert cbw.done.nonzero()[0].tolist() == [2, 5, 6] and cbw.copied_bytes == 3 * C
    for off, n in [(2 * C, C), (5 * C + 3, 2 * C - 3), (16 * C, 1000)]:
        assert await snap(cbw, off, n) == old[off : off + n]
    for off, n in [(0, 1), (3 * C, 1), (2 * C, 2 * C), (4 * C, 3 * C), (SIZE - 1001, 2)]:
        with pytest.raises(RequestError) as info:
            await snap(cbw, off, n)
        assert info.value.errno == Errno.EINVAL
        with pytest.raises(RequestError):
            await cbw.snapshot_status(off, n)
    assert (await cbw.snapshot_status(5 * C, 2 * C))[0].length == 2 * C


class TrimLog(Layer):
    """Records the trims that reach the target."""

    def __init__(self, child: BlockNode) -> None:
        super().__init__("trimlog", child)
        self.trims: list[tuple[int, int]] = []

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        self.trims.append((offset, length))
        await self.child.trim(offset, length, fua=fua)


async def test_snapshot_discard_drops_whole_clusters_from_the_snapshot() -> None:
    """QEMU's snapshot discard: aligned inward; those clusters are no longer
    readable, no longer copied before guest writes, and their copies are
    discarded in the target; the rest of the snapshot is untouched."""
    from nbdfleece.errors import RequestError

    old, src = nowait_source(23)
    tgt = TrimLog(NowaitStore("tgt", SIZE))
    cbw = CopyBeforeWrite("cbw", src, tgt, cluster_size=C)
    await cbw.write(C, wrap(b"a" * (3 * C)))  # clusters 1..3 copied
    before = cbw.copied_bytes
    await cbw.snapshot_discard(C + 1, 3 * C)  # only clusters 2 and 3 are whole inside
    assert tgt.trims == [(2 * C, 2 * C)]
    assert cbw.done.nonzero()[0].tolist() == [1]
    for off, n in [(2 * C, 1), (3 * C + 5, 10), (C, 2 * C)]:
        with pytest.raises(RequestError) as info:
            await snap(cbw, off, n)
        assert info.value.errno == Errno.EINVAL
        with pytest.raises(RequestError):
            await cbw.snapshot_status(off, n)
    assert await snap(cbw, C, C) == old[C : 2 * C]  # cluster 1: still the snapshot's
    assert await snap(cbw, 4 * C, 3 * C) == old[4 * C : 7 * C]
    # guest writes to discarded, never-copied clusters copy nothing
    await cbw.snapshot_discard(8 * C, 2 * C)
    assert tgt.trims == [(2 * C, 2 * C)]  # nothing had been copied there
    assert cbw.write_nowait(8 * C, wrap(b"z" * (2 * C)))
    assert cbw.copied_bytes == before
    # a range holding no whole cluster changes nothing (QEMU 7.2 aborts there)
    await cbw.snapshot_discard(5 * C + 1, C - 2)
    await cbw.snapshot_discard(11 * C, 0)
    assert await snap(cbw, 4 * C, 3 * C) == old[4 * C : 7 * C]
    # reaching the end of the disk takes the partial last cluster too
    await cbw.snapshot_discard(15 * C, SIZE - 15 * C)
    with pytest.raises(RequestError):
        await snap(cbw, SIZE - 1, 1)
    assert bytes(src.data[4 * C : 8 * C]) == old[4 * C : 8 * C]  # the source: never touched


async def test_snapshot_discard_waits_for_a_read_of_its_clusters() -> None:
    old, src = nowait_source(24)
    blocker = Blocker(src)
    cbw = CopyBeforeWrite("cbw", blocker, NowaitStore("tgt", SIZE), cluster_size=C)
    h = blocker.hold("read", 3 * C)
    got: list[bytes] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: _collect(got, snap(cbw, 3 * C, C)))
        await h.entered.wait()
        nursery.start_soon(cbw.snapshot_discard, 3 * C, C)
        await trio.testing.wait_all_tasks_blocked()
        assert cbw.access is None or cbw.access[3]  # not yet: the read holds the cluster
        h.release.set()
    assert got == [old[3 * C : 4 * C]] and cbw.access is not None and not cbw.access[3]


async def _collect(out: list[bytes], read: Awaitable[bytes]) -> None:
    out.append(await read)


async def test_snapshot_access_view_takes_discards_and_refuses_writes() -> None:
    from nbdfleece.errors import RequestError

    old, src = nowait_source(25)
    cbw = CopyBeforeWrite("cbw", src, NowaitStore("tgt", SIZE), cluster_size=C)
    ignoring = SnapshotView("snap", cbw, access=True)  # QEMU's default discard=ignore
    assert not ignoring.read_only
    await ignoring.trim(0, 4 * C)
    assert await snap(cbw, 0, 4 * C) == old[: 4 * C]
    view = SnapshotView("snap", cbw, access=True, discard=True)
    await view.trim(0, 2 * C)
    with pytest.raises(RequestError):
        await view.read(0, memoryview(bytearray(1)))
    for call in (view.write(4 * C, wrap(b"x")), view.write_zeroes(4 * C, 1, may_trim=True)):
        with pytest.raises(OSError) as info:
            await call
        assert info.value.errno == errno.ENOTSUP
    plain = SnapshotView("view", cbw)
    assert plain.read_only
    with pytest.raises(OSError) as info:
        await plain.trim(4 * C, C)
    assert info.value.errno == errno.EROFS
    cbw.broken = OSError(errno.EIO, "x")
    with pytest.raises(OSError) as info:
        await view.trim(6 * C, C)
    assert info.value.errno == errno.EIO


async def test_bitmap_granularity_coarser_than_the_cluster_and_bad_sizes() -> None:
    from nbdfleece.bitmap import DirtyBitmap

    src = MemoryStore("src", SIZE)
    coarse = DirtyBitmap("b", SIZE, 4 * C, recording=False)
    coarse.mark(5 * C, 1)  # granule 1 = clusters 4..7
    cbw = CopyBeforeWrite("cbw", src, MemoryStore("t", SIZE), cluster_size=C, bitmap=coarse)
    assert cbw.pending.nonzero()[0].tolist() == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="incompatible"):
        CopyBeforeWrite("cbw", src, MemoryStore("t", SIZE), cluster_size=C,
                        bitmap=DirtyBitmap("b", SIZE - 1))


# -- cbw-timeout -------------------------------------------------------------------------------
# The clock is trio's autojump MockClock: virtual seconds pass as soon as every
# task waits, so these tests take no real time and assert no real durations.

def slow_target(size: int, delay: float) -> tuple[MemoryStore, BlockNode]:
    from nbdfleece.block.faults import FaultInjector, FaultSpec

    store = MemoryStore("tgt", size)
    return store, FaultInjector("slow", store, [FaultSpec(ops=frozenset({"write"}), error=None,
                                                           delay=delay)])


async def test_cbw_timeout_breaks_the_guest_write_and_the_copy_finishes_later(
        autojump_clock: trio.testing.MockClock) -> None:
    old = noise(SIZE, 23)
    src = source_with(old)
    store, slow = slow_target(SIZE, 5.0)
    cbw = CopyBeforeWrite("cbw", src, slow, cluster_size=C, cbw_timeout=1.0)
    start = trio.current_time()
    with pytest.raises(OSError) as info:
        await cbw.write(C + 1, wrap(b"x"))
    assert info.value.errno == errno.ETIMEDOUT
    assert trio.current_time() - start == pytest.approx(1.0)
    assert bytes(src.data) == old and not cbw.done[1]  # the guest write did not pass
    # a second write to the cluster waits for the same copy: it times out too
    with pytest.raises(OSError) as info:
        await cbw.write(C + 2, wrap(b"y"))
    assert info.value.errno == errno.ETIMEDOUT
    # the copy goes on in the background, then the cluster counts as copied
    await trio.sleep(10)
    assert cbw.done[1] and store.data[C : 2 * C] == old[C : 2 * C] and len(cbw.locks) == 0
    await cbw.write(C + 1, wrap(b"x"))  # nothing left to copy: no delay
    assert src.data[C + 1] == ord("x")
    assert await snap(cbw) == old


async def test_cbw_timeout_not_reached(autojump_clock: trio.testing.MockClock) -> None:
    old = noise(SIZE, 24)
    src = source_with(old)
    store, slow = slow_target(SIZE, 0.5)
    cbw = CopyBeforeWrite("cbw", src, slow, cluster_size=C, cbw_timeout=1.0)
    await cbw.write(0, wrap(b"x" * (3 * C)))
    assert cbw.done[:3].all() and store.data[: 3 * C] == old[: 3 * C]
    assert len(cbw.locks) == 0
    assert await snap(cbw) == old


async def test_cbw_timeout_with_break_snapshot(autojump_clock: trio.testing.MockClock) -> None:
    old = noise(SIZE, 25)
    src = source_with(old)
    _, slow = slow_target(SIZE, 5.0)
    cbw = CopyBeforeWrite("cbw", src, slow, cluster_size=C, cbw_timeout=1.0,
                          on_cbw_error=BREAK_SNAPSHOT)
    await cbw.write(0, wrap(b"x"))  # goes through: the snapshot breaks instead
    assert src.data[0] == ord("x")
    assert cbw.broken is not None and cbw.broken.errno == errno.ETIMEDOUT
    with pytest.raises(OSError) as info:
        await snap(cbw, 0, 1)
    assert info.value.errno == errno.EIO
    start = trio.current_time()
    await cbw.write(0, wrap(b"y"))  # a broken snapshot copies nothing: no waiting
    await cbw.write(8 * C, wrap(b"z"))
    assert trio.current_time() == start
    await trio.sleep(10)
    assert len(cbw.locks) == 0


async def test_a_cancelled_guest_write_leaves_the_lock_to_the_copy(
        autojump_clock: trio.testing.MockClock) -> None:
    old = noise(SIZE, 26)
    src = source_with(old)
    store, slow = slow_target(SIZE, 5.0)
    cbw = CopyBeforeWrite("cbw", src, slow, cluster_size=C, cbw_timeout=60.0)
    with trio.move_on_after(1.0):  # the client went away
        await cbw.write(0, wrap(b"x"))
    assert len(cbw.locks) == 1  # held by the copy still under way
    await trio.sleep(10)
    assert len(cbw.locks) == 0 and cbw.done[0] and store.data[:C] == old[:C]
    assert bytes(src.data) == old


# -- file-to-file copies (copy_file_range) -----------------------------------------------

def _folders() -> list[str]:
    """An ordinary folder and, where there is one, a memory-backed one."""
    import tempfile

    out = [tempfile.gettempdir()]
    if os.path.isdir("/dev/shm"):
        out.append("/dev/shm")
    return out


def _image(folder: str, name: str, size: int, chunks: dict[int, bytes], fill: bytes = b"") -> str:
    path = os.path.join(folder, name)
    with open(path, "wb") as f:
        if fill:
            f.write(fill * (size // len(fill)))
        f.truncate(size)
        for offset, chunk in chunks.items():
            f.seek(offset)
            f.write(chunk)
    return path


@pytest.mark.parametrize("pair", ["same-folder", "across-filesystems"])
async def test_file_copies_holes_as_zeroes(tmp_path: Any, pair: str) -> None:
    """copy_file_range (or the pread/pwrite fallback across filesystems) over a
    sparse source: holes land as zeroes over whatever the target held."""
    from nbdfleece.block.file import FileStore, memory_backed

    folders = _folders()
    if pair == "across-filesystems" and len(folders) < 2:
        pytest.skip("needs a memory-backed folder next to an ordinary one")
    size = 1 << 20
    data = {0: noise(5000, 1), 300_000: noise(70_000, 2), size - 10: b"T" * 10}
    with contextlib.ExitStack() as stack:
        src_dir = stack.enter_context(tempfile_dir(folders[-1]))
        dst_dir = src_dir if pair == "same-folder" else stack.enter_context(tempfile_dir(folders[0]))
        src_path = _image(src_dir, "src.raw", size, data)
        dst_path = _image(dst_dir, "dst.raw", size, {}, fill=b"\xff")
        src, dst = FileStore("src", src_path), FileStore("dst", dst_path)
        try:
            inline = memory_backed(src.fileno()) and memory_backed(dst.fileno())
            # the fast path copies only between two memory-backed files
            assert src.copy_to_nowait(dst, 0, 4096) is inline
            await src.copy_to(dst, 0, size)
            expected = bytearray(size)
            for offset, chunk in data.items():
                expected[offset : offset + len(chunk)] = chunk
            with open(dst_path, "rb") as f:
                assert f.read() == bytes(expected)
            if pair == "across-filesystems":
                assert dst.fileno() in src._no_copy_range  # EXDEV remembered
        finally:
            src.close_sync()
            dst.close_sync()


async def test_file_copy_failures_say_which_side(tmp_path: Any) -> None:
    from nbdfleece.block.file import FileStore, copy_side

    src_path = _image(str(tmp_path), "src.raw", 1 << 16, {0: b"x" * 100})
    dst_path = _image(str(tmp_path), "dst.raw", 1 << 16, {})
    src, dst = FileStore("src", src_path), FileStore("dst", dst_path, read_only=True)
    try:
        with pytest.raises(OSError) as info:
            await src.copy_to(dst, 0, 1 << 16)
        assert copy_side(info.value) == "write"
        with pytest.raises(OSError) as info:  # past the end of the source
            await dst.copy_to(src, 0, 1 << 17)
        assert copy_side(info.value) == "read" and info.value.errno == errno.EIO
    finally:
        src.close_sync()
        dst.close_sync()


async def test_closing_a_file_store_waits_for_its_worker_calls(tmp_path: Any) -> None:
    """A descriptor is never closed under a worker call still using it: its
    number could meanwhile be reused by another file, which would then be written."""
    import threading

    from nbdfleece.block.file import FileStore

    path = tmp_path / "f.raw"
    path.write_bytes(bytes(C))
    store = FileStore("f", str(path))
    release = threading.Event()
    sizes: list[int] = []

    def slow(fd: int) -> None:
        release.wait(30)
        sizes.append(os.fstat(fd).st_size)  # EBADF if it had been closed

    closed = trio.Event()

    async def close() -> None:
        await store.close()
        closed.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(store._in_worker, (store,), slow, store.fileno()))
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(close)
        await trio.testing.wait_all_tasks_blocked()
        assert not closed.is_set()
        release.set()
    assert closed.is_set() and sizes == [C] and store.fileno() == -1


@pytest.mark.parametrize("folder", _folders())
async def test_cbw_between_two_files(folder: str) -> None:
    """The filter over real files: on tmpfs guest writes copy in the fast path,
    elsewhere through one worker job; either way the snapshot holds."""
    from nbdfleece.block.file import FileStore, memory_backed

    size = 40 * 65536 + 123
    old = noise(size, 27)
    with tempfile_dir(folder) as d:
        src = FileStore("src", _image(d, "live.raw", size, {0: old}))
        tgt = FileStore("tgt", _image(d, "overlay.raw", size, {}))
        try:
            cbw = CopyBeforeWrite("cbw", src, tgt)
            fast = cbw.write_nowait(65536 + 5, wrap(b"n" * 200_000))
            assert fast is memory_backed(src.fileno())
            if not fast:
                await cbw.write(65536 + 5, wrap(b"n" * 200_000))
            await cbw.write(size - 1, wrap(b"e"))
            assert cbw.done.nonzero()[0].tolist() == [1, 2, 3, 4, 40]
            assert await snap(cbw) == old
            buf = bytearray(size)
            await src.read(0, memoryview(buf))
            assert buf[65536 + 5 : 65536 + 200_005] == b"n" * 200_000 and buf[-1:] == b"e"
        finally:
            src.close_sync()
            tgt.close_sync()


@contextlib.contextmanager
def tempfile_dir(folder: str) -> Iterator[str]:
    import tempfile

    with tempfile.TemporaryDirectory(dir=folder, prefix="nbdfleece-test-") as d:
        yield d


async def test_drain_waits_for_copies_and_reads_under_way() -> None:
    old = noise(SIZE, 28)
    src = source_with(old)
    blocker = Blocker(MemoryStore("tgt", SIZE))
    cbw = CopyBeforeWrite("cbw", src, blocker, cluster_size=C)
    h = blocker.hold("write", 0)
    drained = trio.Event()

    async def drain() -> None:
        await cbw.drain()
        drained.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(cbw.write, 0, wrap(b"x"))
        await h.entered.wait()  # the copy is writing to the target
        nursery.start_soon(drain)
        await trio.testing.wait_all_tasks_blocked()
        assert not drained.is_set()
        h.release.set()
    assert drained.is_set() and len(cbw.locks) == 0
    await cbw.drain()  # nothing under way: returns at once



# -- leaving the chain (snapshot deleted, filter node deleted, job ended) --------------------

class ClosedQcow2Target(FaultyTarget):
    """Fails as a closed qcow2 node does: a RequestError, not an OSError."""

    async def write(self, offset: int, data: memoryview, *, fua: bool = False) -> None:
        if self.failing:
            raise RequestError(Errno.ESHUTDOWN, "qcow2 node 'tgt' is closed")
        await super().write(offset, data, fua=fua)


@pytest.mark.parametrize("closed", [FaultyTarget, ClosedQcow2Target], ids=["file", "qcow2"])
async def test_a_copy_failing_after_the_filter_retired_does_not_fail_the_guest_write(
    closed: type[FaultyTarget],
) -> None:
    """The owner takes the filter out and closes its target while a guest write's
    copy is under way: that write must still succeed (nothing needs the copy)."""
    old = noise(SIZE, 41)
    src = source_with(old)
    blocker = Blocker(src)
    target = closed(MemoryStore("tgt", SIZE), errno.EBADF)
    target.failing = False
    cbw = CopyBeforeWrite("cbw", blocker, target, cluster_size=C)  # break-guest-write
    h = blocker.hold("read", C)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cbw.write, C + 10, wrap(b"N" * 100))
        await h.entered.wait()  # the copy is reading the old data
        cbw.retired = True
        target.failing = True  # the target was closed under the copy
        h.release.set()
    assert src.data[C + 10 : C + 110] == b"N" * 100
    assert cbw.broken is None


async def test_a_guest_write_that_gets_the_lock_after_retirement_copies_nothing() -> None:
    old = noise(SIZE, 42)
    src = source_with(old)
    blocker = Blocker(src)
    tgt = MemoryStore("tgt", SIZE)
    cbw = CopyBeforeWrite("cbw", blocker, tgt, cluster_size=C)
    h = blocker.hold("read", 3 * C)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(snap, cbw, 3 * C, C)  # holds the shared lock on cluster 3
        await h.entered.wait()
        nursery.start_soon(cbw.write, 3 * C, wrap(b"W" * 10))
        await trio.testing.wait_all_tasks_blocked()  # the write waits for the lock
        cbw.retired = True
        h.release.set()
    assert cbw.copied_bytes == 0 and bytes(tgt.data) == bytes(SIZE)
    assert src.data[3 * C : 3 * C + 10] == b"W" * 10


async def test_a_snapshot_read_waiting_when_the_snapshot_is_deleted_gets_eshutdown() -> None:
    """It must not go on to read a target that its owner is closing."""
    old = noise(SIZE, 43)
    src = source_with(old)
    blocker = Blocker(src)
    target = ClosableStore("tgt", SIZE)
    cbw = CopyBeforeWrite("cbw", blocker, target, cluster_size=C)
    h = blocker.hold("read", 5 * C)
    failures: list[OSError] = []

    async def reader() -> None:
        try:
            await snap(cbw, 5 * C, C)
        except OSError as exc:
            failures.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(cbw.write, 5 * C, wrap(b"x"))
        await h.entered.wait()  # the write's copy holds the exclusive lock
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        cbw.deleted = cbw.retired = True
        target.closed = True
        h.release.set()
    assert [e.errno for e in failures] == [errno.ESHUTDOWN]


async def test_status_counts_a_write_in_flight_at_the_snapshot_instant_as_a_read_does() -> None:
    """``snapshot_status`` waits for pre-snapshot requests as ``snapshot_read`` does,
    or it could report a hole of zeroes where the snapshot then reads data."""
    src = ZeroAware("src", SIZE)
    blocker = Blocker(src)
    tracking = DirtyTracking("live", blocker)
    h = blocker.hold("write", 0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tracking.write, 0, wrap(b"P" * C))  # in flight at the snapshot instant
        await h.entered.wait()
        cbw = CopyBeforeWrite("cbw", blocker, MemoryStore("tgt", SIZE), cluster_size=C,
                              pre_inflight=tracking.in_flight())
        tracking.child = cbw
        status: list[list[Extent]] = []

        async def ask() -> None:
            status.append(await cbw.snapshot_status(0, C))

        nursery.start_soon(ask)
        await trio.testing.wait_all_tasks_blocked()
        assert status == []  # waits for the write
        h.release.set()
    assert await snap(cbw, 0, C) == b"P" * C
    assert not status[0][0].flags & AllocationState.ZERO


# -- the target's gate (its crash-recovery journal entry, recovery.py) -------------------------

async def test_nothing_reaches_the_target_before_it_is_ready() -> None:
    old, src = nowait_source(31)
    tgt = NowaitStore("tgt", SIZE)
    cbw = CopyBeforeWrite("cbw", src, tgt, cluster_size=C)
    cbw.target_ready = ready = trio.Event()
    assert cbw.write_nowait(C, wrap(b"f")) is False  # the fast path declines
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cbw.write, 2 * C, wrap(b"a"))
        await trio.testing.wait_all_tasks_blocked()
        assert bytes(tgt.data) == bytes(SIZE) and cbw.copied_bytes == 0  # waits, copies nothing
        assert src.data[2 * C : 2 * C + 1] == old[2 * C : 2 * C + 1]  # nor lets the write through
        ready.set()
    assert cbw.copied_bytes == C and tgt.data[2 * C : 3 * C] == old[2 * C : 3 * C]
    assert src.data[2 * C : 2 * C + 1] == b"a"
    assert cbw.write_nowait(C, wrap(b"f")) is True  # open from now on
    assert await snap(cbw) == old
