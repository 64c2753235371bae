"""Raw file (or block device) store.

Keeping the event loop free
---------------------------
Blocking calls run in the worker pool (``nbdfleece.block.workers``), with two
exceptions made for speed, both of which cannot wait for a disk:

* on a memory-backed filesystem (tmpfs, ramfs: ``fstatfs`` tells) there is
  no disk, so every call runs inline;
* reads first try ``preadv2(RWF_NOWAIT)``, which the kernel completes only
  from the page cache and otherwise refuses with EAGAIN (or a short count)
  instead of sleeping; a miss falls back to the pool for the rest.  The same
  is tried for writes, where most filesystems answer EOPNOTSUPP; the store
  then remembers that and goes straight to the pool.

Sparse reads ask ``lseek(SEEK_DATA)`` once (a lookup in the inode's extent
map) and never ``SEEK_HOLE``, which tmpfs answers by scanning to the end of
the file (milliseconds per call on a 1 GiB image).  A file that had no holes
when opened, and has not been trimmed or zeroed since, needs no ``lseek`` at
all: its reads and its block status (which nbdcopy asks for every 64 MiB)
report data straight away.  (Holes punched by another process are then
reported as data, which is always a valid answer.)

Zeroing uses ``fallocate``: PUNCH_HOLE when the client allows
deallocation, ZERO_RANGE when it does not, then explicit zero buffers
(never for FAST_ZERO, which fails with ENOTSUP instead).

Copies between two stores (copy-before-write) use ``copy_file_range``: the
kernel moves the bytes page cache to page cache (or shares the blocks on
filesystems that can), with no trip through a Python buffer and, off
tmpfs, in one worker job instead of a read job and a write job.  Where the
kernel refuses (another filesystem, a block device) or a copy fails, the
same job falls back to ``pread``/``pwrite``, which also tells whether the
read or the write side failed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat
import struct
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from nbdfleece.block.node import BlockNode, Extent, Segment
from nbdfleece.block.workers import run_blocking
from nbdfleece.constants import AllocationState, Errno
from nbdfleece.errors import RequestError

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
SPARSE_SEGMENTS_MAX = 32
"""A read splits into at most this many hole/data segments; the rest is data."""
ZERO_CHUNK = 1 << 20

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int
_ZEROES = bytes(ZERO_CHUNK)

_libc.fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
_libc.fstatfs.restype = ctypes.c_int
MEMORY_FILESYSTEMS = {0x01021994, 0x858458F6}  # TMPFS_MAGIC, RAMFS_MAGIC
T = TypeVar("T")


def memory_backed(fd: int) -> bool:
    """True when ``fd`` lives on tmpfs/ramfs, where I/O never waits for a disk."""
    buf = ctypes.create_string_buffer(256)
    if _libc.fstatfs(fd, buf) != 0:
        return False
    (f_type,) = struct.unpack_from("l", buf)  # __fsword_t f_type comes first
    return f_type in MEMORY_FILESYSTEMS


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """``fallocate(2)`` with mode flags, which ``os`` does not expose."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _pread_full(fd: int, view: memoryview, offset: int) -> None:
    while view:
        n = os.preadv(fd, [view], offset)
        if n == 0:
            raise OSError(errno.EIO, "unexpected end of file (was the image truncated?)")
        view = view[n:]
        offset += n


def _pwrite_full(fd: int, view: memoryview, offset: int, flags: int = 0) -> None:
    while view:
        n = os.pwritev(fd, [view], offset, flags)
        view = view[n:]
        offset += n


COPY_CHUNK = 1 << 20
"""Bytes per ``copy_file_range`` call and the fallback's buffer size."""
_COPY_UNSUPPORTED = (errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS, errno.EBADF)
"""``copy_file_range`` errnos that mean "not between these two files": use pread/pwrite."""
_copy_buffers = threading.local()


def copy_failed(exc: OSError, op: str) -> OSError:
    """``exc`` tagged with the side of a copy that failed (``read`` or ``write``)."""
    exc.copy_op = op  # type: ignore[attr-defined]
    return exc


def copy_side(exc: BaseException) -> str:
    """Which side of a copy failed: ``read`` or ``write`` (``write`` if unknown)."""
    return str(getattr(exc, "copy_op", "write"))


