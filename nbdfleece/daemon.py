"""The daemon's state: block graph, NBD exports and NBD listeners, in one place.

The command line and the QMP commands both act through :class:`Daemon`, so
``--export live=live.raw,bitmap=bm0`` and the QMP sequence
``blockdev-add`` / ``block-dirty-bitmap-add`` / ``block-export-add`` build the
same objects.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import trio

from nbdfleece.bitmap import DirtyBitmap
from nbdfleece.block.cbw import BREAK_GUEST_WRITE, BREAK_SNAPSHOT, CopyBeforeWrite, SnapshotView
from nbdfleece.block.file import FileStore
from nbdfleece.block.node import BlockNode, Layer
from nbdfleece.block.tracking import DirtyTracking
from nbdfleece.constants import QEMU_ALLOCATION_DEPTH, QEMU_DIRTY_BITMAP_PREFIX, AllocationState
from nbdfleece.exports import Export, ExportRegistry, ExtentProvider
from nbdfleece.extents import ExtentArray, as_extents
from nbdfleece.graph import BlockGraph, ControlError, GraphNode, id_wellformed
from nbdfleece.qmp.events import EventBroadcaster
from nbdfleece.recovery import Interrupted, JobJournal, recover
from nbdfleece.server import Server, describe_listener, open_listener
from nbdfleece.tls import ServerTls, TlsCredsObject

log = logging.getLogger(__name__)

BitmapRef = str | dict[str, str]

JOB_TRANSITIONS: dict[str, frozenset[str]] = {
    "undefined": frozenset({"created"}),
    "created": frozenset({"running", "aborting", "null"}),
    "running": frozenset({"paused", "ready", "waiting", "aborting"}),
    "paused": frozenset({"running"}),
    "ready": frozenset({"standby", "waiting", "aborting"}),
    "standby": frozenset({"ready"}),
    "waiting": frozenset({"pending", "aborting"}),
    "pending": frozenset({"aborting", "concluded"}),
    "aborting": frozenset({"aborting", "concluded"}),
    "concluded": frozenset({"null"}),
    "null": frozenset(),
}
"""QEMU 7.2's job state transition table (``JobSTT`` in job.c)."""
_ACTIVE = frozenset({"created", "running", "paused", "ready", "standby"})
JOB_VERBS: dict[str, frozenset[str]] = {
    "cancel": _ACTIVE | {"waiting", "pending"},
    "pause": _ACTIVE,
    "resume": _ACTIVE,
    "complete": frozenset({"ready", "standby"}),
    "finalize": frozenset({"pending"}),
    "dismiss": frozenset({"concluded"}),
}
"""In which states a job accepts each command verb (``JobVerbTable``)."""


@dataclass(eq=False)
class Snapshot:
    """A point-in-time export and what keeps it: filter, overlay, view node."""

    name: str
    of_export: str
    overlay: str
    base: GraphNode
    cbw: CopyBeforeWrite
    node: GraphNode
    export: ExportRecord
    target: FileStore


@dataclass(eq=False)
class BackupJob:
    """A ``blockdev-backup`` job; ``sync: none`` (fleecing) runs until cancelled."""

    id: str
    device: GraphNode
    target: GraphNode
    base: GraphNode
    cbw: CopyBeforeWrite
    target_data: BlockNode
    sync: str
    status: str = "undefined"
    bitmap: DirtyBitmap | None = None
    """The live bitmap a push job reads (``sync: bitmap/incremental``, or full/top + bitmap)."""
    frozen: DirtyBitmap | None = None
    """``bitmap`` as it was at the job's start (the live one records from then on)."""
    bitmap_mode: str = "on-success"
    selected: np.ndarray | None = None
    """Push jobs: the clusters the job copies (one bool per copy-before-write cluster)."""
    length: int = 0
    offset: int = 0
    scope: trio.CancelScope | None = None
    auto_finalize: bool = True
    auto_dismiss: bool = True
    started: bool = False
    """``job_start`` ran (a transaction's commit); an unstarted job ends silently."""
    cancelled: bool = False
    user_paused: bool = False
    resumed: trio.Event | None = None
    """Set when a paused push job may go on."""
    error: str | None = None
    """QEMU's ``job->err``: why the job ended unsuccessfully (shown by query-jobs)."""
    speed: int = 0
    """Bytes per second a push job copies at most (0: no limit); ``block-job-set-speed``."""
    rate_start: float = 0.0
    rate_bytes: int = 0
    """Bytes copied since ``rate_start`` (the last change of ``speed``)."""
    txn: JobTxn | None = None
    """Its group, when a ``completion-mode: grouped`` transaction started it."""

    @property
    def group(self) -> list[BackupJob]:
        """The jobs that complete together with this one (itself alone if not grouped)."""
        return self.txn.jobs if self.txn is not None else [self]

    @property
    def push(self) -> bool:
        return self.sync != "none"


