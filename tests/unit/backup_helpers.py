"""Build backup folders without a server: the agent's planning and image writing, fed from a bytearray."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from nbdfleece_backup.image import ImageWriter
from nbdfleece_backup.plan import CLUSTER, pieces, plan_full, plan_incremental
from nbdfleece_backup.store import Folder, Point, image_name, now_iso


def data_of(disk: bytearray) -> list[tuple[int, int]]:
    """Clusters of the model disk that hold a non-zero byte, as (offset, length) ranges."""
    size = len(disk)
    padded = np.zeros(-(-size // CLUSTER) * CLUSTER, dtype=np.uint8)
    padded[:size] = np.frombuffer(disk, dtype=np.uint8)
    busy = padded.reshape(-1, CLUSTER).any(axis=1)
    return [(int(c) * CLUSTER, CLUSTER) for c in np.flatnonzero(busy)]


async def add_point(folder: Folder, disk: bytearray, dirty: list[tuple[int, int]] | None = None,
                    checksum: str = "sha256") -> Point:
    """Append a point holding ``disk``: full when ``dirty`` is None, else incremental over ``dirty``."""
    m = folder.manifest
    size = len(disk)
    seq = m.next_seq
    last = m.last
    backing = last.file if dirty is not None and last is not None else None
    kinds = plan_full(data_of(disk), size) if dirty is None else plan_incremental(dirty, data_of(disk), size)
    writer = ImageWriter(folder.image_path(image_name(seq)), size, backing, checksum)
    await writer.open()
    for piece in pieces(kinds, size):
        if piece.zero:
            await writer.zero(piece)
        else:
            chunk = bytes(disk[piece.offset : piece.offset + piece.length])
            await writer.write(piece, chunk)
    image_size = await writer.commit()
    point = Point(seq=seq, kind="full" if dirty is None else "incremental", file=image_name(seq),
                  backing=backing, snapshot_time=now_iso(), finished=now_iso(), disk_size=size,
                  image_size=image_size, bytes_read=writer.data_bytes, data_bytes=writer.data_bytes,
                  zero_bytes=writer.zero_bytes,
                  dirty_bytes=None if dirty is None else sum(n for _, n in dirty),
                  bitmap=f"nbdfleece-{m.id}-p{seq}-test", read_bitmap=None,
                  checksum=writer.digest.hexdigest())
    m.points.append(point)
    m.next_seq = seq + 1
    m.disk_size = size
    m.export = "test"
    folder.save()
    return point


def qemu_img(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img is not installed")
    proc = subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"qemu-img {args} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return proc


def write_raw(path: Path, disk: bytearray) -> Path:
    path.write_bytes(bytes(disk))
    return path
