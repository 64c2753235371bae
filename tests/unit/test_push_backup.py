"""Push-mode backup jobs in-process (``Daemon.start_push_backup``): memory nodes,
a target that fails on demand, and the bitmap outcome of each ``bitmap-mode``."""

from __future__ import annotations

import errno
from typing import Any

import pytest
import trio

from nbdfleece.bitmap import DirtyBitmap
from nbdfleece.block.cbw import DEFAULT_CLUSTER as C
from nbdfleece.block.memory import MemoryStore
from nbdfleece.block.node import Extent, Layer
from nbdfleece.block.tracking import DirtyTracking
from nbdfleece.constants import AllocationState
from nbdfleece.daemon import Daemon
from nbdfleece.exports import ExportRegistry
from nbdfleece.graph import ControlError, GraphNode
from nbdfleece.server import Server
from tests.unit.test_cbw import FaultyTarget, noise

SIZE = 40 * C + 1000  # the last cluster is partial


class HalfHoles(Layer):
    """Reports odd 64 KiB clusters as holes (for ``sync: top``)."""

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        out = []
        pos, end = offset, offset + length
        while pos < end:
            stop = min((pos // C + 1) * C, end)
            hole = (pos // C) % 2 == 1
            out.append(Extent(stop - pos, AllocationState.HOLE if hole else AllocationState(0)))
            pos = stop
        return out


def setup(*, failing: bool = False, holes: bool = False) -> tuple[Daemon, MemoryStore, MemoryStore,
                                                                   FaultyTarget, list[Any]]:
    daemon = Daemon(Server(ExportRegistry()))
    events: list[Any] = []
    daemon.events.emit_event = lambda name, data: events.append((name, data))  # type: ignore[method-assign]
    src = MemoryStore("src", SIZE)
    src.data[:] = noise(SIZE, 7)
    top = HalfHoles("holes", src) if holes else src
    daemon.graph.nodes["live"] = GraphNode("live", "mem", DirtyTracking("live", top))
    tgt = MemoryStore("tgt", SIZE)
    faulty = FaultyTarget(tgt, errno.EIO)
    faulty.failing = failing
    daemon.graph.nodes["tgt"] = GraphNode("tgt", "mem", DirtyTracking("tgt", faulty))
    return daemon, src, tgt, faulty, events


async def settle(daemon: Daemon) -> None:
    with trio.fail_after(5):
        while daemon.jobs:
            await trio.sleep(0.001)


def dirty_bitmap(daemon: Daemon, ranges: list[tuple[int, int]]) -> DirtyBitmap:
    bitmap = DirtyBitmap("b0", SIZE)
    for offset, length in ranges:
        bitmap.mark(offset, length)
    daemon.graph.node("live").bitmaps["b0"] = bitmap
    return bitmap


async def test_full_backup_copies_everything_and_guest_writes_see_the_start() -> None:
    daemon, src, tgt, _, events = setup()
    old = bytes(src.data)
    daemon.start_push_backup("j", "live", "tgt", "full")
    # A guest write right after the start: the target still gets the old data.
    await daemon.graph.node("live").top.write(SIZE - 100, memoryview(b"N" * 100))
    await settle(daemon)
    assert bytes(tgt.data) == old
    assert bytes(src.data[-100:]) == b"N" * 100
    names = [n for n, _ in events]
    assert names.count("BLOCK_JOB_COMPLETED") == 1
    completed = dict(events)["BLOCK_JOB_COMPLETED"]
    assert completed == {"device": "j", "len": SIZE, "offset": SIZE, "speed": 0, "type": "backup"}
    assert daemon.graph.node("live").users == 0 and daemon.graph.node("tgt").users == 0


async def test_top_skips_holes() -> None:
    daemon, src, tgt, _, _ = setup(holes=True)
    daemon.start_push_backup("j", "live", "tgt", "top")
    await settle(daemon)
    for cluster in range(-(-SIZE // C)):
        chunk = slice(cluster * C, min((cluster + 1) * C, SIZE))
        if cluster % 2:
            assert not any(tgt.data[chunk]), cluster
        else:
            assert tgt.data[chunk] == src.data[chunk], cluster


@pytest.mark.parametrize("mode", ["on-success", "never", "always"])
async def test_bitmap_job_success(mode: str) -> None:
    daemon, src, tgt, _, events = setup()
    bitmap = dirty_bitmap(daemon, [(0, 1), (5 * C, 2 * C), (SIZE - 1, 1)])
    daemon.start_push_backup("j", "live", "tgt", "bitmap", bitmap="b0", bitmap_mode=mode)
    assert bitmap.busy == 1
    with pytest.raises(ControlError, match="busy"):
        daemon.start_push_backup("k", "live", "tgt", "bitmap", bitmap="b0", bitmap_mode=mode)
    await daemon.graph.node("live").top.write(20 * C, memoryview(b"x"))  # during the job
    await settle(daemon)
    assert bitmap.busy == 0
    assert dict(events)["BLOCK_JOB_COMPLETED"]["len"] == 3 * C + 1000
    copied = [(0, C), (5 * C, 2 * C), (40 * C, 1000)]
    for offset, length in copied:
        assert tgt.data[offset : offset + length] == src.data[offset : offset + length]
    assert not any(tgt.data[C : 5 * C]) and not any(tgt.data[20 * C : 21 * C])
    expected = [(20 * C, C)]
    if mode == "never":
        expected = [(0, C), (5 * C, 2 * C), (20 * C, C), (40 * C, 1000)]
    assert bitmap.dirty_ranges() == expected


@pytest.mark.parametrize("mode", ["on-success", "never", "always"])
async def test_bitmap_job_target_error(mode: str) -> None:
    daemon, _, _, faulty, events = setup(failing=True)
    bitmap = dirty_bitmap(daemon, [(0, C), (30 * C, C)])
    daemon.start_push_backup("j", "live", "tgt", "bitmap", bitmap="b0", bitmap_mode=mode)
    await settle(daemon)
    names = [n for n, _ in events]
    assert names.index("BLOCK_JOB_ERROR") < names.index("BLOCK_JOB_COMPLETED")
    data = dict(events)
    assert data["BLOCK_JOB_ERROR"] == {"device": "j", "operation": "write", "action": "report"}
    assert data["BLOCK_JOB_COMPLETED"]["error"] == "Input/output error"
    # Nothing was copied: every mode gives back the whole bitmap.
    assert bitmap.dirty_ranges() == [(0, C), (30 * C, C)] and bitmap.busy == 0
    assert faulty.failures == 1


class FailsFrom(FaultyTarget):
    """Fails writes at or after ``start`` only."""

    start = 10 * C

    async def write(self, offset: int, data: memoryview, *, fua: bool = False) -> None:
        self.failing = offset >= self.start
        await super().write(offset, data, fua=fua)


@pytest.mark.parametrize(("mode", "left"), [
    ("always", [(30 * C, C)]),  # what was copied is cleared even though the job failed
    ("on-success", [(0, C), (30 * C, C)]),
    ("never", [(0, C), (30 * C, C)]),
])
async def test_partial_failure(mode: str, left: list[tuple[int, int]]) -> None:
    daemon, _, tgt, _, events = setup()
    daemon.graph.node("tgt").top.child = FailsFrom(tgt, errno.EIO)
    bitmap = dirty_bitmap(daemon, [(0, C), (30 * C, C)])
    daemon.start_push_backup("j", "live", "tgt", "bitmap", bitmap="b0", bitmap_mode=mode)
    await settle(daemon)
    completed = dict(events)["BLOCK_JOB_COMPLETED"]
    assert completed["error"] == "Input/output error" and completed["offset"] == C
    assert bitmap.dirty_ranges() == left


async def test_cancel_gives_the_bitmap_back() -> None:
    daemon, _, _, _, events = setup()
    bitmap = dirty_bitmap(daemon, [(0, SIZE)])
    daemon.start_push_backup("j", "live", "tgt", "bitmap", bitmap="b0", bitmap_mode="on-success")
    daemon.cancel_job("j")
    await trio.sleep(0.01)
    assert bitmap.count() == SIZE and bitmap.busy == 0 and not daemon.jobs
    names = [n for n, _ in events]
    assert "BLOCK_JOB_CANCELLED" in names and "BLOCK_JOB_COMPLETED" not in names
