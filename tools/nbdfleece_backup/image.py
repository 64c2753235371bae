"""Backup images: writing one (crash-safe), and reading back its content checksum.

Images are qcow2 version 3 with 64 KiB clusters, written through nbdfleece's
own qcow2 driver (``nbdfleece.block.qcow2``), so ``qemu-img`` opens them and
``qemu-img check`` finds them clean.  An incremental names the previous image
as its backing file by a relative name, so the folder can be moved as a whole.

The *content checksum* of an image is a hash over the clusters the image itself
holds (data and zero clusters, see ``plan.ContentDigest``), not over the file's
bytes: the agent computes it from what it reads, while it writes, so a backup
never reads its own image back, and ``verify`` recomputes it from the image.
It covers what a restore would produce; the qcow2 metadata itself is checked
by the refcount check (:func:`check_image`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import trio

from nbdfleece.block.file import FileStore
from nbdfleece.block.qcow2 import Qcow2Error, Qcow2Node, create_qcow2, open_qcow2
from nbdfleece.block.workers import WorkerPool, run_blocking
from nbdfleece.constants import AllocationState
from nbdfleece.errors import RequestError
from nbdfleece_backup.errors import BackupError
from nbdfleece_backup.plan import (
    CLUSTER,
    DATA,
    DEFAULT_CHECKSUM,
    INLINE_CHECKSUMS,
    NONE,
    ZERO,
    ContentDigest,
    Kinds,
    Piece,
    checksum_algorithm,
    piece_checksum,
    pieces,
    touched,
)
from nbdfleece_backup.store import Point, describe_os_error, fsync_dir

STATUS_STEP = 1 << 30
"""Bytes asked per block_status / allocation_depth call on an image."""
T = TypeVar("T")
HASH_THREADS = max(1, min(4, os.cpu_count() or 1))


BULK = 1 << 20
"""Transfers this large go to the worker pool even on tmpfs (see ``BulkFileStore``)."""


class BulkFileStore(FileStore):
    """The new image's file: its piece-sized data transfers in the worker pool, even on tmpfs.

    ``FileStore`` runs I/O inline on memory-backed filesystems, which saves a
    server a thread hop per small request; the agent writes 4 MiB pieces while
    its event loop receives the next ones over NBD, so an inline ``pwrite``
    (a 4 MiB memcpy into the page cache) would stall every connection.  The
    qcow2 metadata writes (a few bytes of L2 table or refcounts) stay inline
    there: a thread hop would cost more than the write.  Elsewhere every call
    goes to the pool, as in ``FileStore``.
    """

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        if self._inline and not any(isinstance(a, memoryview) and len(a) >= BULK for a in args):
            return fn(*args)
        return await run_blocking(fn, *args)


_hash_pool: WorkerPool | None = None


async def checksum_of(algorithm: str, data: bytes | bytearray | memoryview) -> str:
    """``piece_checksum`` in a pool of its own (hashlib and zlib release the GIL on large
    buffers), so 4 MiB hashes never queue in front of the image's small metadata writes;
    ``INLINE_CHECKSUMS`` right here, cheaper than the hop."""
    if algorithm in INLINE_CHECKSUMS:
        return piece_checksum(algorithm, data)
    global _hash_pool
    if _hash_pool is None:
        _hash_pool = WorkerPool(HASH_THREADS)
    return await _hash_pool.run(piece_checksum, algorithm, data)


class ImageWriter:
    """A new image under ``final.tmp``; :meth:`commit` fsyncs it and renames it into place."""

    def __init__(self, final: Path, size: int, backing: str | None,
                 checksum: str = DEFAULT_CHECKSUM) -> None:
        self.final = final
        self.tmp = final.with_name(final.name + ".tmp")
        self.size = size
        self.backing = backing
        self.digest = ContentDigest(checksum)
        self.data_bytes = 0
        self.zero_bytes = 0
        self._node: Qcow2Node | None = None
        self._write_lock = trio.Lock()
        """One image write at a time: the file's writes are serialised by the kernel anyway
        (the inode lock), and concurrent ones only queue the qcow2 metadata updates, which
        the driver makes under one lock, behind other pieces' data."""

    async def open(self) -> None:
        try:
            await run_blocking(create_qcow2, self.tmp, self.size, CLUSTER, self.backing,
                               "qcow2" if self.backing else None)
            # Pieces cover whole clusters, so writes never read the backing chain.
            store = BulkFileStore(f"{self.tmp}-file", os.fspath(self.tmp))
            try:
                self._node = Qcow2Node(str(self.tmp), store, backing=None, owns_file=True)
            except BaseException:
                store.close_sync()
                raise
        except OSError as exc:
            await self.abort()
            raise BackupError(describe_os_error(exc, f"cannot create {self.tmp}")) from None
        except Qcow2Error as exc:
            await self.abort()
            raise BackupError(f"cannot create {self.tmp}: {exc}") from None

    @property
    def node(self) -> Qcow2Node:
        if self._node is None:
            raise RuntimeError("image not open")
        return self._node

    async def write(self, piece: Piece, data: bytes | bytearray | memoryview) -> None:
        """Store a data piece and add its checksum, hashed in another thread while it is written
        (both only read ``data``, which must stay untouched until this returns); a cheap
        checksum (``INLINE_CHECKSUMS``) is taken of the same buffer first, without a thread."""
        view = memoryview(data)
        if self.digest.algorithm in INLINE_CHECKSUMS:
            digest = piece_checksum(self.digest.algorithm, view)
            async with self._write_lock:
                await self._io(self.node.write(piece.offset, view))
            self.digest.add(piece, digest)
            self.data_bytes += piece.length
            return
        checksum: list[str] = []

        async def hash_it() -> None:
            checksum.append(await checksum_of(self.digest.algorithm, view))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hash_it)
            async with self._write_lock:
                await self._io(self.node.write(piece.offset, view))
        self.digest.add(piece, checksum[0])
        self.data_bytes += piece.length

    async def zero(self, piece: Piece) -> None:
        async with self._write_lock:
            await self._io(self.node.write_zeroes(piece.offset, piece.length, may_trim=False))
        self.digest.add(piece, None)
        self.zero_bytes += piece.length

    async def _io(self, op: Awaitable[None]) -> None:
        try:
            await op
        except RequestError as exc:  # the store's errors come wrapped with an errno
            raise BackupError(describe_os_error(OSError(int(exc.errno), os.strerror(int(exc.errno))),
                                                f"cannot write {self.tmp}")) from None
        except OSError as exc:
            raise BackupError(describe_os_error(exc, f"cannot write {self.tmp}")) from None

    async def commit(self) -> int:
        """Flush, close, fsync, rename to the final name; returns the file's size."""
        node, self._node = self.node, None
        try:
            await node.close()  # flushes (fdatasync) and gives back the unused tail
            await run_blocking(_fsync_path, self.tmp)
            os.rename(self.tmp, self.final)
            await run_blocking(fsync_dir, self.final.parent)
        except OSError as exc:
            await self.abort()
            raise BackupError(describe_os_error(exc, f"cannot write {self.final}")) from None
        return self.final.stat().st_size

    async def abort(self) -> None:
        """Drop the temporary image (the chain stays as it was)."""
        node, self._node = self._node, None
        if node is not None:
            with contextlib.suppress(Exception), trio.CancelScope(shield=True):
                await node.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- reading images back ------------------------------------------------------------------


