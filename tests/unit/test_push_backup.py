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
from nbdfleece.daemon import BackupJob, Daemon
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


def start(daemon: Daemon, *args: Any, **kwargs: Any) -> BackupJob:
    """``blockdev-backup`` run alone: the job is created, then started (commit)."""
    job = daemon.start_push_backup(*args, **kwargs)
    daemon.start_job(job)
    return job


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
    start(daemon, "j", "live", "tgt", "full")
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
    start(daemon, "j", "live", "tgt", "top")
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
    start(daemon, "j", "live", "tgt", "bitmap", bitmap="b0", bitmap_mode=mode)
    assert bitmap.busy == 1
    with pytest.raises(ControlError, match="busy"):
        start(daemon, "k", "live", "tgt", "bitmap", bitmap="b0", bitmap_mode=mode)
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
    start(daemon, "j", "live", "tgt", "bitmap", bitmap="b0", bitmap_mode=mode)
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
    start(daemon, "j", "live", "tgt", "bitmap", bitmap="b0", bitmap_mode=mode)
    await settle(daemon)
    completed = dict(events)["BLOCK_JOB_COMPLETED"]
    assert completed["error"] == "Input/output error" and completed["offset"] == C
    assert bitmap.dirty_ranges() == left


async def test_cancel_gives_the_bitmap_back() -> None:
    daemon, _, _, _, events = setup()
    bitmap = dirty_bitmap(daemon, [(0, SIZE)])
    start(daemon, "j", "live", "tgt", "bitmap", bitmap="b0", bitmap_mode="on-success")
    daemon.cancel_job(daemon.find_job("j", block=False))
    await trio.sleep(0.01)
    assert bitmap.count() == SIZE and bitmap.busy == 0 and not daemon.jobs
    names = [n for n, _ in events]
    assert "BLOCK_JOB_CANCELLED" in names and "BLOCK_JOB_COMPLETED" not in names


async def wait_status(daemon: Daemon, job: BackupJob, status: str) -> None:
    with trio.fail_after(5):
        while job.status != status:
            await trio.sleep(0.001)


async def test_manual_finalize_keeps_filter_and_bitmap_until_finalize() -> None:
    daemon, src, tgt, _, events = setup()
    bitmap = dirty_bitmap(daemon, [(0, C), (9 * C, C)])
    job = start(daemon, "j", "live", "tgt", "bitmap", bitmap="b0", bitmap_mode="on-success",
                auto_finalize=False, auto_dismiss=False)
    await wait_status(daemon, job, "pending")
    live = daemon.graph.node("live")
    assert live.top.child is job.cbw and bitmap.busy == 1  # not finalized: all still in place
    assert ("BLOCK_JOB_PENDING", {"type": "backup", "id": "j"}) in events
    with pytest.raises(ControlError, match="in state 'pending' cannot accept command verb 'dismiss'"):
        daemon.dismiss_job(job)
    daemon.finalize_job(job)
    below: object = live.top.child
    assert below is src and bitmap.busy == 0 and bitmap.count() == 0
    assert job.status == "concluded" and daemon.jobs == {"j": job}
    # Released once concluded: QEMU 7.2 lets blockdev-del take the target before job-dismiss.
    assert daemon.graph.node("tgt").users == 0 and daemon.graph.node("live").users == 1  # the job
    daemon.dismiss_job(job)
    assert not daemon.jobs and daemon.graph.node("tgt").users == 0
    assert [d["status"] for n, d in events if n == "JOB_STATUS_CHANGE"] == [
        "created", "running", "waiting", "pending", "concluded", "null"]
    assert tgt.data[:C] == src.data[:C]


async def test_a_full_target_fails_the_job_not_the_guest_write() -> None:
    daemon, src, _, faulty, events = setup()
    faulty.failing = True
    job = daemon.start_push_backup("j", "live", "tgt", "full")
    # Before the job's first step runs, a guest write needs a copy into the target.
    daemon.start_job(job)
    await daemon.graph.node("live").top.write(30 * C, memoryview(b"G" * 10))
    assert bytes(src.data[30 * C : 30 * C + 10]) == b"G" * 10
    await settle(daemon)
    completed = dict(events)["BLOCK_JOB_COMPLETED"]
    assert completed["error"] == "Input/output error" and completed["offset"] < SIZE


async def test_pause_stops_a_push_job_at_its_next_step() -> None:
    daemon, _, _, _, events = setup()
    job = start(daemon, "j", "live", "tgt", "full")
    daemon.pause_job(job)
    with pytest.raises(ControlError, match="Job is already paused"):
        daemon.pause_job(job)
    await wait_status(daemon, job, "paused")
    offset = job.offset
    await trio.sleep(0.05)
    assert job.offset == offset < SIZE and job.user_paused
    daemon.resume_job(job)
    with pytest.raises(ControlError, match="Can't resume a job that was not paused"):
        daemon.resume_job(job)
    await settle(daemon)
    assert [d["status"] for n, d in events if n == "JOB_STATUS_CHANGE"] == [
        "created", "running", "paused", "running", "waiting", "pending", "concluded", "null"]


