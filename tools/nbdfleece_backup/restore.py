"""Restore a point of the chain into a raw file, a block device or an NBD export.

Only this project's code is used: the chain is read with nbdfleece's qcow2
driver (each image opens its backing file by the relative name in its
header), and an NBD target is written with nbdfleece's client over several
connections.  A new raw file is written as ``FILE.tmp``, fsynced and renamed,
so an interrupted restore never leaves a half-written FILE; holes stay holes.
Targets that may hold old data (an NBD export, a block device) get explicit
zeroes where the point reads as zeroes.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import trio

from nbdfleece.block.qcow2 import Qcow2Node
from nbdfleece.block.workers import run_blocking
from nbdfleece.client import NbdClient, NbdError
from nbdfleece.constants import AllocationState
from nbdfleece.errors import RequestError
from nbdfleece_backup.connections import Tls, describe, open_connections, tls_for
from nbdfleece_backup.errors import BackupError
from nbdfleece_backup.image import STATUS_STEP, open_image, point_problems
from nbdfleece_backup.plan import DATA, NONE, ZERO, Kinds, Piece, pieces, plan_full
from nbdfleece_backup.progress import Progress
from nbdfleece_backup.store import Folder, Point, describe_os_error, fsync_dir

ZERO_WINDOW = 1 << 30
"""Zeroing requests cover up to 1 GiB each (no payload)."""
WORKERS = 4


@dataclass
class RestoreStats:
    point: Point
    data_bytes: int = 0
    zero_bytes: int = 0
    seconds: float = 0.0


def is_nbd(target: str) -> bool:
    return target.split(":", 1)[0].lower() in ("nbd", "nbds", "nbd+unix", "nbds+unix")


async def chain_kinds(node: Qcow2Node) -> Kinds:
    """Per cluster of the point: data, or reads as zeroes (through the whole chain)."""
    size = node.size
    data: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        for ext in await node.block_status(pos, min(STATUS_STEP, size - pos)):
            n = min(ext.length, size - pos)
            if not ext.flags & AllocationState.ZERO:
                data.append((pos, n))
            pos += n
            if pos >= size:
                break
    return plan_full(data, size, node.cluster_size)


async def verify_chain(folder: Folder, chain: list[Point], progress: Progress) -> None:
    """Headers and content checksums of the images a point needs."""
    for p in chain:
        problems = await point_problems(folder.image_path(p.file), p)
        if problems:
            raise BackupError(f"point {p.seq} ({p.file}) cannot be trusted: {'; '.join(problems)} "
                              "(restore --no-verify skips this check)")
        progress.info(f"point {p.seq} ({p.file}): checksum ok")


async def restore(folder_path: Path, seq: int | None, target: str, *, connections: int = 4,
                  force: bool = False, verify: bool = True, progress: Progress,
                  tls_certificates: Path | None = None) -> RestoreStats:
    """``tls_certificates``: for an ``nbds://`` target (see ``connections.tls_for``)."""
    tls = tls_for(target, tls_certificates) if is_nbd(target) else None
    if tls_certificates is not None and not is_nbd(target):
        raise BackupError("--tls-certificates is for an nbds:// target, not a file", 2)
    async with Folder(folder_path, write=False) as folder:
        manifest = folder.manifest
        point = manifest.last if seq is None else manifest.point(seq)
        if point is None:
            raise BackupError(f"{folder_path} holds no backup", 2)
        chain = manifest.chain(point.seq)
        if verify:
            await verify_chain(folder, chain, progress)
        node = open_image(folder.image_path(point.file), chain=True)
        try:
            kinds = await chain_kinds(node)
            stats = RestoreStats(point)
            if is_nbd(target):
                await _to_nbd(node, kinds, target, connections, tls, stats, progress)
            else:
                await _to_file(node, kinds, Path(target), force, stats, progress)
        finally:
            await node.close()
    return stats


def _zero_pieces(kinds: Kinds, size: int, cluster: int) -> list[Piece]:
    zero_kinds: Kinds = np.where(kinds == DATA, NONE, ZERO).astype(np.int8)
    return pieces(zero_kinds, size, cluster, ZERO_WINDOW)


async def _read(node: Qcow2Node, piece: Piece) -> bytearray:
    buf = bytearray(piece.length)
    try:
        await node.read(piece.offset, memoryview(buf))
    except (RequestError, OSError) as exc:
        raise BackupError(f"cannot read the backup at offset {piece.offset}: {exc}") from None
    return buf


async def _run(todo: list[Piece], workers: int, job: Callable[[int, Piece], Awaitable[None]]) -> None:
    queue = iter(todo)

    async def worker(slot: int) -> None:
        for piece in queue:
            await job(slot, piece)

    async with trio.open_nursery() as nursery:
        for slot in range(workers):
            nursery.start_soon(worker, slot)