def open_image(path: Path, *, chain: bool = False) -> Qcow2Node:
    """Open an image read-only: alone (``chain`` False) or with its backing files."""
    try:
        return open_qcow2(path, read_only=True, backing="header" if chain else None)
    except Qcow2Error as exc:
        raise BackupError(f"{path}: {exc}") from None
    except OSError as exc:
        raise BackupError(describe_os_error(exc, f"cannot open {path}")) from None


async def image_kinds(node: Qcow2Node) -> Kinds:
    """Per cluster: what ``node`` itself holds (opened without its backing file)."""
    size = node.size
    allocated: list[tuple[int, int]] = []
    data: list[tuple[int, int]] = []
    for what in ("depth", "status"):
        pos = 0
        while pos < size:
            want = min(STATUS_STEP, size - pos)
            if what == "depth":
                runs = [(n, depth != 0) for n, depth in await node.allocation_depth(pos, want)]
            else:
                runs = [(e.length, not e.flags & AllocationState.ZERO)
                        for e in await node.block_status(pos, want)]
            for n, flag in runs:
                n = min(n, size - pos)
                if flag:
                    (allocated if what == "depth" else data).append((pos, n))
                pos += n
                if pos >= size:
                    break
    cs = node.cluster_size
    here = touched(allocated, size, cs)
    has_data = touched(data, size, cs)
    kinds: Kinds = np.where(here, np.where(has_data, DATA, ZERO), NONE).astype(np.int8)
    return kinds


