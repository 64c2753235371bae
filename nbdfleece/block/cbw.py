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

Three arrays of one bool per cluster, as QEMU's filter keeps three bitmaps:

* ``pending``: old data still to be copied before a write (QEMU's
  block-copy bitmap).  All clusters, or only those of the ``bitmap`` option;
  a push backup job restricts it to the clusters it wants;
* ``done``: copied into the target (snapshot reads come from there);
* ``access``: readable through the snapshot (None: all).  With a
  ``bitmap`` it starts as ``pending``; other reads fail as QEMU's do
  (EACCES inside QEMU, ``NBD_EINVAL`` on the wire).

Invariants, with writers on any number of connections:

* a cluster's old data reaches the target before any write to it passes;
* a snapshot read of a not-yet-copied cluster holds a shared lock on it, so
  no guest write (which needs the exclusive lock to copy) can change it
  under the read: the read never sees new data;
* requests that were already below the insertion point at the instant the
  snapshot was taken (``pre_inflight``) count as before the snapshot: copies
  and snapshot reads of their range wait for them to finish, so they are
  seen whole, never torn;
* nothing done to the snapshot ever writes to the source;
* when the filter leaves its chain (``retired``: snapshot or node deleted,
  job ended), guest writes still inside it start no more copies, and a copy
  that then fails (its target being closed) does not fail them; snapshot
  readers that were waiting get ESHUTDOWN, never a read of a closed target.

The cost of a copy
------------------
A guest write that needs a copy is served, when it can be, entirely in the
synchronous fast path (``write_nowait``): no lock holder on its clusters,
nothing from before the snapshot in flight, and a source and target that
can copy without waiting (two memory-backed files: ``copy_file_range``;
otherwise ``read_nowait`` + ``write_nowait`` through a pooled buffer).
Everything happens in one event-loop step, which is as atomic as holding
the exclusive lock.  Otherwise the write takes the async path: the
exclusive lock, then one copy job per run of adjacent pending clusters
(``FileStore.copy_to``: one worker round-trip), then the write.  A copy
that fails in the fast path is redone by the async path, which reports it.

Errors and time limits
----------------------
On a failed copy ``on_cbw_error`` decides: ``break-guest-write`` (QEMU's
default) fails the guest write and keeps the snapshot valid;
``break-snapshot`` lets guest writes continue and makes every later
snapshot read fail with EIO.  ``cbw_timeout`` (seconds, 0 = none) bounds
the copy phase of a guest write (waiting for the clusters' lock and
copying): past it the copy counts as failed with ETIMEDOUT.  As in QEMU the
copy itself cannot be aborted: it goes on in a background task that keeps
the clusters locked until it ends, and marks them done if it succeeds.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterable

import numpy as np
import numpy.typing as npt
import trio

from nbdfleece.bitmap import DirtyBitmap
from nbdfleece.block.file import FileStore, copy_failed, copy_side
from nbdfleece.block.node import BlockNode, Extent, Layer, Segment
from nbdfleece.block.tracking import InFlight
from nbdfleece.buffers import BufferPool
from nbdfleece.constants import AllocationState, Errno
from nbdfleece.errors import RequestError

log = logging.getLogger(__name__)

BREAK_GUEST_WRITE = "break-guest-write"
BREAK_SNAPSHOT = "break-snapshot"
DEFAULT_CLUSTER = 64 * 1024
BUFFER_CACHE = 64 << 20
"""Bytes of copy buffers kept for reuse."""

_buffers = BufferPool(BUFFER_CACHE)


class RangeLocks:
    """Shared/exclusive locks on cluster ranges ``[first, last]``.

    Few operations hold a lock at a time (the fast path takes none), so
    conflicts are found by a scan.  A release wakes only the waiters whose
    range overlaps it, which then check again.
    """

    def __init__(self) -> None:
        self._held: dict[int, tuple[int, int, bool]] = {}
        self._next = 0
        self._waiters: dict[int, tuple[int, int, trio.Event]] = {}

    def __len__(self) -> int:
        return len(self._held)

    def _conflicts(self, first: int, last: int, exclusive: bool) -> bool:
        return any(
            f <= last and first <= l_ and (exclusive or ex)
            for f, l_, ex in self._held.values()
        )

    async def acquire(self, first: int, last: int, *, exclusive: bool) -> int:
        if self._held and self._conflicts(first, last, exclusive):
            waiter = self._next
            self._next += 1
            try:
                while self._conflicts(first, last, exclusive):
                    event = trio.Event()
                    self._waiters[waiter] = (first, last, event)
                    await event.wait()
            finally:
                self._waiters.pop(waiter, None)
        key = self._next
        self._next += 1
        self._held[key] = (first, last, exclusive)
        return key

    def release(self, key: int) -> None:
        first, last, _ = self._held.pop(key)
        for f, l_, event in self._waiters.values():
            if f <= last and first <= l_:
                event.set()

    def busy(self, first: int, last: int) -> bool:
        return bool(self._held) and self._conflicts(first, last, True)

    async def idle(self) -> None:
        """Return once no lock is held (every copy and read under way has ended)."""
        waiter = self._next
        self._next += 1
        try:
            while self._held:
                event = trio.Event()
                self._waiters[waiter] = (0, 1 << 62, event)
                await event.wait()
        finally:
            self._waiters.pop(waiter, None)