async def _to_nbd(node: Qcow2Node, kinds: Kinds, uri: str, connections: int, tls: Tls | None,
                  stats: RestoreStats, progress: Progress) -> None:
    size = node.size
    try:
        async with open_connections(uri, _export_of(uri), count=connections, progress=progress,
                                    tls=tls) as conns:
            client = conns.first
            if client.read_only:
                raise BackupError(f"NBD export '{client.export_name}' is read-only", 2)
            if client.size < size:
                raise BackupError(f"NBD export '{client.export_name}' is {client.size} bytes, smaller "
                                  f"than the disk ({size} bytes)", 2)
            max_block = client.block_size[2]
            data = [p for p in pieces(kinds, size, node.cluster_size) if not p.zero]
            zeroes = _zero_pieces(kinds, size, node.cluster_size)
            progress.start(f"restore point {stats.point.seq}", sum(p.length for p in data))

            async def write(slot: int, piece: Piece) -> None:
                buf = await _read(node, piece)
                view = memoryview(buf)
                for start in range(0, piece.length, max_block):
                    part = view[start : start + max_block]

                    async def put(c: NbdClient, offset: int = piece.offset + start,
                                  part: memoryview = part) -> None:
                        await c.pwrite(offset, part)

                    await conns.call(slot, put)
                stats.data_bytes += piece.length
                progress.advance(piece.length)

            async def zero(slot: int, piece: Piece) -> None:
                async def put(c: NbdClient) -> None:
                    await c.write_zeroes(piece.offset, piece.length)

                await conns.call(slot, put)
                stats.zero_bytes += piece.length

            workers = len(conns.clients) * 2
            await _run(zeroes, workers, zero)
            await _run(data, workers, write)
            for i in range(len(conns.clients)):
                await conns.call(i, lambda c: c.flush())
            stats.seconds = progress.finish()
    except NbdError as exc:
        raise BackupError(f"writing to {uri} failed: {describe(exc)}") from None


def _export_of(uri: str) -> str:
    from nbdfleece.client import parse_uri

    try:
        return parse_uri(uri).export
    except ValueError as exc:
        raise BackupError(str(exc), 2) from None


async def _to_file(node: Qcow2Node, kinds: Kinds, path: Path, force: bool, stats: RestoreStats,
                   progress: Progress) -> None:
    device = False
    try:
        st = os.stat(path)
        device = stat.S_ISBLK(st.st_mode)
        if not device and not force:
            raise BackupError(f"{path} exists (use --force to replace it)", 2)
    except FileNotFoundError:
        pass
    out = path if device else path.with_name(path.name + ".tmp")
    try:
        fd = os.open(out, os.O_WRONLY | (0 if device else os.O_CREAT | os.O_TRUNC), 0o644)
    except OSError as exc:
        raise BackupError(describe_os_error(exc, f"cannot open {out}")) from None
    try:
        try:
            await _fill_file(node, kinds, fd, device, path, stats, progress)
        finally:
            os.close(fd)
        if not device:
            os.rename(out, path)
            fsync_dir(path.absolute().parent)
    except OSError as exc:
        if not device:
            with contextlib.suppress(OSError):
                os.unlink(out)
        raise BackupError(describe_os_error(exc, f"cannot write {out}")) from None
    except BaseException:
        if not device:
            with contextlib.suppress(OSError):
                os.unlink(out)
        raise


async def _fill_file(node: Qcow2Node, kinds: Kinds, fd: int, device: bool, path: Path, stats: RestoreStats,
                     progress: Progress) -> None:
    size = node.size
    if device:
        dev_size = os.lseek(fd, 0, os.SEEK_END)
        if dev_size < size:
            raise BackupError(f"{path} is {dev_size} bytes, smaller than the disk ({size} bytes)", 2)
    else:
        os.ftruncate(fd, size)
    data = [p for p in pieces(kinds, size, node.cluster_size) if not p.zero]
    progress.start(f"restore point {stats.point.seq}", sum(p.length for p in data))

    async def write(slot: int, piece: Piece) -> None:
        buf = await _read(node, piece)
        await run_blocking(_pwrite_all, fd, buf, piece.offset)
        stats.data_bytes += piece.length
        progress.advance(piece.length)

    async def zero(slot: int, piece: Piece) -> None:
        await run_blocking(_zero_range, fd, piece.offset, piece.length)
        stats.zero_bytes += piece.length

    if device:
        await _run(_zero_pieces(kinds, size, node.cluster_size), WORKERS, zero)
    await _run(data, WORKERS, write)
    await run_blocking(os.fsync, fd)
    stats.seconds = progress.finish()


def _pwrite_all(fd: int, buf: bytes | bytearray, offset: int) -> None:
    view = memoryview(buf)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _zero_range(fd: int, offset: int, length: int) -> None:
    chunk = bytes(min(length, 1 << 20))
    end = offset + length
    while offset < end:
        n = min(len(chunk), end - offset)
        _pwrite_all(fd, chunk[:n], offset)
        offset += n
