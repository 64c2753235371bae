"""Full and incremental backups: snapshot over QMP, read over NBD, write a qcow2 image.

One backup, in order::

    lock the folder, finish/undo what a killed run left (folder and server)
    decide: incremental only if the bitmap of the chain's last backup is there,
            consistent, recording and free; otherwise say why and take a full one
    snapshot + bitmap rotation (one QMP transaction), read-only snapshot export
    plan: block status over the whole disk, in chunks of the server's maximum
          block size, on every connection at once (base:allocation, and for an
          incremental qemu:dirty-bitmap:OLD)
    copy: pieces of up to 4 MiB, over several connections, hashed and written
          into point-NNNN.qcow2.tmp (zero pieces become zero clusters)
    commit: fsync + rename the image, then the manifest (the commit point)
    teardown: export, job, overlay; old bitmap removed (on failure: merged back)
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from nbdfleece.client import NbdClient, NbdError
from nbdfleece.constants import QEMU_DIRTY_BITMAP_PREFIX
from nbdfleece_backup.connections import Connections, Tls, describe, export_uri, open_connections, tls_for
from nbdfleece_backup.errors import BackupError
from nbdfleece_backup.image import ImageWriter
from nbdfleece_backup.plan import (
    DEFAULT_CHECKSUM,
    PIECE,
    Piece,
    data_ranges,
    dirty_ranges,
    pieces,
    plan_full,
    plan_incremental,
    split,
)
from nbdfleece_backup.progress import Progress, human, rate
from nbdfleece_backup.qmp import Qmp
from nbdfleece_backup.snapshot import BitmapState, ServerSide, Snapshot
from nbdfleece_backup.store import MAX_CHAIN_IMAGES, Folder, Manifest, Point, image_name, now_iso

BASE_ALLOCATION = "base:allocation"
PIPELINE = 2
"""Pieces being read per connection."""
BUFFERS_PER_READER = 2
"""Piece buffers per reader: one being read, one being hashed and written."""


@dataclass
class BackupOptions:
    server: str
    qmp: str
    export: str
    folder: Path
    incremental: bool
    scratch: Path | None = None
    connections: int = 4
    on_snapshot: str | None = None
    checksum: str = DEFAULT_CHECKSUM
    tls_certificates: Path | None = None
    """For an ``nbds://`` server: ca-cert.pem, client-cert.pem, client-key.pem (libnbd's layout)."""


@dataclass
class CopyStats:
    disk_size: int
    bytes_read: int = 0
    data_bytes: int = 0
    zero_bytes: int = 0
    dirty_bytes: int | None = None
    seconds: float = 0.0


def incremental_blocker(manifest: Manifest, bitmaps: dict[str, BitmapState], size: int) -> str | None:
    """Why an incremental backup cannot be taken now (None: it can)."""
    last = manifest.last
    if last is None:
        return "the folder holds no backup yet"
    if last.disk_size != size:
        return f"the disk size changed ({last.disk_size} -> {size} bytes)"
    state = bitmaps.get(last.bitmap)
    if state is None:
        return (f"bitmap '{last.bitmap}', which records the changes since point {last.seq}, is not on the "
                "server (it was restarted without persistent bitmaps, or the bitmap was removed)")
    if state.inconsistent:
        return (f"bitmap '{last.bitmap}' is inconsistent: the server stopped without saving it "
                f"(killed or crashed), so changes since point {last.seq} may be missing from it")
    if state.busy:
        return f"bitmap '{last.bitmap}' is in use by another operation on the server"
    if not state.recording:
        return f"bitmap '{last.bitmap}' is disabled: changes since point {last.seq} may have been missed"
    images = len(manifest.chain(last.seq))
    if images >= MAX_CHAIN_IMAGES:  # one more would make a chain no restore can open
        return (f"point {last.seq} already sits on a chain of {images} images, the most a restore "
                "opens (prune merges old points into newer ones)")
    return None


async def backup(opts: BackupOptions, progress: Progress) -> Point:
    tls = tls_for(opts.server, opts.tls_certificates)  # a bad address or folder fails before anything
    async with Folder(opts.folder, create=True) as folder:
        for line in folder.recovered:
            progress.note(f"recovered: {line}")
        manifest = folder.manifest
        if manifest.export is not None and manifest.export != opts.export:
            raise BackupError(f"{opts.folder} holds backups of export '{manifest.export}', "
                              f"not '{opts.export}'", 2)
        scratch = opts.scratch if opts.scratch is not None else opts.folder / ".scratch"
        async with await Qmp.connect(opts.qmp) as qmp:
            server = ServerSide(qmp, opts.export, manifest.id)
            await server.find_export()
            last = manifest.last
            for line in await server.clean_leftovers(last.bitmap if last else None, scratch):
                progress.note(f"recovered: {line} (left by an interrupted run)")
            note = None
            kind = "incremental" if opts.incremental else "full"
            if opts.incremental:
                bitmaps = await server.bitmaps()
                reason = incremental_blocker(manifest, bitmaps, server.size)
                if reason is not None:
                    note = f"full backup instead of incremental: {reason}"
                    progress.note(f"cannot take an incremental backup: {reason}; "
                                  "taking a full backup instead")
                    kind = "full"
                    state = bitmaps.get(last.bitmap) if last else None
                    if state is not None and state.inconsistent:
                        await server.remove_bitmap(state.name)  # the only thing it allows
            return await _backup(folder, server, opts, tls, kind, note, scratch, progress)