async def test_an_unstarted_job_ends_without_block_job_events() -> None:
    daemon, _, _, _, events = setup()
    bitmap = dirty_bitmap(daemon, [(0, SIZE)])
    job = daemon.start_push_backup("j", "live", "tgt", "bitmap", bitmap="b0", bitmap_mode="on-success")
    daemon.cancel_job(job)  # a transaction's undo
    assert not daemon.jobs and bitmap.count() == SIZE and bitmap.busy == 0
    assert [(n, d.get("status")) for n, d in events] == [
        ("JOB_STATUS_CHANGE", s) for s in ("created", "aborting", "concluded", "null")]
    assert daemon.graph.node("live").top.child is not job.cbw


async def test_speed_limits_a_push_job_and_set_speed_lifts_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """``speed`` holds the job to that many bytes per second on average (virtual
    time here); ``block-job-set-speed 0`` lets it run free from then on."""
    daemon, src, tgt, _, events = setup()
    job = daemon.start_push_backup("j", "live", "tgt", "full")
    daemon.set_job_speed(job, 1 << 20)
    t0 = trio.current_time()
    daemon.start_job(job)
    with trio.fail_after(30):
        while daemon.jobs:
            await trio.sleep(0.05)
    # 2.5 MiB at 1 MiB/s: the last MiB needs no wait, the rest does
    assert trio.current_time() - t0 >= 1.4
    assert bytes(tgt.data) == bytes(src.data)
    done = [d for name, d in events if name == "BLOCK_JOB_COMPLETED"]
    assert done and done[0]["speed"] == 1 << 20

    daemon, src, tgt, _, _ = setup()
    job = daemon.start_push_backup("k", "live", "tgt", "full")
    daemon.set_job_speed(job, 64 << 10)  # 40 s for the whole disk
    t0 = trio.current_time()
    daemon.start_job(job)
    await trio.sleep(2)
    assert daemon.jobs and daemon.job_info(job)["speed"] == 64 << 10
    assert 0 < job.offset < job.length
    daemon.set_job_speed(job, 0)
    with trio.fail_after(30):
        while daemon.jobs:
            await trio.sleep(0.001)
    assert trio.current_time() - t0 < 3
    assert bytes(tgt.data) == bytes(src.data)
    with pytest.raises(ControlError, match="non-negative"):
        daemon.set_job_speed(job, -1)


# -- completion-mode grouped (QEMU's JobTxn) -------------------------------------------------------

def grouped_setup(*, failing_second: bool = False) -> tuple[Daemon, list[Any], MemoryStore, MemoryStore]:
    """``live`` -> ``tgt`` and ``live2`` -> ``tgt2`` (which can fail every write)."""
    daemon, _, tgt, _, events = setup()
    src2 = MemoryStore("src2", SIZE)
    src2.data[:] = noise(SIZE, 8)
    daemon.graph.nodes["live2"] = GraphNode("live2", "mem", DirtyTracking("live2", src2))
    tgt2 = MemoryStore("tgt2", SIZE)
    faulty = FaultyTarget(tgt2, errno.EIO)
    faulty.failing = failing_second
    daemon.graph.nodes["tgt2"] = GraphNode("tgt2", "mem", DirtyTracking("tgt2", faulty))
    return daemon, events, tgt, tgt2


def grouped(daemon: Daemon, second: dict[str, Any] | None = None, **first: Any) -> None:
    """One ``transaction`` with ``completion-mode: grouped`` starting jobs a and b."""
    from nbdfleece.qmp.commands import run_transaction

    run_transaction(daemon, [
        {"type": "blockdev-backup", "data": {"job-id": "a", "device": "live", "target": "tgt",
                                             "sync": "full", **first}},
        {"type": "blockdev-backup", "data": {"job-id": "b", "device": "live2", "target": "tgt2",
                                             "sync": "full", **(second or {})}},
    ], "grouped")


def job_events(events: list[Any]) -> list[tuple[str, str]]:
    return [(d.get("id") or d.get("device"), d["status"] if n == "JOB_STATUS_CHANGE" else n)
            for n, d in events if n.startswith(("BLOCK_JOB", "JOB_"))]