def _copy_file_range_full(src: int, dst: int, offset: int, length: int) -> None:
    """Copy ``[offset, offset+length)`` from ``src`` to the same offsets of ``dst``."""
    end = offset + length
    while offset < end:
        n = os.copy_file_range(src, dst, min(end - offset, COPY_CHUNK), offset, offset)
        if n == 0:
            raise OSError(errno.EIO, "unexpected end of file (was the image truncated?)")
        offset += n


def _copy_buffered(src: int, dst: int, offset: int, length: int) -> None:
    """The same copy through a per-thread buffer; failures say which side failed."""
    buf: bytearray | None = getattr(_copy_buffers, "buf", None)
    if buf is None:
        buf = _copy_buffers.buf = bytearray(COPY_CHUNK)
    view = memoryview(buf)
    end = offset + length
    while offset < end:
        n = min(end - offset, COPY_CHUNK)
        try:
            _pread_full(src, view[:n], offset)
        except OSError as exc:
            raise copy_failed(exc, "read") from None
        try:
            _pwrite_full(dst, view[:n], offset)
        except OSError as exc:
            raise copy_failed(exc, "write") from None
        offset += n


def _nowait(io: Callable[[int, list[memoryview], int, int], int], fd: int, view: memoryview,
            offset: int) -> int | None:
    """One ``RWF_NOWAIT`` call: bytes done, 0 if it would wait, None if unsupported here."""
    try:
        return io(fd, [view], offset, os.RWF_NOWAIT)
    except BlockingIOError:
        return 0
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
            return None
        raise