async def _backup(folder: Folder, server: ServerSide, opts: BackupOptions, tls: Tls | None, kind: str,
                  note: str | None, scratch: Path, progress: Progress) -> Point:
    manifest = folder.manifest
    last = manifest.last
    if server.size % 512:
        raise BackupError(f"export '{opts.export}' is {server.size} bytes, not a multiple of 512: "
                          "a qcow2 image cannot hold it")
    seq = manifest.next_seq
    old = last.bitmap if kind == "incremental" and last is not None else None
    started = time.monotonic()
    snapshot_time = now_iso()
    snap = await server.start(scratch, seq, old)
    if not snap.persistent:
        progress.note(f"node '{server.node}' cannot hold persistent bitmaps: after a server restart "
                      "the next backup will be a full one")
    try:
        if opts.on_snapshot:
            await _run_hook(opts, tls, snap, kind)
        final = folder.image_path(image_name(seq))
        backing = last.file if kind == "incremental" and last is not None else None
        writer = ImageWriter(final, server.size, backing, opts.checksum)
        copy_started = time.monotonic()
        stats = await copy_snapshot(opts, tls, snap, writer, progress)
        image_size = await writer.commit()
        copy_seconds = round(time.monotonic() - copy_started, 3)
        point = Point(
            seq=seq, kind=kind, file=final.name, backing=backing, snapshot_time=snapshot_time,
            finished=now_iso(), disk_size=server.size, image_size=image_size,
            bytes_read=stats.bytes_read, data_bytes=stats.data_bytes, zero_bytes=stats.zero_bytes,
            dirty_bytes=stats.dirty_bytes, bitmap=snap.new_bitmap, read_bitmap=old,
            checksum=writer.digest.hexdigest(), seconds=round(time.monotonic() - started, 3),
            copy_seconds=copy_seconds, note=note,
        )
        manifest.points.append(point)
        manifest.next_seq = seq + 1
        manifest.export = opts.export
        manifest.disk_size = server.size
        try:
            folder.save()
        except BaseException:
            manifest.points.pop()
            manifest.next_seq = seq
            with contextlib.suppress(OSError):
                os.unlink(final)
            raise
    except BaseException:
        with trio.CancelScope(shield=True):
            try:
                await server.finish(snap, success=False)
            except BackupError as exc:  # the first failure is the one to report
                progress.note(f"could not undo the snapshot on the server ({exc}); the next run cleans up")
        raise
    try:
        await server.finish(snap, success=True)
    except BackupError as exc:
        progress.note(f"warning: the backup is complete, but tearing the snapshot down failed: {exc}; "
                      "the next run cleans up")
    try:
        await server.remove_bitmaps(keep=snap.new_bitmap)
    except BackupError as exc:
        progress.note(f"warning: could not remove the previous bitmap: {exc}")
    point.seconds = round(time.monotonic() - started, 3)
    return point


