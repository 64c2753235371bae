"""Raw file (or block device) store.

Keeping the event loop free
---------------------------
Every blocking call runs in a worker thread, with one exception made for
speed: reads first try ``preadv2(RWF_NOWAIT)``, which the kernel completes
only from the page cache and otherwise refuses with EAGAIN (or a short
count) instead of sleeping.  A hit costs one syscall on the loop; a miss
falls back to the worker thread for the rest.  The same is tried for
writes, where most filesystems answer EOPNOTSUPP; the store then remembers
that and goes straight to the thread.  ``lseek(SEEK_DATA/SEEK_HOLE)`` for
sparse reads and block status also runs in the thread.

Zeroing uses ``fallocate``: PUNCH_HOLE when the client allows
deallocation, ZERO_RANGE when it does not, then explicit zero buffers
(never for FAST_ZERO, which fails with ENOTSUP instead).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat

import trio

from nbdfleece.block.node import BlockNode, Extent, Segment
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

_io_limiter: trio.CapacityLimiter | None = None


def io_limiter() -> trio.CapacityLimiter:
    """Worker threads shared by every store: bounded, so a flood of requests
    queues in the loop instead of spawning hundreds of threads."""
    global _io_limiter
    if _io_limiter is None:
        _io_limiter = trio.CapacityLimiter(16)
    return _io_limiter


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


class FileStore(BlockNode):
    """A raw image file or block device opened with plain buffered I/O."""

    def __init__(self, name: str, path: str, *, read_only: bool = False) -> None:
        super().__init__(name)
        self.path = path
        self._read_only = read_only
        self._fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR)
        st = os.fstat(self._fd)
        self._is_block = stat.S_ISBLK(st.st_mode)
        self._size = os.lseek(self._fd, 0, os.SEEK_END) if self._is_block else st.st_size
        self._read_nowait = True
        self._write_nowait = not read_only
        self._seek_holes = not self._is_block

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
    async def read(self, offset: int, buf: memoryview, *, sparse: bool = False) -> list[Segment]:
        length = len(buf)
        if sparse and self._seek_holes:
            return await trio.to_thread.run_sync(
                self._read_sparse_sync, offset, buf, limiter=io_limiter()
            )
        done = self._try_nowait_read(offset, buf) if self._read_nowait else 0
        if done < length:
            await trio.to_thread.run_sync(
                _pread_full, self._fd, buf[done:], offset + done, limiter=io_limiter()
            )
        return [Segment(0, length, False)]

    def _try_nowait_read(self, offset: int, buf: memoryview) -> int:
        try:
            return os.preadv(self._fd, [buf], offset, os.RWF_NOWAIT)
        except BlockingIOError:
            return 0
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                self._read_nowait = False
                return 0
            raise

    def _read_sparse_sync(self, offset: int, buf: memoryview) -> list[Segment]:
        segments = self._map_sync(offset, len(buf))
        for seg in segments:
            if not seg.zero:
                _pread_full(self._fd, buf[seg.start : seg.start + seg.length], offset + seg.start)
        return segments

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
            await trio.to_thread.run_sync(
                _pwrite_full, self._fd, data[done:], offset + done, flags, limiter=io_limiter()
            )
        elif fua:
            await self.flush()

    def _try_nowait_write(self, offset: int, data: memoryview) -> int:
        try:
            return os.pwritev(self._fd, [data], offset, os.RWF_NOWAIT)
        except BlockingIOError:
            return 0
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                self._write_nowait = False
                return 0
            raise

    async def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool, fua: bool = False, fast: bool = False
    ) -> None:
        await trio.to_thread.run_sync(
            self._write_zeroes_sync, offset, length, may_trim, fast, limiter=io_limiter()
        )
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
        await trio.to_thread.run_sync(self._trim_sync, offset, length, limiter=io_limiter())
        if fua:
            await self.flush()

    def _trim_sync(self, offset: int, length: int) -> None:
        try:
            fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            # TRIM is advisory: a filesystem without hole punching keeps the data.
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise

    async def flush(self) -> None:
        await trio.to_thread.run_sync(os.fdatasync, self._fd, limiter=io_limiter())

    async def cache(self, offset: int, length: int) -> None:
        await trio.to_thread.run_sync(
            os.posix_fadvise,
            self._fd,
            offset,
            length,
            os.POSIX_FADV_WILLNEED,
            limiter=io_limiter(),
        )

    # -- status -----------------------------------------------------------
    async def block_status(self, offset: int, length: int) -> list[Extent]:
        if not self._seek_holes:
            return [Extent(length, AllocationState(0))]
        segments = await trio.to_thread.run_sync(
            self._map_sync, offset, length, limiter=io_limiter()
        )
        hole = AllocationState.HOLE | AllocationState.ZERO
        return [Extent(s.length, hole if s.zero else AllocationState(0)) for s in segments]

    async def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