class _TimedCopy:
    """The state a timed copy phase shares with its background task."""

    def __init__(self) -> None:
        self.finished = trio.Event()
        self.key: int | None = None
        self.error: BaseException | None = None
        self.abandoned = False
        """The guest write stopped waiting: the background task releases the lock."""


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
        bitmap: DirtyBitmap | None = None,
        cbw_timeout: float = 0.0,
    ) -> None:
        super().__init__(name, child)
        if target.size < child.size:
            raise ValueError("the copy-before-write target is smaller than its source")
        if on_cbw_error not in (BREAK_GUEST_WRITE, BREAK_SNAPSHOT):
            raise ValueError(f"on-cbw-error must be {BREAK_GUEST_WRITE} or {BREAK_SNAPSHOT}")
        if cbw_timeout < 0:
            raise ValueError("cbw-timeout must not be negative")
        if bitmap is not None and bitmap.size != child.size:
            raise ValueError("Bitmaps are incompatible and can't be merged")
        self.target = target
        self.cluster = cluster_size
        self.on_cbw_error = on_cbw_error
        self.timeout = cbw_timeout
        clusters = -(-child.size // cluster_size)
        self.pending: npt.NDArray[np.bool_] = np.ones(clusters, dtype=bool)
        """Clusters whose old data must still be copied before a write."""
        self.access: npt.NDArray[np.bool_] | None = None
        """Clusters readable through the snapshot (None: all of them)."""
        if bitmap is not None:
            # QEMU merges the user's bitmap into its own at cluster granularity,
            # once: later changes to the user's bitmap do not matter.
            selected = DirtyBitmap("copy", child.size, cluster_size, recording=False)
            selected.merge_from(bitmap)
            self.pending = selected.bits.copy()
            self.access = self.pending.copy()
        self.done: npt.NDArray[np.bool_] = np.zeros(clusters, dtype=bool)
        """Clusters copied into the target: snapshot reads come from there."""
        self._to_copy = int(np.count_nonzero(self.pending))
        self.locks = RangeLocks()
        self.broken: OSError | None = None
        self.deleted = False
        """Set when the snapshot is deleted: its remaining clients get ESHUTDOWN."""
        self.retired = False
        """Set when the filter leaves its chain (snapshot deleted, node deleted, job
        ended): guest writes still inside it copy nothing more and pass, a failed
        copy no longer fails them, and its target can then be closed."""
        self.copied_bytes = 0
        self.copy_op = "write"
        """The side of the last failed copy (``read`` or ``write``), for error reports."""
        self._pre = list(pre_inflight)
        self.target_ready: trio.Event | None = None
        """Set by the owner when the target may not be written yet (the daemon: until its
        crash-recovery journal entry is durable, ``recovery.py``); copies wait for it."""

    def _target_open(self) -> bool:
        """Whether copies may write to the target now."""
        ready = self.target_ready
        if ready is None:
            return True
        if ready.is_set():
            self.target_ready = None
            return True
        return False

    # -- helpers --------------------------------------------------------------
    def _span(self, offset: int, length: int) -> tuple[int, int]:
        return offset // self.cluster, (offset + max(length, 1) - 1) // self.cluster

    def restrict(self, wanted: npt.NDArray[np.bool_]) -> None:
        """Copy only the ``wanted`` clusters from now on (a push job's selection)."""
        self.pending &= wanted
        self._to_copy = int(np.count_nonzero(self.pending))

    def _skip(self, lo: int, hi: int) -> None:
        """Clusters ``[lo, hi)`` need no copy (not copied either)."""
        self._to_copy -= int(np.count_nonzero(self.pending[lo:hi]))
        self.pending[lo:hi] = False

    def _copied(self, lo: int, hi: int, nbytes: int) -> None:
        """Clusters ``[lo, hi)``, all pending, are now in the target."""
        self.pending[lo:hi] = False
        self.done[lo:hi] = True
        self._to_copy -= hi - lo
        self.copied_bytes += nbytes

    def _pending_runs(self, first: int, last: int) -> list[tuple[int, int]]:
        """``[lo, hi)`` cluster runs of ``[first, last]`` that still need a copy."""
        seg = self.pending[first : last + 1]
        if seg.all():
            return [(first, last + 1)]
        if not seg.any():
            return []
        edges = np.flatnonzero(np.diff(seg.astype(np.int8), prepend=0, append=0))
        return [(first + int(lo), first + int(hi))
                for lo, hi in zip(edges[0::2].tolist(), edges[1::2].tolist(), strict=True)]

    def _bytes(self, lo: int, hi: int) -> tuple[int, int]:
        return lo * self.cluster, min(hi * self.cluster, self.child.size)

    async def _wait_pre(self, offset: int, length: int) -> None:
        """Let requests from before the snapshot instant that overlap finish."""
        if not self._pre:
            return
        end = offset + length
        for start, stop, done in self._pre:
            if start < end and offset < stop:
                await done.wait()
        self._pre = [p for p in self._pre if not p[2].is_set()]

    # -- copying ------------------------------------------------------------
    def _copy_nowait(self, first: int, last: int) -> bool:
        """Copy the pending clusters of ``[first, last]`` without waiting, or
        return False (some may be copied): the async path does the rest."""
        src, dst = self.child, self.target
        runs = self._pending_runs(first, last)
        if runs and not self._target_open():
            return False
        for lo, hi in runs:
            start, end = self._bytes(lo, hi)
            try:
                if isinstance(src, FileStore) and isinstance(dst, FileStore):
                    if not src.copy_to_nowait(dst, start, end - start):
                        return False
                else:
                    buf = _buffers.get(end - start)
                    try:
                        view = memoryview(buf)[: end - start]
                        if src.read_nowait(start, view) is None or not dst.write_nowait(start, view):
                            return False
                    finally:
                        _buffers.put(buf)
            except OSError:
                return False  # the async path copies again and reports the error
            self._copied(lo, hi, end - start)
        return True

    async def _copy(self, first: int, last: int) -> None:
        """Copy every pending cluster of ``[first, last]`` (exclusive lock held).

        Adjacent pending clusters are copied together.  Raises the first
        failure, with ``copy_op`` set to the side that failed.
        """
        src, dst = self.child, self.target
        if not self._target_open() and self.pending[first : last + 1].any():
            assert self.target_ready is not None
            await self.target_ready.wait()
        for lo, hi in self._pending_runs(first, last):
            if self.retired:
                return  # out of the chain: nothing needs the old data any more
            start, end = self._bytes(lo, hi)
            try:
                if isinstance(src, FileStore) and isinstance(dst, FileStore):
                    await src.copy_to(dst, start, end - start)
                else:
                    await self._copy_buffered(src, dst, start, end - start)
            except OSError as exc:
                self.copy_op = copy_side(exc)
                raise
            self._copied(lo, hi, end - start)

    @staticmethod
    async def _copy_buffered(src: BlockNode, dst: BlockNode, start: int, length: int) -> None:
        buf = _buffers.get(length)
        try:
            view = memoryview(buf)[:length]
            try:
                await src.read(start, view)
            except OSError as exc:
                raise copy_failed(exc, "read") from None
            try:
                await dst.write(start, view)
            except OSError as exc:
                raise copy_failed(exc, "write") from None
        finally:
            _buffers.put(buf)

    async def copy_range(self, offset: int, length: int, *, allocated_only: bool = False) -> int:
        """Copy the pending clusters of a range now (a push backup job's step).

        With ``allocated_only``, clusters the source reports as holes need no
        copy (``sync: top``).  Returns the bytes copied.
        """
        first, last = self._span(offset, length)
        key = await self.locks.acquire(first, last, exclusive=True)
        try:
            await self._wait_pre(first * self.cluster, (last + 1 - first) * self.cluster)
            before = self.copied_bytes
            if allocated_only and self.pending[first : last + 1].any():
                start, end = self._bytes(first, last + 1)
                pos = start
                for ext in await self.child.block_status(start, end - start):
                    if ext.flags & AllocationState.HOLE:
                        lo = -(-pos // self.cluster)  # clusters wholly inside the hole
                        hi = min(pos + ext.length, end)
                        hi = hi // self.cluster if hi < self.child.size else last + 1
                        if hi > lo:
                            self._skip(lo, hi)
                    pos += ext.length
            await self._copy(first, last)
            return self.copied_bytes - before
        finally:
            self.locks.release(key)

    async def _copy_phase(self, first: int, last: int) -> int:
        """Exclusive lock, earlier requests drained, old data copied: the lock key."""
        key = await self.locks.acquire(first, last, exclusive=True)
        try:
            # Copies are whole clusters: wait for every earlier request touching them.
            await self._wait_pre(first * self.cluster, (last + 1 - first) * self.cluster)
            await self._copy(first, last)
        except BaseException:
            self.locks.release(key)
            raise
        return key

    async def _timed_copy_phase(self, first: int, last: int) -> int:
        """:meth:`_copy_phase` bounded by ``cbw_timeout``; see the module docstring."""
        state = _TimedCopy()

        async def background() -> None:
            try:
                state.key = await self._copy_phase(first, last)
            except BaseException as exc:  # kept for the waiter; a system task must not raise
                state.error = exc
            finally:
                state.finished.set()
                if state.abandoned and state.key is not None:
                    self.locks.release(state.key)

        trio.lowlevel.spawn_system_task(background, name=f"cbw-copy-{self.name}")
        try:
            with trio.move_on_after(self.timeout):
                await state.finished.wait()
        except BaseException:
            state.abandoned = True
            if state.key is not None:
                self.locks.release(state.key)
            raise
        if not state.finished.is_set():
            state.abandoned = True
            self.copy_op = "write"
            raise OSError(errno.ETIMEDOUT, f"copy-before-write timed out after {self.timeout:g} s")
        if state.error is not None:
            raise state.error
        assert state.key is not None
        return state.key

    async def drain(self) -> None:
        """Wait for the copies and snapshot reads under way (before closing the target)."""
        await self.locks.idle()

    def _break(self, exc: OSError) -> None:
        if self.broken is None:
            log.error("copy-before-write to %s failed (%s): snapshot broken", self.target.name, exc)
        self.broken = exc

    async def _guarded(self, offset: int, length: int) -> int | None:
        """Copy old data before a modification; returns the lock to release after
        it (None when no copy is needed any more: a broken snapshot)."""
        if self.broken is not None or self.retired:
            return None
        first, last = self._span(offset, length)
        try:
            if self.timeout:
                return await self._timed_copy_phase(first, last)
            return await self._copy_phase(first, last)
        except (OSError, RequestError) as exc:
            if self.retired:  # left the chain meanwhile (its target may be closed): no copy needed
                return None
            if isinstance(exc, RequestError) or self.on_cbw_error == BREAK_GUEST_WRITE:
                raise
            self._break(exc)
            return None

    def _unlock(self, key: int | None) -> None:
        if key is not None:
            self.locks.release(key)

    # -- guest side -----------------------------------------------------------
    async def write(self, offset: int, data: memoryview, *, fua: bool = False) -> None:
        key = await self._guarded(offset, len(data))
        try:
            await self.child.write(offset, data, fua=fua)
        finally:
            self._unlock(key)

    def write_nowait(self, offset: int, data: memoryview) -> bool:
        if self._to_copy and self.broken is None:
            first, last = self._span(offset, len(data))
            if self.pending[first : last + 1].any():
                if self._pre:
                    self._pre = [p for p in self._pre if not p[2].is_set()]
                if self._pre or self.locks.busy(first, last):
                    return False
                if not self._copy_nowait(first, last):
                    return False
        return self.child.write_nowait(offset, data)

    async def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool, fua: bool = False, fast: bool = False
    ) -> None:
        key = await self._guarded(offset, length)
        try:
            await self.child.write_zeroes(offset, length, may_trim=may_trim, fua=fua, fast=fast)
        finally:
            self._unlock(key)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        key = await self._guarded(offset, length)
        try:
            await self.child.trim(offset, length, fua=fua)
        finally:
            self._unlock(key)

    # -- snapshot side --------------------------------------------------------
    def _check_broken(self) -> None:
        if self.deleted:
            raise OSError(errno.ESHUTDOWN, "snapshot was deleted")
        if self.broken is not None:
            raise OSError(errno.EIO, f"snapshot is broken: copy-before-write failed ({self.broken})")

    def _check_access(self, first: int, last: int) -> None:
        """QEMU refuses (EACCES, sent as EINVAL) snapshot requests outside ``bitmap``."""
        if self.access is not None and not self.access[first : last + 1].all():
            raise RequestError(Errno.EINVAL, "outside the snapshot's bitmap: not readable")

    async def snapshot_read(self, offset: int, buf: memoryview) -> None:
        self._check_broken()
        first, last = self._span(offset, len(buf))
        self._check_access(first, last)
        key = await self.locks.acquire(first, last, exclusive=False)
        try:
            self._check_broken()  # deleted while this read waited: never read a closed target
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

    async def snapshot_discard(self, offset: int, length: int) -> None:
        """The reader is done with a range (QEMU's snapshot discard): the clusters
        wholly inside it leave the snapshot -- no more copies before guest writes,
        reads of them refused from now on -- and their copies in the target are
        discarded, which frees the overlay's space for what is already backed up.

        Aligned inward to the cluster, as QEMU does; a range that holds no whole
        cluster changes nothing (QEMU 7.2 aborts on one).  The last cluster
        counts as whole when the range reaches the end of the disk.
        """
        self._check_broken()
        end = offset + length
        lo = -(-offset // self.cluster)
        hi = (end // self.cluster) if end < self.size else self.pending.size
        if hi <= lo:
            return
        key = await self.locks.acquire(lo, hi - 1, exclusive=True)
        try:
            self._check_broken()
            if self.access is None:
                self.access = np.ones(self.pending.size, dtype=bool)
            self.access[lo:hi] = False
            self._skip(lo, hi)
            copied = bool(self.done[lo:hi].any())
            self.done[lo:hi] = False
            if copied:
                start, stop = self._bytes(lo, hi)
                try:
                    await self.target.trim(start, stop - start)
                except OSError as exc:  # the space stays used; the snapshot is as consistent
                    log.warning("discarding %d bytes of %s failed: %s", stop - start, self.target.name, exc)
        finally:
            self.locks.release(key)

    async def snapshot_status(self, offset: int, length: int) -> list[Extent]:
        """``base:allocation`` of the view: the source's status for uncopied clusters."""
        self._check_broken()
        first, last = self._span(offset, length)
        self._check_access(first, last)
        # Shared lock: no copy + zeroing of the source may slip in between the
        # ``done`` check and the source's answer.
        key = await self.locks.acquire(first, last, exclusive=False)
        try:
            self._check_broken()
            # As for reads: requests from before the snapshot instant are part of it.
            await self._wait_pre(offset, length)
            if not self.done[first : last + 1].any():
                return await self.child.block_status(offset, length)
            return [Extent(length, AllocationState(0))]  # data: always a safe answer
        finally:
            self.locks.release(key)


class SnapshotView(BlockNode):
    """The point-in-time view served by a snapshot export.

    As a ``snapshot-access`` node (``access=True``) it may be exported writable,
    as QEMU's: writes are refused (ENOTSUP) and a TRIM is a snapshot discard
    when the node was added with ``discard: unmap`` (QEMU's default ``ignore``
    accepts TRIM and does nothing).  Elsewhere it is read-only.
    """

    def __init__(self, name: str, cbw: CopyBeforeWrite, *, access: bool = False,
                 discard: bool = False) -> None:
        super().__init__(name)
        self.cbw = cbw
        self.access = access
        self.discard = discard

    @property
    def size(self) -> int:
        return self.cbw.size

    @property
    def read_only(self) -> bool:
        return not self.access

    @property
    def can_fast_zero(self) -> bool:
        return False

    async def read(self, offset: int, buf: memoryview, *, sparse: bool = False) -> list[Segment]:
        await self.cbw.snapshot_read(offset, buf)
        return [Segment(0, len(buf), False)]

    def _refuse(self) -> OSError:
        if self.access:  # QEMU's snapshot-access: only reads and discards
            return OSError(errno.ENOTSUP, "a snapshot can only be read or discarded")
        return OSError(errno.EROFS, "snapshot is read-only")

    async def write(self, offset: int, data: memoryview, *, fua: bool = False) -> None:
        raise self._refuse()

    async def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool, fua: bool = False, fast: bool = False
    ) -> None:
        raise self._refuse()

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        if not self.access:
            raise self._refuse()
        if self.discard:
            await self.cbw.snapshot_discard(offset, length)

    async def flush(self) -> None:
        """Nothing to flush: the view never writes."""

    async def cache(self, offset: int, length: int) -> None:
        """Prefetch is only a hint."""

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        return await self.cbw.snapshot_status(offset, length)