async def _run_hook(opts: BackupOptions, tls: Tls | None, snap: Snapshot, kind: str) -> None:
    """``--on-snapshot CMD``: runs while the snapshot export exists, before the agent reads it."""
    assert opts.on_snapshot is not None
    env = dict(os.environ)
    env.update(NBDFLEECE_SNAPSHOT_URI=export_uri(opts.server, snap.name, tls),
               NBDFLEECE_SNAPSHOT_EXPORT=snap.name, NBDFLEECE_BACKUP_KIND=kind,
               NBDFLEECE_SNAPSHOT_BITMAP=snap.old_bitmap or "")
    result = await trio.run_process(opts.on_snapshot, shell=True, env=env, check=False,
                                    stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise BackupError(f"the --on-snapshot command exited with status {result.returncode}")


async def _status(conns: Connections, context: str, size: int, step: int) -> list[tuple[int, int, int]]:
    """Extents of ``context`` over the whole disk: chunks of ``step`` bytes, spread over the connections."""
    chunks = split(0, size, step)
    found: list[list[tuple[int, int, int]]] = [[] for _ in chunks]
    todo = iter(enumerate(chunks))

    async def worker(slot: int) -> None:
        for i, (offset, length) in todo:
            async def walk(client: NbdClient, offset: int = offset, length: int = length
                           ) -> list[tuple[int, int, int]]:
                return [e async for e in client.extents(context, offset, length, chunk=length)]

            found[i] = await conns.call(slot, walk)

    async with trio.open_nursery() as nursery:
        for slot in range(len(conns.clients) * PIPELINE):
            nursery.start_soon(worker, slot)
    return [e for part in found for e in part]


async def copy_snapshot(opts: BackupOptions, tls: Tls | None, snap: Snapshot, writer: ImageWriter,
                        progress: Progress) -> CopyStats:
    contexts = [BASE_ALLOCATION]
    bitmap_context = QEMU_DIRTY_BITMAP_PREFIX + snap.old_bitmap if snap.old_bitmap else None
    if bitmap_context:
        contexts.append(bitmap_context)
    try:
        async with open_connections(opts.server, snap.name, contexts=contexts, count=opts.connections,
                                    progress=progress, tls=tls) as conns:
            size = conns.first.size
            if size != writer.size:
                raise BackupError(f"snapshot export is {size} bytes, but the node is {writer.size}")
            max_block = conns.first.block_size[2]
            await writer.open()
            try:
                stats = await _copy(conns, size, max_block, bitmap_context, writer, progress)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await writer.abort()
                raise
    except NbdError as exc:
        raise BackupError(f"reading the snapshot failed: {describe(exc)}") from None
    return stats


async def _copy(conns: Connections, size: int, max_block: int, bitmap_context: str | None,
                writer: ImageWriter, progress: Progress) -> CopyStats:
    stats = CopyStats(size)
    allocation = await _status(conns, BASE_ALLOCATION, size, max_block)
    if bitmap_context is None:
        kinds = plan_full(data_ranges(allocation), size)
    else:
        dirty = dirty_ranges(await _status(conns, bitmap_context, size, max_block))
        stats.dirty_bytes = sum(n for _, n in dirty)
        kinds = plan_incremental(dirty, data_ranges(allocation), size)
    todo = pieces(kinds, size)
    to_read = sum(p.length for p in todo if not p.zero)
    label = "incremental" if bitmap_context else "full"
    progress.start(f"{label} backup", to_read)
    queue = iter(todo)
    readers = len(conns.clients) * PIPELINE
    buffers = PieceBuffers(readers * BUFFERS_PER_READER)

    async def store(piece: Piece, buf: bytearray) -> None:
        try:
            await writer.write(piece, memoryview(buf)[: piece.length])
        finally:
            buffers.put(buf)
        stats.data_bytes += piece.length
        progress.advance(piece.length)

    async def reader(slot: int, nursery: trio.Nursery) -> None:
        for piece in queue:
            if piece.zero:
                await writer.zero(piece)
                stats.zero_bytes += piece.length
                continue
            buf = await buffers.get()
            try:
                await _read_piece(conns, slot, piece, max_block, memoryview(buf)[: piece.length])
            except BaseException:
                buffers.put(buf)
                raise
            stats.bytes_read += piece.length
            # Hashing and writing overlap with the next reads of this connection.
            nursery.start_soon(store, piece, buf)

    async with trio.open_nursery() as nursery:
        for slot in range(readers):
            nursery.start_soon(reader, slot, nursery)
    stats.seconds = progress.finish()
    return stats


class PieceBuffers:
    """At most ``count`` piece buffers, made on first use and reused (no page faults for a
    fresh 4 MiB per piece); a reader waits here when the writes fall behind."""

    def __init__(self, count: int, size: int = PIECE) -> None:
        self._free: list[bytearray] = []
        self._size = size
        self._slots = trio.Semaphore(count)

    async def get(self) -> bytearray:
        await self._slots.acquire()
        return self._free.pop() if self._free else bytearray(self._size)

    def put(self, buf: bytearray) -> None:
        self._free.append(buf)
        self._slots.release()


async def _read_piece(conns: Connections, slot: int, piece: Piece, max_block: int, view: memoryview) -> None:
    for offset, length in split(piece.offset, piece.length, max_block):
        part = view[offset - piece.offset : offset - piece.offset + length]

        async def read(client: NbdClient, offset: int = offset, part: memoryview = part) -> None:
            await client.pread_into(offset, part)

        await conns.call(slot, read)


def summary(point: Point) -> str:
    """The lines printed at the end of a backup."""
    read = point.bytes_read
    lines = [f"{point.kind} backup: point {point.seq} in {point.file} "
             f"(snapshot {point.snapshot_time})"]
    if point.dirty_bytes is not None:
        lines.append(f"  dirty: {human(point.dirty_bytes)} of {human(point.disk_size)} "
                     f"({point.dirty_bytes / point.disk_size:.2%} of the disk)")
    lines.append(f"  read: {human(read)} over NBD ({read / point.disk_size:.2%} of the disk); "
                 f"stored {human(point.data_bytes)} of data, {human(point.zero_bytes)} as zero clusters")
    lines.append(f"  image: {human(point.image_size)}; time {point.seconds:.2f} s, "
                 f"throughput {rate(read, point.seconds)} (data path {point.copy_seconds:.2f} s, "
                 f"{rate(read, point.copy_seconds)})")
    if point.note:
        lines.append(f"  note: {point.note}")
    return "\n".join(lines)
