"""The image writer: piece data written off the event loop's thread (even on tmpfs, where the
project's file store would write inline), and the checksum it records for what it wrote."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest

import nbdfleece.block.file as file_store
from nbdfleece.block.file import memory_backed
from nbdfleece_backup.image import BULK, ImageWriter, content_digest
from nbdfleece_backup.plan import ContentDigest, Piece, piece_checksum
from tests.unit.backup_helpers import qemu_img

MiB = 1 << 20


@pytest.mark.parametrize("algorithm", ["xxh3-128", "sha256", "crc32"])
async def test_pieces_are_written_off_the_loop_and_hashed(tmp_path: Path, algorithm: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    shm = Path("/dev/shm")
    folder = tmp_path
    if shm.is_dir() and os.access(shm, os.W_OK):
        folder = Path(os.path.realpath(shm)) / f"nbdfleece-test-{os.getpid()}-{algorithm}"
        folder.mkdir()
    try:
        writes: list[tuple[str, int]] = []
        real_pwrite = file_store._pwrite_full

        def spy(fd: int, view: memoryview, *args: Any) -> None:
            writes.append((threading.current_thread().name, len(view)))
            real_pwrite(fd, view, *args)

        monkeypatch.setattr(file_store, "_pwrite_full", spy)
        writer = ImageWriter(folder / "point-0001.qcow2", 16 * MiB, None, algorithm)
        await writer.open()
        fd = os.open(writer.tmp, os.O_RDONLY)
        on_tmpfs = memory_backed(fd)
        os.close(fd)
        data = [os.urandom(4 * MiB), os.urandom(MiB + 64 * 1024)]
        await writer.write(Piece(0, 4 * MiB, False), bytearray(data[0]))
        await writer.write(Piece(8 * MiB, len(data[1]), False), memoryview(data[1]))
        await writer.zero(Piece(4 * MiB, MiB, True))
        await writer.commit()
        data_writes = [thread for thread, n in writes if n >= BULK]
        assert data_writes and threading.main_thread().name not in data_writes, (writes, on_tmpfs)
        expected = ContentDigest(algorithm)
        expected.add(Piece(0, 4 * MiB, False), piece_checksum(algorithm, data[0]))
        expected.add(Piece(4 * MiB, MiB, True), None)
        expected.add(Piece(8 * MiB, len(data[1]), False), piece_checksum(algorithm, data[1]))
        assert writer.digest.hexdigest() == expected.hexdigest()
        assert writer.data_bytes == 5 * MiB + 64 * 1024 and writer.zero_bytes == MiB
        content = await content_digest(writer.final, algorithm)  # what verify recomputes
        assert content.checksum == expected.hexdigest()
        qemu_img("check", str(writer.final))
        raw = folder / "image.raw"
        qemu_img("convert", "-O", "raw", str(writer.final), str(raw))
        image = raw.read_bytes()
        assert image[: 4 * MiB] == data[0] and image[8 * MiB : 8 * MiB + len(data[1])] == data[1]
        assert image[4 * MiB : 8 * MiB] == bytes(4 * MiB)
        assert image[8 * MiB + len(data[1]) :] == bytes(8 * MiB - len(data[1]))
    finally:
        if folder != tmp_path:
            for name in os.listdir(folder):
                os.unlink(folder / name)
            folder.rmdir()