async def test_grouped_jobs_finalize_together(autojump_clock: trio.testing.MockClock) -> None:
    daemon, events, tgt, tgt2 = grouped_setup()
    grouped(daemon, {"speed": 1 << 20})  # b takes about 2 s, a none
    with trio.fail_after(30):
        while daemon.jobs["a"].status != "waiting":
            await trio.sleep(0.01)
    assert daemon.jobs["b"].status == "running"  # a waits for b
    assert ("a", "BLOCK_JOB_COMPLETED") not in job_events(events)
    await settle_long(daemon)
    order = job_events(events)
    assert order.index(("b", "waiting")) < order.index(("a", "pending"))
    assert order.index(("a", "pending")) < order.index(("a", "BLOCK_JOB_COMPLETED"))
    assert [e for e in order if e[1].startswith("BLOCK_JOB")] == [
        ("a", "BLOCK_JOB_COMPLETED"), ("b", "BLOCK_JOB_COMPLETED")]
    assert bytes(tgt.data) == bytes(daemon.graph.node("live").top.child.data)  # type: ignore[attr-defined]
    assert bytes(tgt2.data) == noise(SIZE, 8)


async def settle_long(daemon: Daemon) -> None:
    with trio.fail_after(60):
        while daemon.jobs:
            await trio.sleep(0.01)


async def test_a_failed_grouped_job_cancels_the_others(autojump_clock: trio.testing.MockClock) -> None:
    daemon, events, _, _ = grouped_setup(failing_second=True)
    bitmap = dirty_bitmap(daemon, [(0, C), (7 * C, C)])
    grouped(daemon, bitmap="b0", **{"bitmap-mode": "on-success", "speed": 64 << 10})  # a: slow
    await settle_long(daemon)
    ends = {job: e for job, e in job_events(events) if e.startswith("BLOCK_JOB_") and e != "BLOCK_JOB_ERROR"}
    assert ends == {"a": "BLOCK_JOB_CANCELLED", "b": "BLOCK_JOB_COMPLETED"}
    completed = next(d for n, d in events if n == "BLOCK_JOB_COMPLETED")
    assert completed["device"] == "b" and completed["error"] == "Input/output error"
    assert bitmap.dirty_ranges() == [(0, C), (7 * C, C)] and bitmap.busy == 0  # on-success: all kept
    assert daemon.graph.node("live").users == 0 and daemon.graph.node("tgt2").users == 0


async def test_cancelling_one_grouped_job_cancels_the_group(autojump_clock: trio.testing.MockClock) -> None:
    daemon, events, _, _ = grouped_setup()
    grouped(daemon, {"speed": 64 << 10}, speed=64 << 10)
    await trio.sleep(1)
    daemon.cancel_job(daemon.jobs["b"])
    assert not daemon.jobs
    assert [e for e in job_events(events) if e[1].startswith("BLOCK_JOB")] == [
        ("a", "BLOCK_JOB_CANCELLED"), ("b", "BLOCK_JOB_CANCELLED")]


async def test_grouped_manual_finalize_of_one_finalizes_all(autojump_clock: trio.testing.MockClock) -> None:
    daemon, events, _, _ = grouped_setup()
    grouped(daemon, {"auto-finalize": False}, **{"auto-finalize": False})
    with trio.fail_after(30):
        while not all(j.status == "pending" for j in daemon.jobs.values()):
            await trio.sleep(0.01)
    assert [e for e in job_events(events) if e[1] == "BLOCK_JOB_PENDING"] == [
        ("a", "BLOCK_JOB_PENDING"), ("b", "BLOCK_JOB_PENDING")]
    daemon.finalize_job(daemon.jobs["b"])
    assert not daemon.jobs
    assert [e for e in job_events(events) if e[1] == "BLOCK_JOB_COMPLETED"] == [
        ("a", "BLOCK_JOB_COMPLETED"), ("b", "BLOCK_JOB_COMPLETED")]


async def test_an_aborted_grouped_transaction_ends_its_jobs_silently() -> None:
    from nbdfleece.qmp.commands import run_transaction
    from nbdfleece.qmp.protocol import QmpError

    daemon, events, _, _ = grouped_setup()
    with pytest.raises(QmpError, match="Transaction aborted using Abort action"):
        run_transaction(daemon, [
            {"type": "blockdev-backup", "data": {"job-id": "a", "device": "live", "target": "tgt",
                                                 "sync": "full"}},
            {"type": "blockdev-backup", "data": {"job-id": "b", "device": "live2", "target": "tgt2",
                                                 "sync": "full"}},
            {"type": "abort", "data": {}},
        ], "grouped")
    assert not daemon.jobs and daemon.grouping is None
    assert not [e for e in job_events(events) if e[1].startswith("BLOCK_JOB")]


async def test_shutdown_cancels_a_group_once(autojump_clock: trio.testing.MockClock) -> None:
    """``cancel_all_jobs`` (server stop) meets the second job of a group already ended
    by the first one's cancel: no error, every job gone, each cancelled once."""
    daemon, events, _, _ = grouped_setup()
    grouped(daemon, {"speed": 64 << 10}, speed=64 << 10)
    await trio.sleep(1)
    daemon.cancel_all_jobs()
    assert not daemon.jobs
    assert [e for e in job_events(events) if e[1].startswith("BLOCK_JOB")] == [
        ("a", "BLOCK_JOB_CANCELLED"), ("b", "BLOCK_JOB_CANCELLED")]
