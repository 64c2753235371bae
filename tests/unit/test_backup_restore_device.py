"""Restore onto a block device: a loop device over a file full of old bytes.

Needs root and a working ``losetup`` (loop devices are often missing in
containers); the tests skip, saying why, when either is not there.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from nbdfleece_backup.cli import main
from nbdfleece_backup.progress import Progress
from nbdfleece_backup.restore import restore
from tests.unit.test_backup_chain import SIZE, build_chain

MiB = 1 << 20
OLD = 0xEE
"""What the device held before the restore."""


@contextlib.contextmanager
def loop_device(backing: Path, size: int) -> Iterator[Path]:
    """A loop device over ``backing`` (made: ``size`` bytes of ``OLD``), detached afterwards."""
    if os.geteuid() != 0:
        pytest.skip("attaching a loop device needs root")
    if shutil.which("losetup") is None:
        pytest.skip("not installed: losetup")
    backing.write_bytes(bytes([OLD]) * size)
    attach = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True, text=True,
                            timeout=30)
    if attach.returncode != 0:
        pytest.skip(f"losetup cannot attach a loop device here: {attach.stderr.strip()}")
    device = Path(attach.stdout.strip())
    try:
        yield device
    finally:
        subprocess.run(["losetup", "--detach", str(device)], capture_output=True, timeout=30, check=False)


def read_device(device: Path, length: int) -> bytes:
    with open(device, "rb") as f:
        return f.read(length)


async def test_restore_onto_a_block_device(tmp_path: Path) -> None:
    """Every byte of the disk is written, the point's zeroes and holes included (the device held
    other bytes there); what lies past the disk on the device is left alone."""
    folder = tmp_path / "backups"
    states = await build_chain(folder, 3)
    with loop_device(tmp_path / "device.img", 12 * MiB) as device:
        for seq in (2, 3):
            stats = await restore(folder, seq, str(device), progress=Progress(quiet=True))
            assert stats.point.seq == seq and stats.zero_bytes > 0
            assert read_device(device, SIZE) == bytes(states[seq - 1]), f"point {seq}"
        assert read_device(device, 12 * MiB)[SIZE:] == bytes([OLD]) * (12 * MiB - SIZE)


def test_restore_refuses_a_device_smaller_than_the_disk(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "backups"
    trio.run(build_chain, folder, 1)
    with loop_device(tmp_path / "small.img", 4 * MiB) as device:
        assert main(["restore", "--from", str(folder), "--to", str(device), "--quiet"]) == 2
        assert capsys.readouterr().err == (f"nbdfleece-backup: {device} is {4 * MiB} bytes, smaller than "
                                           f"the disk ({SIZE} bytes)\n")
        assert read_device(device, 4 * MiB) == bytes([OLD]) * (4 * MiB)  # untouched
