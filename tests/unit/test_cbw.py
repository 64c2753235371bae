"""Copy-before-write in-process: the filter, its range locks and the snapshot view.

Sources and targets are ``MemoryStore``s, so every byte can be checked
against a model.  Interleavings are forced with layers that park a chosen
request on a ``trio.Event`` (``Blocker``), or that yield at random points
(``Jitter``).
"""

from __future__ import annotations

import errno
import random
from collections.abc import Awaitable, Callable
from functools import partial

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
from nbdfleece.constants import AllocationState

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


class NowaitStore(MemoryStore):
    """A memory store with the synchronous write fast path."""

    def write_nowait(self, offset: int, data: memoryview) -> bool:
        self.data[offset : offset + len(data)] = data
        return True


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
        src = source_with(old)
        tgt = MemoryStore("tgt", SIZE)
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

    def __init__(self, nursery: trio.Nursery, w_offset: int, w_data: bytes) -> None:
        self.old = noise(SIZE, 7)
        self.src = NowaitStore("src", SIZE)
        self.src.data[:] = self.old
        self.blocker = Blocker(self.src)
        self.tracking = DirtyTracking("live", self.blocker)
        self.w_offset = w_offset
        self.w_data = w_data
        self.w_hold = self.blocker.hold("write", w_offset)
        self.w_done = trio.Event()
        nursery.start_soon(self._w)
        self.tgt = MemoryStore("tgt", SIZE)
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


async def test_pre_inflight_blocks_the_fast_path() -> None:
    async with trio.open_nursery() as nursery:
        pre = PreSetup(nursery, 5 * C, b"P" * 10)
        cbw = await pre.activate()
        await cbw.write(9 * C, wrap(b"c"))  # cluster 9 copied (W is elsewhere)
        # ...but the fast path is refused while W, from before the snapshot, is pending
        assert cbw.write_nowait(9 * C, wrap(b"x")) is False
        pre.w_hold.release.set()
    await cbw.write(9 * C, wrap(b"d"))  # an async request notices that W is done
    assert cbw.write_nowait(9 * C + 1, wrap(b"x")) is True
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
    old = noise(SIZE, 11)
    src = NowaitStore("src", SIZE)
    src.data[:] = old
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

    old = noise(SIZE, 12)
    src = NowaitStore("src", SIZE)
    src.data[:] = old
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
        src = source_with(old)
        tgt = MemoryStore("tgt", size)
        cbw = CopyBeforeWrite("cbw", src, tgt, cluster_size=cluster)
        model = bytearray(old)
        touched: set[int] = set()
        for kind, off, n, byte in ops:
            if kind == "read":
                assert await snap(cbw, off, n) == old[off : off + n]
                continue
            if kind == "write":
                model[off : off + n] = bytes([byte]) * n
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
