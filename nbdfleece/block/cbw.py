"""Copy-before-write: a point-in-time view of a node that keeps being written.

Theory of operation
-------------------
:class:`CopyBeforeWrite` is inserted, in one event-loop step, between a
node's tracking layer and the rest of its chain.  From then on::

    guest write ──> tracking ──> CBW ──> source (the live chain)
                                  │ first write to a cluster: copy the old
                                  │ cluster to the target, mark it done,
                                  ▼ then let the write through
                                target (overlay file)

    snapshot read ──> SnapshotView ──> done cluster: read the target
                                       other cluster: read the source

Invariants, with writers on any number of connections:

* a cluster's old data reaches the target before any write to it passes;
* a snapshot read of a not-yet-copied cluster holds a shared lock on it, so
  no guest write (which needs the exclusive lock to copy) can change it
  under the read: the read never sees new data;
* requests that were already below the insertion point at the instant the
  snapshot was taken (``pre_inflight``) count as before the snapshot: copies
  and snapshot reads of their range wait for them to finish, so they are
  seen whole, never torn;
* nothing done to the snapshot ever writes to the source.

On a target write failure, ``on_cbw_error`` decides: ``break-guest-write``
(QEMU's default) fails the guest write and keeps the snapshot valid;
``break-snapshot`` lets guest writes continue and makes every later
snapshot read fail with EIO.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterable

import numpy as np
import numpy.typing as npt
import trio

from nbdfleece.block.node import BlockNode, Extent, Layer, Segment
from nbdfleece.block.tracking import InFlight
from nbdfleece.constants import AllocationState

log = logging.getLogger(__name__)

BREAK_GUEST_WRITE = "break-guest-write"
BREAK_SNAPSHOT = "break-snapshot"
DEFAULT_CLUSTER = 64 * 1024


class RangeLocks:
    """Shared/exclusive locks on cluster ranges ``[first, last]``.

    Few operations are ever in flight per node, so conflicts are found by a
    scan; waiters park until any release.
    """

    def __init__(self) -> None:
        self._held: dict[int, tuple[int, int, bool]] = {}
        self._next = 0
        self._lot = trio.lowlevel.ParkingLot()

    def _conflicts(self, first: int, last: int, exclusive: bool) -> bool:
        return any(
            f <= last and first <= l_ and (exclusive or ex)
            for f, l_, ex in self._held.values()
        )

    async def acquire(self, first: int, last: int, *, exclusive: bool) -> int:
        while self._conflicts(first, last, exclusive):
            await self._lot.park()
        key = self._next
        self._next += 1
        self._held[key] = (first, last, exclusive)
        return key

    def release(self, key: int) -> None:
        del self._held[key]
        if self._lot:
            self._lot.unpark_all()

    def busy(self, first: int, last: int) -> bool:
        return self._conflicts(first, last, True)


class CopyBeforeWrite(Layer):
    """The filter: see the module docstring."""

    def __init__(
        self,
        name: str,
        child: BlockNode,
        target: BlockNode,
        *,
        cluster_size: int = DEFAULT_CLUSTER,
        pre_inflight: Iterable[InFlight] = (),
        on_cbw_error: str = BREAK_GUEST_WRITE,
    ) -> None:
        super().__init__(name, child)
        if target.size < child.size:
            raise ValueError("the copy-before-write target is smaller than its source")
        if on_cbw_error not in (BREAK_GUEST_WRITE, BREAK_SNAPSHOT):
            raise ValueError(f"on-cbw-error must be {BREAK_GUEST_WRITE} or {BREAK_SNAPSHOT}")
        self.target = target
        self.cluster = cluster_size
        self.on_cbw_error = on_cbw_error
        clusters = -(-child.size // cluster_size)
        self.done: npt.NDArray[np.bool_] = np.zeros(clusters, dtype=bool)
        self.locks = RangeLocks()
        self.broken: OSError | None = None
        self.deleted = False
        """Set when the snapshot is deleted: its remaining clients get ESHUTDOWN."""
        self.copied_bytes = 0
        self.copy_op = "write"
        """The step of the last copy (``read`` or ``write``), for error reports."""
        self._pre = list(pre_inflight)

    # -- helpers --------------------------------------------------------------
    def _span(self, offset: int, length: int) -> tuple[int, int]:
        return offset // self.cluster, (offset + max(length, 1) - 1) // self.cluster

    async def _wait_pre(self, offset: int, length: int) -> None:
        """Let requests from before the snapshot instant that overlap finish."""
        if not self._pre:
            return
        end = offset + length
        for start, stop, done in self._pre:
            if start < end and offset < stop:
                await done.wait()
        self._pre = [p for p in self._pre if not p[2].is_set()]

    async def _copy(self, first: int, last: int) -> None:
        """Copy every not-yet-done cluster of ``[first, last]`` (exclusive lock held)."""
        pending = np.flatnonzero(~self.done[first : last + 1]) + first
        if not pending.size:
            return
        # Runs of consecutive clusters are copied with one read and one write.
        breaks = np.flatnonzero(np.diff(pending) != 1) + 1
        for run in np.split(pending, breaks):
            start = int(run[0]) * self.cluster
            end = min((int(run[-1]) + 1) * self.cluster, self.child.size)
            buf = memoryview(bytearray(end - start))
            self.copy_op = "read"
            await self.child.read(start, buf)
            self.copy_op = "write"
            try:
                await self.target.write(start, buf)
            except OSError as exc:
                if self.on_cbw_error == BREAK_GUEST_WRITE:
                    raise
                if self.broken is None:
                    log.error("copy-before-write to %s failed (%s): snapshot broken",
                              self.target.name, exc)
                self.broken = exc
                return
            self.done[int(run[0]) : int(run[-1]) + 1] = True
            self.copied_bytes += end - start

    async def copy_range(self, offset: int, length: int, *, allocated_only: bool = False) -> int:
        """Copy the not-done clusters of a range now (a push backup job's step).

        With ``allocated_only``, clusters the source reports as holes are marked
        done without a copy (``sync: top``).  Returns the bytes copied.
        """
        first, last = self._span(offset, length)
        key = await self.locks.acquire(first, last, exclusive=True)
        try:
            await self._wait_pre(first * self.cluster, (last + 1 - first) * self.cluster)
            before = self.copied_bytes
            if allocated_only and not self.done[first : last + 1].all():
                start = first * self.cluster
                end = min((last + 1) * self.cluster, self.child.size)
                pos = start
                for ext in await self.child.block_status(start, end - start):
                    if ext.flags & AllocationState.HOLE:
                        lo = -(-pos // self.cluster)  # clusters wholly inside the hole
                        hi = min(pos + ext.length, end)
                        hi = hi // self.cluster if hi < self.child.size else last + 1
                        if hi > lo:
                            self.done[lo:hi] = True
                    pos += ext.length
            await self._copy(first, last)
            return self.copied_bytes - before
        finally:
            self.locks.release(key)

    async def _guarded(self, offset: int, length: int) -> int:
        """Take the exclusive lock for a modification and copy old data first."""
        first, last = self._span(offset, length)
        key = await self.locks.acquire(first, last, exclusive=True)
        try:
            # Copies are whole clusters: wait for every earlier request touching them.
            await self._wait_pre(first * self.cluster, (last + 1 - first) * self.cluster)
            if self.broken is None:
                await self._copy(first, last)
        except BaseException:
            self.locks.release(key)
            raise
        return key

    # -- guest side -----------------------------------------------------------
    async def write(self, offset: int, data: memoryview, *, fua: bool = False) -> None:
        key = await self._guarded(offset, len(data))
        try:
            await self.child.write(offset, data, fua=fua)
        finally:
            self.locks.release(key)

    def write_nowait(self, offset: int, data: memoryview) -> bool:
        first, last = self._span(offset, len(data))
        if self._pre or self.locks.busy(first, last):
            return False
        if self.broken is None and not self.done[first : last + 1].all():
            return False  # needs a copy first: the async path
        return self.child.write_nowait(offset, data)

    async def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool, fua: bool = False, fast: bool = False
    ) -> None:
        key = await self._guarded(offset, length)
        try:
            await self.child.write_zeroes(offset, length, may_trim=may_trim, fua=fua, fast=fast)
        finally:
            self.locks.release(key)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        key = await self._guarded(offset, length)
        try:
            await self.child.trim(offset, length, fua=fua)
        finally:
            self.locks.release(key)

    # -- snapshot side --------------------------------------------------------
    def _check_broken(self) -> None:
        if self.deleted:
            raise OSError(errno.ESHUTDOWN, "snapshot was deleted")
        if self.broken is not None:
            raise OSError(errno.EIO, f"snapshot is broken: copy-before-write failed ({self.broken})")

    async def snapshot_read(self, offset: int, buf: memoryview) -> None:
        self._check_broken()
        first, last = self._span(offset, len(buf))
        key = await self.locks.acquire(first, last, exclusive=False)
        try:
            await self._wait_pre(offset, len(buf))
            done = self.done[first : last + 1]
            # Runs of clusters that come from the same place, clipped to the read.
            edges = np.flatnonzero(done[1:] != done[:-1]) + 1
            starts = np.concatenate(([0], edges))
            ends = np.concatenate((edges, [done.size]))
            end = offset + len(buf)
            for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
                lo = max((first + s) * self.cluster, offset)
                hi = min((first + e) * self.cluster, end)
                view = buf[lo - offset : hi - offset]
                await (self.target if done[s] else self.child).read(lo, view)
            self._check_broken()
        finally:
            self.locks.release(key)

    async def snapshot_status(self, offset: int, length: int) -> list[Extent]:
        """``base:allocation`` of the view: the source's status for uncopied clusters."""
        self._check_broken()
        first, last = self._span(offset, length)
        # Shared lock: no copy + zeroing of the source may slip in between the
        # ``done`` check and the source's answer.
        key = await self.locks.acquire(first, last, exclusive=False)
        try:
            if not self.done[first : last + 1].any():
                return await self.child.block_status(offset, length)
            return [Extent(length, AllocationState(0))]  # data: always a safe answer
        finally:
            self.locks.release(key)


class SnapshotView(BlockNode):
    """The read-only point-in-time view served by a snapshot export."""

    def __init__(self, name: str, cbw: CopyBeforeWrite) -> None:
        super().__init__(name)
        self.cbw = cbw

    @property
    def size(self) -> int:
        return self.cbw.size

    @property
    def read_only(self) -> bool:
        return True

    @property
    def can_fast_zero(self) -> bool:
        return False

    async def read(self, offset: int, buf: memoryview, *, sparse: bool = False) -> list[Segment]:
        await self.cbw.snapshot_read(offset, buf)
        return [Segment(0, len(buf), False)]

    async def write(self, offset: int, data: memoryview, *, fua: bool = False) -> None:
        raise OSError(errno.EROFS, "snapshot is read-only")

    async def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool, fua: bool = False, fast: bool = False
    ) -> None:
        raise OSError(errno.EROFS, "snapshot is read-only")

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        raise OSError(errno.EROFS, "snapshot is read-only")

    async def flush(self) -> None:
        """Nothing to flush: the view never writes."""

    async def cache(self, offset: int, length: int) -> None:
        """Prefetch is only a hint."""

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        return await self.cbw.snapshot_status(offset, length)