@dataclass(frozen=True)
class Content:
    checksum: str
    data_bytes: int
    zero_bytes: int


async def content_digest(path: Path, algorithm: str = "sha256", *, parallel: int = 4) -> Content:
    """Recompute an image's content checksum from the image alone."""
    node = open_image(path)
    try:
        kinds = await image_kinds(node)
        digest = ContentDigest(algorithm)
        todo = pieces(kinds, node.size, node.cluster_size)
        counts = {"data": 0, "zero": 0}
        index = iter(todo)

        async def worker() -> None:
            for piece in index:
                if piece.zero:
                    digest.add(piece, None)
                    counts["zero"] += piece.length
                    continue
                buf = bytearray(piece.length)
                try:
                    await node.read(piece.offset, memoryview(buf))
                except (RequestError, OSError) as exc:
                    raise BackupError(f"{path}: cannot read {piece.length} bytes at {piece.offset}: "
                                      f"{exc}") from None
                digest.add(piece, await checksum_of(algorithm, buf))
                counts["data"] += piece.length

        async with trio.open_nursery() as nursery:
            for _ in range(parallel):
                nursery.start_soon(worker)
        return Content(digest.hexdigest(), counts["data"], counts["zero"])
    finally:
        await node.close()


async def check_image(path: Path) -> list[str]:
    """The image's refcount problems (errors and leaks), as ``qemu-img check`` counts them."""
    node = open_image(path)
    try:
        errors, leaks = await node.check()
    finally:
        await node.close()
    problems = list(errors)
    if leaks:
        problems.append(f"{len(leaks)} leaked cluster(s)")
    return problems



async def check_header(path: Path, point: Point) -> list[str]:
    """Does the image's header agree with the manifest (size, backing file)?"""
    if not path.exists():
        return [f"{path.name} is missing"]
    try:
        node = open_image(path)
    except BackupError as exc:
        return [str(exc)]
    try:
        problems = []
        if node.size != point.disk_size:
            problems.append(f"virtual size {node.size}, the manifest says {point.disk_size}")
        if node.header.backing_file != point.backing:
            problems.append(f"backing file {node.header.backing_file!r}, the manifest says {point.backing!r}")
        return problems
    finally:
        await node.close()


async def point_problems(path: Path, point: Point) -> list[str]:
    """The image against its manifest point: header, then the content checksum."""
    problems = await check_header(path, point)
    if not problems:
        try:
            algorithm = checksum_algorithm(point.checksum)
        except ValueError as exc:
            return [str(exc)]
        if (await content_digest(path, algorithm)).checksum != point.checksum:
            problems.append("content checksum mismatch (the image was modified or damaged)")
    return problems