class FileStore(BlockNode):
    """A raw image file or block device opened with plain buffered I/O."""

    def __init__(self, name: str, path: str, *, read_only: bool = False) -> None:
        super().__init__(name)
        self.path = path
        self._read_only = read_only
        self._fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR)
        if not read_only:
            self._lock_for_writing()
        st = os.fstat(self._fd)
        self._is_block = stat.S_ISBLK(st.st_mode)
        self._size = os.lseek(self._fd, 0, os.SEEK_END) if self._is_block else st.st_size
        self._inline = not self._is_block and memory_backed(self._fd)
        self._read_nowait = not self._inline
        self._write_nowait = not read_only and not self._inline
        self._seek_holes = not self._is_block
        # Only trims and zeroing create holes; a fully allocated file needs no probing.
        self._maybe_sparse = self._seek_holes and st.st_blocks * 512 < self._size
        self._no_copy_range: set[int] = set()
        """Target fds ``copy_file_range`` refused to copy to from here."""
        self._in_workers = 0
        """Calls running in worker threads with this store's descriptor."""
        self._workers_idle: trio.Event | None = None

    def _lock_for_writing(self) -> None:
        """One writer per image: a second server (or a second writable node here) on the
        same file would write what this one's bitmaps never see, and rewrite its bitmap
        file.  ``flock`` is advisory and independent of QEMU's ``fcntl`` locks."""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._fd)
            self._fd = -1
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise OSError(errno.EBUSY, "the image is open for writing elsewhere "
                              "(another nbdfleece, or another node of this one)") from None
            raise

    # -- properties -------------------------------------------------------
    @property
    def size(self) -> int:
        return self._size

    @property
    def read_only(self) -> bool:
        return self._read_only

    def fileno(self) -> int:
        return self._fd

    # -- reads ------------------------------------------------------------
    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking call: inline on memory-backed files, else in the pool."""
        if self._inline:
            return fn(*args)
        return await self._in_worker((self,), fn, *args)

    @staticmethod
    async def _in_worker(stores: tuple[FileStore, ...], fn: Callable[..., T], *args: Any) -> T:
        """A worker call using the descriptors of ``stores``: :meth:`close` waits for
        it, so a descriptor number is never closed (and reused by another file)
        under a call still writing through it."""
        for store in stores:
            store._in_workers += 1
        try:
            return await run_blocking(fn, *args)
        finally:
            for store in stores:
                store._in_workers -= 1
                if not store._in_workers and store._workers_idle is not None:
                    store._workers_idle.set()
                    store._workers_idle = None

    async def read(self, offset: int, buf: memoryview, *, sparse: bool = False) -> list[Segment]:
        length = len(buf)
        if not (sparse and self._maybe_sparse):
            await self._read_data(offset, buf)
            return [Segment(0, length, False)]
        segments = self._sparse_segments(offset, offset + length)
        for seg in segments:
            if not seg.zero:
                await self._read_data(offset + seg.start, buf[seg.start : seg.start + seg.length])
        return segments

    def read_nowait(self, offset: int, buf: memoryview, *, sparse: bool = False) -> list[Segment] | None:
        if not (self._inline or self._read_nowait):
            return None
        length = len(buf)
        if self._inline and not (sparse and self._maybe_sparse):  # the common case, short
            try:
                _pread_full(self._fd, buf, offset)
            except OSError:
                return None  # the slow path meets the error again and replies with it
            return [Segment(0, length, False)]
        try:
            segments = (
                self._sparse_segments(offset, offset + length)
                if sparse and self._maybe_sparse
                else [Segment(0, length, False)]
            )
            for seg in segments:
                if seg.zero:
                    continue
                view = buf[seg.start : seg.start + seg.length]
                if self._inline:
                    _pread_full(self._fd, view, offset + seg.start)
                elif self._try_nowait_read(offset + seg.start, view) < seg.length:
                    return None
        except OSError:
            return None  # the slow path meets the error again and replies with it
        return segments

    def sendfile_map(
        self, offset: int, length: int, *, sparse: bool = False
    ) -> tuple[int, list[Segment]] | None:
        if not self._inline:
            return None
        if sparse and self._maybe_sparse:
            return self._fd, self._sparse_segments(offset, offset + length)
        return self._fd, [Segment(0, length, False)]

    def write_nowait(self, offset: int, data: memoryview) -> bool:
        if self._inline:
            try:
                _pwrite_full(self._fd, data, offset)
            except OSError:
                # ENOSPC/EIO: the slow path rewrites the range and replies
                # with the error instead of this path dropping the connection.
                return False
            return True
        # A partial NOWAIT write is fine to report as False: the slow path
        # rewrites the whole range with the same bytes.
        return self._write_nowait and self._try_nowait_write(offset, data) == len(data)

    async def _read_data(self, offset: int, buf: memoryview) -> None:
        done = self._try_nowait_read(offset, buf) if self._read_nowait else 0
        if done < len(buf):
            await self._call(_pread_full, self._fd, buf[done:], offset + done)

    def _sparse_segments(self, offset: int, end: int) -> list[Segment]:
        """Hole/data segments of a read, for at most a few cheap ``lseek`` calls.

        ``SEEK_HOLE`` is asked only when the last byte is known to be in a
        hole, so its scan stops inside the request; otherwise data that
        starts after a leading hole is read as data to the end.
        """
        segments: list[Segment] = []
        tail_is_hole: bool | None = None
        pos = offset
        while pos < end and len(segments) < SPARSE_SEGMENTS_MAX:
            data = self._first_data(pos, end)
            if data > pos:
                segments.append(Segment(pos - offset, data - pos, True))
                pos = data
                continue
            if tail_is_hole is None:
                tail_is_hole = self._first_data(end - 1, end) == end
            if not tail_is_hole:
                break
            hole = min(os.lseek(self._fd, pos, os.SEEK_HOLE), end)
            segments.append(Segment(pos - offset, hole - pos, False))
            pos = hole
        if pos < end:
            segments.append(Segment(pos - offset, end - pos, False))
        return segments

    def _first_data(self, pos: int, end: int) -> int:
        """Offset of the first data byte at or after ``pos`` (``end`` if none before it)."""
        try:
            return min(os.lseek(self._fd, pos, os.SEEK_DATA), end)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return end
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                self._seek_holes = False
                return pos
            raise

    def _try_nowait_read(self, offset: int, buf: memoryview) -> int:
        done = _nowait(os.preadv, self._fd, buf, offset)
        if done is None:
            self._read_nowait = False
        return done or 0

    def _map_sync(self, offset: int, length: int) -> list[Segment]:
        """Split ``[offset, offset+length)`` into data and hole segments."""
        end = offset + length
        segments: list[Segment] = []
        pos = offset
        while pos < end:
            if len(segments) >= SPARSE_SEGMENTS_MAX:
                segments.append(Segment(pos - offset, end - pos, False))
                break
            zero, nxt = self._probe(pos, end)
            segments.append(Segment(pos - offset, nxt - pos, zero))
            pos = nxt
        return segments

    def _probe(self, pos: int, end: int) -> tuple[bool, int]:
        """(is_hole, end of that run, clipped to ``end``) at ``pos``."""
        try:
            data = os.lseek(self._fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos: hole to EOF
                return True, end
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                self._seek_holes = False
                return False, end
            raise
        if data > pos:
            return True, min(data, end)
        hole = os.lseek(self._fd, pos, os.SEEK_HOLE)
        return False, min(hole, end)

    # -- writes -----------------------------------------------------------
    async def write(self, offset: int, data: memoryview, *, fua: bool = False) -> None:
        done = 0
        if self._write_nowait and not fua:
            done = self._try_nowait_write(offset, data)
        if done < len(data):
            flags = os.RWF_DSYNC if fua else 0
            await self._call(_pwrite_full, self._fd, data[done:], offset + done, flags)
        elif fua:
            await self.flush()

    def _try_nowait_write(self, offset: int, data: memoryview) -> int:
        done = _nowait(os.pwritev, self._fd, data, offset)
        if done is None:
            self._write_nowait = False
        return done or 0

    async def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool, fua: bool = False, fast: bool = False
    ) -> None:
        await self._call(self._write_zeroes_sync, offset, length, may_trim, fast)
        if fua:
            await self.flush()

    def _write_zeroes_sync(self, offset: int, length: int, may_trim: bool, fast: bool) -> None:
        modes = []
        if may_trim and not self._is_block:
            modes.append(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
        modes.append(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)
        if self._is_block:
            modes.append(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
        for mode in modes:
            try:
                fallocate(self._fd, mode, offset, length)
                self._maybe_sparse = self._seek_holes  # ext4 reports zeroed ranges as holes too
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
        if fast:
            raise RequestError(Errno.ENOTSUP, "zeroing is not faster than writing here")
        end = offset + length
        while offset < end:
            n = min(ZERO_CHUNK, end - offset)
            _pwrite_full(self._fd, memoryview(_ZEROES)[:n], offset)
            offset += n

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self._call(self._trim_sync, offset, length)
        if fua:
            await self.flush()

    def _trim_sync(self, offset: int, length: int) -> None:
        try:
            fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
            self._maybe_sparse = self._seek_holes
        except OSError as exc:
            # TRIM is advisory: a filesystem without hole punching keeps the data.
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise

    async def flush(self) -> None:
        await self._call(os.fdatasync, self._fd)

    async def cache(self, offset: int, length: int) -> None:
        await self._call(os.posix_fadvise, self._fd, offset, length, os.POSIX_FADV_WILLNEED)

    # -- status -----------------------------------------------------------
    async def block_status(self, offset: int, length: int) -> list[Extent]:
        if not (self._seek_holes and self._maybe_sparse):
            # Nothing to find (and on tmpfs SEEK_HOLE scans the rest of the
            # file: milliseconds per call, paid by every nbdcopy).
            return [Extent(length, AllocationState(0))]
        segments = await self._call(self._map_sync, offset, length)
        hole = AllocationState.HOLE | AllocationState.ZERO
        return [Extent(s.length, hole if s.zero else AllocationState(0)) for s in segments]

    # -- copies to another store (copy-before-write) ----------------------
    def copy_to_nowait(self, target: FileStore, offset: int, length: int) -> bool:
        """Copy a range into ``target`` at the same offsets, now, if neither file
        can wait for a disk (both memory-backed); False: use :meth:`copy_to`."""
        if not (self._inline and target._inline):
            return False
        self._copy_sync(target, offset, length)
        return True

    async def copy_to(self, target: FileStore, offset: int, length: int) -> None:
        """Copy a range into ``target`` at the same offsets (one worker job)."""
        if self._inline and target._inline:
            self._copy_sync(target, offset, length)
        else:
            await self._in_worker((self, target), self._copy_sync, target, offset, length)

    def _copy_sync(self, target: FileStore, offset: int, length: int) -> None:
        if target._fd not in self._no_copy_range:
            try:
                _copy_file_range_full(self._fd, target._fd, offset, length)
                return
            except OSError as exc:
                if exc.errno in _COPY_UNSUPPORTED:
                    self._no_copy_range.add(target._fd)
                # Either way the buffered copy retries it and says which side fails.
        _copy_buffered(self._fd, target._fd, offset, length)

    async def close(self) -> None:
        """Close once no worker call uses the descriptor any more."""
        while self._in_workers:
            if self._workers_idle is None:
                self._workers_idle = trio.Event()
            await self._workers_idle.wait()
        self.close_sync()

    def close_sync(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