@dataclass(eq=False)
class JobTxn:
    """The jobs one ``transaction`` with ``completion-mode: grouped`` started (QEMU's
    JobTxn): they finalize together once all have succeeded, and the first to fail
    or be cancelled cancels the others."""

    jobs: list[BackupJob] = field(default_factory=list)
    aborting: bool = False


_COMPLETED = frozenset({"waiting", "pending", "aborting", "concluded", "null"})
"""QEMU's ``job_is_completed``."""


def _cancelled() -> OSError:
    """The error a cancelled job ends with."""
    return OSError(errno.ECANCELED, os.strerror(errno.ECANCELED))


def check_speed(speed: int) -> int:
    """A job's rate limit as QEMU accepts it (bytes per second, 0 = none)."""
    if speed < 0:
        raise ControlError("Parameter 'speed' expects a non-negative value")
    return speed


@dataclass(eq=False)
class ExportRecord:
    """A block export as QMP sees it (``id`` may differ from the NBD name)."""

    id: str
    node: GraphNode
    export: Export
    bitmaps: list[DirtyBitmap] = field(default_factory=list)


def bitmap_provider(bitmap: DirtyBitmap) -> ExtentProvider:
    async def extents(offset: int, length: int) -> ExtentArray:
        return bitmap.extent_array(offset, length)

    return extents


def allocation_depth_provider(node: GraphNode) -> ExtentProvider:
    """``qemu:allocation-depth``: 1 where this node holds data, 0 for holes."""

    async def extents(offset: int, length: int) -> ExtentArray:
        found = await node.top.block_status(offset, length)
        return as_extents((e.length, 0 if e.flags & AllocationState.HOLE else 1) for e in found)

    return extents


class Daemon:
    """Everything a running nbdfleece serves."""

    def __init__(self, server: Server, data_dir: str = "nbdfleece-data") -> None:
        self.server = server
        self.data_dir = data_dir
        self.snapshots: dict[str, Snapshot] = {}
        self.jobs: dict[str, BackupJob] = {}
        self.grouping: JobTxn | None = None
        """Set while a ``completion-mode: grouped`` transaction applies its actions."""
        self._filters: dict[str, CopyBeforeWrite] = {}
        """copy-before-write node name -> its filter (for snapshot-access)."""
        self._bitmap_fallback: dict[str, GraphNode] = {}
        """Fleecing target -> device: the target's export may name the device's bitmaps."""
        self.graph = BlockGraph()
        self.registry: ExportRegistry = server.registry
        self.exports: dict[str, ExportRecord] = {}
        self._nbd_listeners: list[Callable[[], None]] = []
        self.nbd_addresses: list[str] = []
        self.objects: dict[str, TlsCredsObject] = {}
        """QMP ``object-add`` objects by id (TLS credentials)."""
        self.events = EventBroadcaster()
        """QMP events (``emit_event(name, data)``) go to every connected monitor."""
        self.job_nursery: trio.Nursery | None = None
        """Where push backup jobs run (set by ``serve``; else trio system tasks)."""
        self.journal = JobJournal(data_dir)
        """Overlays and targets being written, for clean-up after a crash (``recovery.py``)."""

    # -- exports -------------------------------------------------------------------
    def add_export(
        self,
        export_id: str,
        node_name: str,
        *,
        name: str | None = None,
        description: str = "",
        writable: bool = False,
        bitmaps: list[BitmapRef] | None = None,
        allocation_depth: bool = False,
    ) -> ExportRecord:
        if export_id in self.exports:
            raise ControlError(f"Block export id '{export_id}' is already in use")
        node = self.graph.node(node_name)
        nbd_name = export_id if name is None else name
        if len(nbd_name.encode()) > 4096:
            raise ControlError("export name too long")
        if self.registry.get(nbd_name) is not None and nbd_name != "":
            raise ControlError(f"NBD server already has export named '{nbd_name}'")
        if writable and node.top.read_only:
            raise ControlError("Cannot export read-only node as writable")
        providers: dict[str, ExtentProvider] = {}
        if allocation_depth:
            providers[QEMU_ALLOCATION_DEPTH] = allocation_depth_provider(node)
        chosen: list[DirtyBitmap] = []
        for ref in bitmaps or []:
            if isinstance(ref, str):
                bitmap = self.find_bitmap(node, ref)
                if bitmap is None:
                    raise ControlError(f"Bitmap '{ref}' is not found")
            else:
                bitmap = self.graph.bitmap(ref["node"], ref["name"])
            if bitmap.inconsistent:
                raise ControlError(f"Bitmap '{bitmap.name}' is inconsistent and cannot be used")
            context = QEMU_DIRTY_BITMAP_PREFIX + bitmap.name
            if context in providers:
                continue  # named twice: QEMU accepts it; the context is offered once
            providers[context] = bitmap_provider(bitmap)
            chosen.append(bitmap)
        export = Export(nbd_name, node.top, read_only=not writable, description=description,
                        providers=providers)
        self.registry.add(export)
        for bitmap in chosen:
            bitmap.busy += 1
        node.users += 1
        record = ExportRecord(export_id, node, export, chosen)
        self.exports[export_id] = record
        log.info("export '%s' of node '%s' added%s", nbd_name, node_name,
                 f" with bitmaps {[b.name for b in chosen]}" if chosen else "")
        return record

    def find_bitmap(self, node: GraphNode, name: str) -> DirtyBitmap | None:
        """A bitmap by name on ``node``, else on the device it is fleecing (QEMU
        searches the backing chain, where the live node sits)."""
        bitmap = node.bitmaps.get(name)
        fallback = self._bitmap_fallback.get(node.name)
        if bitmap is None and fallback is not None:
            bitmap = fallback.bitmaps.get(name)
        return bitmap

    def remove_export(self, export_id: str) -> None:
        record = self.exports.get(export_id)
        if record is None:
            raise ControlError(f"Export '{export_id}' is not found")
        self.registry.remove(record.export.name)
        for bitmap in record.bitmaps:
            bitmap.busy -= 1
        record.node.users -= 1
        del self.exports[export_id]
        log.info("export '%s' removed", record.export.name)
        self.events.emit_event("BLOCK_EXPORT_DELETED", {"id": export_id})

    # -- point-in-time snapshots (copy-before-write) --------------------------------
    def create_snapshot(
        self,
        name: str,
        of_export: str,
        *,
        bitmap: str | None = None,
        on_cbw_error: str = BREAK_GUEST_WRITE,
    ) -> Snapshot:
        """A read-only export ``name``: ``of_export`` as it is now, kept by copy-before-write.

        With ``bitmap``, the snapshot export also offers a frozen copy of that
        bitmap as ``qemu:dirty-bitmap:BITMAP``, and the live bitmap is cleared so
        that it records from this instant.  Everything between the checks and
        the new export happens in one event-loop step: no request can run in
        between, which makes the snapshot and the bitmap rotation atomic.
        """
        if name in self.snapshots or name in self.exports or self.registry.get(name):
            raise ControlError(f"Block export id '{name}' is already in use")
        record = self.exports.get(of_export)
        if record is None:
            raise ControlError(f"Export '{of_export}' is not found")
        live = record.node
        base = self._image_node(live)
        store = base.image()
        if store is None:
            raise ControlError(f"Node '{live.name}' has no image to snapshot")
        source = live.bitmaps.get(bitmap) if bitmap else None
        if bitmap is not None:
            if source is None:
                raise ControlError(f"Dirty bitmap '{bitmap}' not found")
            # Busy (exported) is fine here: freeze + clear happen in the same
            # event-loop step as the snapshot, so NBD readers of the live bitmap
            # see either the old or the new state, never a mix.
            self.graph._usable(source, modify=False)
        os.makedirs(self.data_dir, exist_ok=True)
        overlay = os.path.join(self.data_dir, f"snapshot-{name}.overlay")
        self.journal.record(f"snapshot:{name}", "snapshot", name, overlay, owned=True)
        with open(overlay, "wb") as f:
            f.truncate(base.top.size)  # the disk's size (for qcow2 not its file's)
        target = FileStore(f"{name}-overlay", overlay)
        # ---- from here on, no await: the snapshot instant --------------------------
        cbw = self._new_cbw(base, f"{name}-cbw", target, on_cbw_error)
        cbw.target_ready = self.journal.synced_event()
        base.top.child = cbw
        view = SnapshotView(name, cbw)
        node = GraphNode(f"snapshot-{name}", "snapshot-access", DirtyTracking(name, view))
        self.graph.nodes[node.name] = node
        if source is not None and bitmap is not None:
            frozen = DirtyBitmap(bitmap, source.size, source.granularity, recording=False)
            frozen.copy_from(source)
            source.clear()
            node.bitmaps[bitmap] = frozen
        export = self.add_export(name, node.name, name=name, writable=False,
                                 description=f"snapshot of {of_export}",
                                 bitmaps=[bitmap] if bitmap else [])
        snapshot = Snapshot(name, of_export, overlay, base, cbw, node, export, target)
        self.snapshots[name] = snapshot
        log.info("snapshot '%s' of '%s' created%s", name, of_export,
                 f" with frozen bitmap '{bitmap}'" if bitmap else "")
        return snapshot

    async def delete_snapshot(self, name: str) -> None:
        snapshot = self.snapshots.get(name)
        if snapshot is None:
            raise ControlError(f"Snapshot '{name}' is not found")
        self.remove_export(snapshot.export.id)
        snapshot.cbw.deleted = True  # clients still connected must not fall through to live data
        self._unlink(snapshot.base, snapshot.cbw)
        self.graph.nodes.pop(snapshot.node.name, None)
        del self.snapshots[name]
        await snapshot.cbw.drain()  # no copy may still be writing to the fd being closed
        await snapshot.target.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(snapshot.overlay)
        self.journal.forget(f"snapshot:{name}")
        log.info("snapshot '%s' deleted (%d bytes were copied)", name, snapshot.cbw.copied_bytes)

    def _image_node(self, node: GraphNode) -> GraphNode:
        """Where a copy-before-write filter goes for ``node``: the lowest node of
        its chain whose bytes are still the guest's.  Down through pass-through
        nodes (``raw``, filters) to the file store, so that writes through any
        parent are seen; never below a format driver (qcow2), under which lie
        the image file's bytes (header, tables, clusters), nor below ``nbd``."""
        while node.store is None and node.format_node is None and node.children:
            node = node.children[0]
        return node

    # -- blockdev-backup jobs ---------------------------------------------------------
    def add_cbw_node(self, name: str, file: GraphNode, target: GraphNode, *,
                     on_cbw_error: str = BREAK_GUEST_WRITE, bitmap: DirtyBitmap | None = None,
                     cbw_timeout: float = 0.0) -> GraphNode:
        """``blockdev-add driver=copy-before-write``: from now on, old data of ``file``
        is copied into ``target`` before it is overwritten.

        Unlike QEMU 7.2 the filter is inserted, in one event-loop step, under the
        image node of ``file``, so writes that arrive through any parent (a running
        export included) are covered: no ``blockdev-reopen``, no pause of writers.
        The node itself reads and writes like ``file``.  With ``bitmap`` only its
        clusters are copied and readable through ``snapshot-access`` (the bitmap
        is read once, now); ``cbw_timeout`` bounds each copy, see ``block/cbw.py``.
        """
        if target is file or self._image_node(target) is self._image_node(file):
            raise ControlError("Source and target cannot be the same")
        if target.top.size < file.top.size:
            raise ControlError("Source and target image have different sizes")
        self.graph._check_new_name(name)
        base = self._image_node(file)
        if bitmap is not None:  # QEMU's bdrv_merge_dirty_bitmap checks, with its prefixes
            problem = (f"Bitmap '{bitmap.name}' is inconsistent and cannot be used" if bitmap.inconsistent
                       else "Bitmaps are incompatible and can't be merged"
                       if bitmap.size != file.top.size else None)
            if problem is not None:
                raise ControlError(f"Cannot create block-copy-state: Failed to merge bitmap "
                                   f"'{bitmap.name}' to internal copy-bitmap: {problem}")
        cbw = self._new_cbw(base, name, target.top, on_cbw_error, bitmap=bitmap,
                            cbw_timeout=cbw_timeout)
        base.top.child = cbw
        node = GraphNode(name, "copy-before-write", DirtyTracking(name, Layer(name, file.top)),
                         children=[file, target])
        self._filters[name] = cbw

        def detach() -> None:
            self._unlink(base, cbw)
            cbw.deleted = True
            self._filters.pop(name, None)
            self.journal.forget(f"cbw:{name}")

        node.detach = detach
        image = target.image()
        if image is not None:
            self.journal.record(f"cbw:{name}", "copy-before-write node", name, image.path)
            cbw.target_ready = self.journal.synced_event()
        file.users += 1
        target.users += 1
        self.graph.nodes[name] = node
        return node

    def add_snapshot_access(self, name: str, file: GraphNode, *, discard: bool = False) -> GraphNode:
        """``blockdev-add driver=snapshot-access``: the point-in-time view of a
        copy-before-write node.  Exported writable, it takes TRIM as a snapshot
        discard when ``discard`` (QEMU's ``discard: unmap``), see ``SnapshotView``."""
        cbw = self._filters.get(file.name)
        if cbw is None:
            raise ControlError(f"Node '{file.name}' is not a copy-before-write filter")
        self.graph._check_new_name(name)
        view = SnapshotView(name, cbw, access=True, discard=discard)
        node = GraphNode(name, "snapshot-access", DirtyTracking(name, view),
                         children=[file])
        file.users += 1
        self.graph.nodes[name] = node
        return node

    @staticmethod
    def _new_cbw(base: GraphNode, name: str, target: BlockNode, on_cbw_error: str, *,
                 bitmap: DirtyBitmap | None = None, cbw_timeout: float = 0.0) -> CopyBeforeWrite:
        """A filter for insertion right under ``base``'s tracking layer.

        Its child and the requests it must wait for (those already below the
        tracking layer) come from that same layer; the caller inserts it
        (``base.top.child = cbw``) with no await in between.
        """
        tracking = base.top
        return CopyBeforeWrite(name, tracking.child, target, pre_inflight=tracking.in_flight(),
                               on_cbw_error=on_cbw_error, bitmap=bitmap, cbw_timeout=cbw_timeout)

    def _job_nodes(self, job_id: str, device: str, target: str) -> tuple[GraphNode, GraphNode]:
        """The checks every backup job starts with, in QEMU's order: (source, target) nodes."""
        source = self.graph.node(device)
        dest = self.graph.node(target)
        if dest is source or self._image_node(dest) is self._image_node(source):
            raise ControlError("Source and target cannot be the same")
        if dest.top.size < source.top.size:
            raise ControlError("Source and target image have different sizes")
        if not id_wellformed(job_id):  # no job-id: QEMU's default, the BlockBackend's name, is ''
            raise ControlError(f"Invalid job ID '{job_id}'")
        if job_id in self.jobs:
            raise ControlError(f"Job ID '{job_id}' already in use")
        return source, dest

    def start_fleecing(
        self, job_id: str, device: str, target: str, *, on_cbw_error: str = BREAK_GUEST_WRITE,
        auto_finalize: bool = True, auto_dismiss: bool = True,
    ) -> BackupJob:
        """``blockdev-backup sync=none``: from now on ``target`` reads as ``device`` did now.

        Synchronous on purpose (a transaction action): the filter goes in, in
        one event-loop step, under the device's image node, copying old data
        into the target's data layer; the target's reads are switched to the
        point-in-time view.  The job is ``created``; :meth:`start_job` runs it.
        """
        source, dest = self._job_nodes(job_id, device, target)
        if any(j.target is dest and j.status != "concluded" for j in self.jobs.values()):
            raise ControlError(f"Node '{target}' is busy: block device is in use by block job: backup")
        base = self._image_node(source)
        data = dest.top.child
        cbw = self._new_cbw(base, job_id, data, on_cbw_error)
        base.top.child = cbw
        dest.top.child = SnapshotView(dest.name, cbw)
        self._bitmap_fallback[dest.name] = source
        source.users += 1  # neither end may be deleted while the job exists
        dest.users += 1
        job = BackupJob(job_id, source, dest, base, cbw, data, "none",
                        auto_finalize=auto_finalize, auto_dismiss=auto_dismiss)
        self.jobs[job_id] = job
        self._journal_job(job)
        self._transition(job, "created")
        return job

    def start_push_backup(
        self,
        job_id: str,
        device: str,
        target: str,
        sync: str,
        *,
        bitmap: str | None = None,
        bitmap_mode: str | None = None,
        auto_finalize: bool = True,
        auto_dismiss: bool = True,
    ) -> BackupJob:
        """``blockdev-backup`` with ``sync`` full, top, bitmap or incremental.

        The same copy-before-write filter as fleecing keeps the job's view at
        the start instant while guest writes go on; once started
        (:meth:`start_job`) a background task copies the chosen clusters into
        ``target`` in order.  Everything here happens in one event-loop step
        (a transaction action); the job is ``created``.
        """
        source, dest = self._job_nodes(job_id, device, target)
        if dest.top.read_only:
            raise ControlError(f"Node '{target}' is read-only")
        if any(j.target is dest and j.status != "concluded" for j in self.jobs.values()):
            raise ControlError(f"Node '{target}' is busy: block device is in use by block job: backup")
        live_bitmap: DirtyBitmap | None = None
        if bitmap is not None:
            live_bitmap = source.bitmaps.get(bitmap)
            if live_bitmap is None:
                raise ControlError(f"Bitmap '{bitmap}' could not be found")
            self.graph._usable(live_bitmap, modify=True)
        base = self._image_node(source)
        # ---- from here on, no await: the job's point in time ------------------------
        # A copy that fails (a full target) never fails the guest's write: the
        # filter breaks instead and the job fails at its next step.
        cbw = self._new_cbw(base, job_id, dest.top, BREAK_SNAPSHOT)
        selected = np.ones(cbw.pending.size, dtype=bool)
        frozen: DirtyBitmap | None = None
        if live_bitmap is not None:
            frozen = DirtyBitmap(live_bitmap.name, live_bitmap.size, live_bitmap.granularity,
                                 recording=False)
            frozen.copy_from(live_bitmap)
            live_bitmap.clear()
            live_bitmap.busy += 1
            if sync in ("bitmap", "incremental"):
                clusters = DirtyBitmap("selected", cbw.size, cbw.cluster, recording=False)
                clusters.merge_from(frozen)
                selected = clusters.bits.copy()
        cbw.restrict(selected)  # guest writes copy only clusters the job wants
        length = cbw.size
        if sync in ("bitmap", "incremental"):
            n = int(np.count_nonzero(selected))
            length = n * cbw.cluster
            if n and selected[-1]:
                length -= cbw.pending.size * cbw.cluster - cbw.size
        base.top.child = cbw
        source.users += 1  # neither end may be deleted while the job exists
        dest.users += 1
        job = BackupJob(job_id, source, dest, base, cbw, dest.top, sync, bitmap=live_bitmap,
                        frozen=frozen, bitmap_mode=bitmap_mode or "on-success",
                        selected=selected, length=length, scope=trio.CancelScope(),
                        auto_finalize=auto_finalize, auto_dismiss=auto_dismiss)
        self.jobs[job_id] = job
        self._journal_job(job)
        self._transition(job, "created")
        log.info("backup job '%s' (%s) of '%s' to '%s' created", job_id, sync, device, target)
        return job

    def start_job(self, job: BackupJob) -> None:
        """QEMU's ``job_start`` (a transaction's commit): ``created`` -> ``running``."""
        job.started = True
        self._transition(job, "running")
        if not job.push:
            return
        if self.job_nursery is not None:
            self.job_nursery.start_soon(self._run_push, job, name=f"backup-job-{job.id}")
        else:
            trio.lowlevel.spawn_system_task(self._run_push, job, name=f"backup-job-{job.id}")

    async def _run_push(self, job: BackupJob) -> None:
        assert job.scope is not None and job.selected is not None
        cbw = job.cbw
        chunk = 16  # clusters per step (1 MiB)
        error: OSError | None = None
        with job.scope:
            try:
                for first in range(0, cbw.pending.size, chunk):
                    await self._pause_point(job)
                    if cbw.broken is not None:  # a guest write's copy failed
                        raise cbw.broken
                    last = min(first + chunk, cbw.pending.size) - 1
                    wanted = job.selected[first : last + 1]
                    copied = 0
                    if cbw.pending[first : last + 1].any():
                        copied = await cbw.copy_range(first * cbw.cluster, (last + 1 - first) * cbw.cluster,
                                                      allocated_only=job.sync == "top")
                    else:
                        await trio.lowlevel.checkpoint()
                    n = int(np.count_nonzero(wanted))
                    job.offset = min(job.offset + n * cbw.cluster, job.length)
                    await self._throttle(job, copied)
                if cbw.broken is not None:
                    raise cbw.broken
                await job.target_data.flush()
            except OSError as exc:
                error = exc
            except Exception as exc:  # a bug: report it as the job's error, keep serving
                log.exception("backup job '%s' failed", job.id)
                error = OSError(str(exc))
        if job.status != "running":  # cancelled meanwhile: cancel_job has settled it
            return
        if error is None:
            log.info("backup job '%s' completed (%d bytes)", job.id, job.length)
        else:
            log.error("backup job '%s' failed: %s", job.id, error)
            self.events.emit_event("BLOCK_JOB_ERROR", {
                "device": job.id, "operation": cbw.copy_op, "action": "report",
            })
        self._job_completed(job, error)

    def set_job_speed(self, job: BackupJob, speed: int) -> None:
        """``block-job-set-speed`` (and ``blockdev-backup``'s ``speed``): takes effect
        at once, a job waiting for its rate wakes within a tenth of a second."""
        job.speed = check_speed(speed)
        job.rate_start = trio.current_time()
        job.rate_bytes = 0

    @staticmethod
    async def _throttle(job: BackupJob, copied: int) -> None:
        """Hold a push job to ``job.speed`` on average since the speed was set
        (QEMU's job rate limit, with its 100 ms slices)."""
        job.rate_bytes += copied
        while job.speed:
            ahead = job.rate_bytes / job.speed - (trio.current_time() - job.rate_start)
            if ahead <= 0:
                return
            await trio.sleep(min(ahead, 0.1))

    async def _pause_point(self, job: BackupJob) -> None:
        """Where a running push job honours ``job-pause`` (QEMU's job_pause_point)."""
        if not job.user_paused:
            return
        self._transition(job, "paused")
        while job.user_paused:
            job.resumed = trio.Event()
            await job.resumed.wait()
        if job.status == "paused":
            self._transition(job, "running")

    # -- the job state machine (QEMU's job.c) ---------------------------------------------
    def _job_completed(self, job: BackupJob, error: OSError | None) -> None:
        """The job's work is over (``job_completed``): success waits for
        finalization, a failure or a cancel aborts."""
        if error is None and not job.cancelled:
            self._transition(job, "waiting")
            group = job.group
            if any(other.status not in _COMPLETED for other in group):
                return  # grouped: the last job to complete moves them all on
            for other in group:
                self._transition(other, "pending")
                if not other.auto_finalize:
                    self.events.emit_event("BLOCK_JOB_PENDING", {"type": "backup", "id": other.id})
            if any(not other.auto_finalize for other in group):
                return
            for other in list(group):
                self._finalize(other)
        else:
            self._abort(job, error or _cancelled())

    def _abort(self, job: BackupJob, error: OSError) -> None:
        """The job failed or was cancelled; in a group, every other job of it is
        cancelled and they all end (QEMU's job_completed_txn_abort), in creation order."""
        txn = job.txn
        if txn is None or txn.aborting:
            self._abort_one(job, error)
            return
        txn.aborting = True
        for other in txn.jobs:
            if other is not job and other.status not in ("aborting", "concluded", "null"):
                self._stop(other)
        for other in list(txn.jobs):
            if other.status not in ("concluded", "null"):
                self._abort_one(other, error if other is job else _cancelled())

    def _abort_one(self, job: BackupJob, error: OSError) -> None:
        if job.error is None:
            job.error = os.strerror(error.errno) if error.errno else str(error)
        if job.status != "aborting":
            self._transition(job, "aborting")
        self._finalize(job, error)

    def _finalize(self, job: BackupJob, error: OSError | None = None) -> None:
        """``job_finalize_single``: commit or abort, clean up, report, conclude."""
        self._clean(job, error)
        job.target.users -= 1  # as in QEMU, a concluded job's target can be deleted
        if job.started:
            offset, length = self.job_progress(job)
            data: dict[str, object] = {"device": job.id, "len": length, "offset": offset,
                                       "speed": job.speed, "type": "backup"}
            if job.cancelled:
                self.events.emit_event("BLOCK_JOB_CANCELLED", data)
            else:
                if job.error is not None:
                    data["error"] = job.error
                self.events.emit_event("BLOCK_JOB_COMPLETED", data)
        self._transition(job, "concluded")
        if job.auto_dismiss or not job.started:
            self._dismiss(job)

    def _clean(self, job: BackupJob, error: OSError | None) -> None:
        """Settle the bitmap (commit/abort) and take the filter out (clean)."""
        if job.scope is not None:
            job.scope.cancel()
        self._unlink(job.base, job.cbw)
        if not job.push:
            job.cbw.deleted = True  # clients still reading must not fall through to live data
            job.target.top.child = job.target_data
            self._bitmap_fallback.pop(job.target.name, None)
        self._journal_job_done(job, error)
        if job.bitmap is None or job.frozen is None:
            return
        job.bitmap.busy -= 1
        if error is None:
            if job.bitmap_mode == "never":
                job.bitmap.merge_from(job.frozen)
        elif job.bitmap_mode == "always":
            assert job.selected is not None
            uncopied = DirtyBitmap("uncopied", job.cbw.size, job.cbw.cluster, recording=False)
            uncopied.bits = job.selected & job.cbw.pending
            if job.sync in ("bitmap", "incremental"):
                job.bitmap.merge_from(uncopied)
            else:  # full/top: only what was dirty and not copied
                kept = DirtyBitmap("kept", job.frozen.size, job.frozen.granularity, recording=False)
                kept.merge_from(uncopied)
                kept.bits &= job.frozen.bits
                job.bitmap.merge_from(kept)
        else:
            job.bitmap.merge_from(job.frozen)

    def _dismiss(self, job: BackupJob) -> None:
        self._transition(job, "null")
        del self.jobs[job.id]
        job.device.users -= 1

    def _transition(self, job: BackupJob, status: str) -> None:
        """Change the job's status (QEMU's allowed transitions) and tell every monitor."""
        if status not in JOB_TRANSITIONS[job.status]:
            raise AssertionError(f"job '{job.id}': {job.status} -> {status} is not a transition")
        changed = status != job.status
        job.status = status
        if changed:
            self.events.emit_event("JOB_STATUS_CHANGE", {"status": status, "id": job.id})

    @staticmethod
    def _verb(job: BackupJob, verb: str) -> None:
        if job.status not in JOB_VERBS[verb]:
            raise ControlError(
                f"Job '{job.id}' in state '{job.status}' cannot accept command verb '{verb}'")

    # -- job commands (job-* by id, block-job-* by device) ---------------------------------
    def find_job(self, job_id: str, *, block: bool) -> BackupJob:
        job = self.jobs.get(job_id)
        if job is None:
            if block:
                raise ControlError(f"Block job '{job_id}' not found", "DeviceNotActive")
            raise ControlError("Job not found")
        return job

    def cancel_job(self, job: BackupJob) -> None:
        """``job-cancel`` / ``block-job-cancel`` (a backup job always cancels hard)."""
        self._verb(job, "cancel")
        self._stop(job)
        log.info("job '%s' cancelled (%s)", job.id, job.status)
        self._abort(job, _cancelled())

    def _stop(self, job: BackupJob) -> None:
        """Mark a job cancelled and stop its work (it is ended by ``_abort``)."""
        job.cancelled = True
        if job.user_paused:
            job.user_paused = False
            if job.resumed is not None:
                job.resumed.set()
        if job.status == "paused":
            self._transition(job, "running")
        if job.scope is not None:
            job.scope.cancel()

    def cancel_all_jobs(self) -> None:
        """At shutdown (QEMU's job_cancel_sync_all): cancel or dismiss every job."""
        for job in self.jobs_newest_first():
            if job.status == "concluded":
                self._dismiss(job)
            elif job.status not in ("aborting", "null"):  # a grouped job may have ended with another
                self.cancel_job(job)

    def pause_job(self, job: BackupJob) -> None:
        self._verb(job, "pause")
        if job.user_paused:
            raise ControlError("Job is already paused")
        job.user_paused = True
        if not job.push and job.status == "running":
            self._transition(job, "paused")  # nothing to wait for: paused at once

    def resume_job(self, job: BackupJob) -> None:
        if not job.user_paused:
            raise ControlError("Can't resume a job that was not paused")
        self._verb(job, "resume")
        job.user_paused = False
        if job.resumed is not None:
            job.resumed.set()
        if not job.push and job.status == "paused":
            self._transition(job, "running")

    def complete_job(self, job: BackupJob) -> None:
        """Backup jobs are never ``ready``: QEMU refuses ``complete`` by the verb table."""
        self._verb(job, "complete")
        raise ControlError(f"The active block job '{job.id}' cannot be completed")

    def finalize_job(self, job: BackupJob) -> None:
        """``job-finalize``: of a grouped job, finalizes its whole group (all are pending)."""
        self._verb(job, "finalize")
        for other in list(job.group):
            if other.status == "pending":
                self._finalize(other)

    def dismiss_job(self, job: BackupJob) -> None:
        self._verb(job, "dismiss")
        self._dismiss(job)

    def job_progress(self, job: BackupJob) -> tuple[int, int]:
        """``(offset, len)`` as QEMU reports them."""
        if job.push:
            return job.offset, job.length
        return job.cbw.copied_bytes, job.device.top.size

    def job_info(self, job: BackupJob) -> dict[str, object]:
        """``query-block-jobs``' BlockJobInfo."""
        offset, length = self.job_progress(job)
        info: dict[str, object] = {
            "auto-finalize": job.auto_finalize, "io-status": "ok", "device": job.id,
            "auto-dismiss": job.auto_dismiss, "busy": job.push and job.status == "running",
            "len": length, "offset": offset, "status": job.status, "paused": job.user_paused,
            "speed": job.speed, "ready": False, "type": "backup",
        }
        if job.error is not None:
            info["error"] = job.error
        return info

    def job_query(self, job: BackupJob) -> dict[str, object]:
        """``query-jobs``' JobInfo."""
        offset, length = self.job_progress(job)
        info: dict[str, object] = {"id": job.id, "type": "backup", "status": job.status,
                                   "current-progress": offset, "total-progress": length}
        if job.error is not None:
            info["error"] = job.error
        return info

    def jobs_newest_first(self) -> list[BackupJob]:
        """QEMU lists its jobs newest first."""
        return list(reversed(self.jobs.values()))

    # -- crash recovery (recovery.py) ------------------------------------------------------
    def recover_interrupted(self) -> list[Interrupted]:
        """At start-up: remove the overlays and report the targets a killed server left."""
        try:
            return recover(self.journal)
        except OSError as exc:
            log.error("cannot look for interrupted jobs in %s: %s", self.data_dir, exc)
            return []

    def _journal_job(self, job: BackupJob) -> None:
        image = job.target.image()
        if image is not None:
            kind = "backup job" if job.push else "fleecing job"
            self.journal.record(f"job:{job.id}", kind, job.id, image.path)
            job.cbw.target_ready = self.journal.synced_event()  # nothing copied before that

    def _journal_job_done(self, job: BackupJob, error: OSError | None) -> None:
        self.journal.forget(f"job:{job.id}", completed_full=error is None and job.sync == "full")

    @staticmethod
    def _unlink(base: GraphNode, cbw: CopyBeforeWrite) -> None:
        """Take a filter out of ``base``'s chain; guest writes already inside it
        then pass without copying (``CopyBeforeWrite.retired``)."""
        cbw.retired = True
        layer: BlockNode = base.top
        while isinstance(layer, Layer):
            if layer.child is cbw:
                layer.child = cbw.child
                return
            layer = layer.child

    # -- NBD listeners -------------------------------------------------------------
    def nbd_server_start(self, addresses: list[str], tls: ServerTls | None = None) -> None:
        """Listen on ``addresses``; ``tls`` (QMP tls-creds) overrides the server's TLS."""
        if self._nbd_listeners:
            raise ControlError("NBD server already running")
        socks = []
        try:
            for spec in addresses:
                socks.append(open_listener(spec))
                self.server.check_listener(socks[-1], tls)  # no plaintext on the network
        except (OSError, ValueError) as exc:
            for sock in socks:
                sock.close()
            raise ControlError(f"Failed to listen on {spec}: {exc}") from None
        self.nbd_addresses = [describe_listener(s) for s in socks]
        self._nbd_listeners = [self.server.add_listener(s, tls) for s in socks]
        for address in self.nbd_addresses:
            log.info("NBD server listening on %s", address)

    def nbd_server_stop(self) -> None:
        if not self._nbd_listeners:
            raise ControlError("NBD server not running")
        for stop in self._nbd_listeners:
            stop()
        self._nbd_listeners = []
        self.nbd_addresses = []

    async def close(self) -> None:
        self.cancel_all_jobs()
        for name in list(self.snapshots):
            await self.delete_snapshot(name)
        await self.graph.close()
        await self.journal.aclose()
