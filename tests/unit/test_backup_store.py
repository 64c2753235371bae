"""The backup folder: manifest, lock, and what a killed run leaves behind."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from nbdfleece_backup.errors import BackupError
from nbdfleece_backup.store import Folder, Manifest, describe_os_error
from tests.unit.backup_helpers import add_point

MiB = 1 << 20


async def test_manifest_round_trip(tmp_path: Path) -> None:
    async with Folder(tmp_path, create=True) as folder:
        await add_point(folder, bytearray(b"\x01" * MiB))
        await add_point(folder, bytearray(b"\x02" + b"\x01" * (MiB - 1)), [(0, 1)])
        saved = folder.manifest
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["format"] == "nbdfleece-backup" and data["version"] == 1
    assert [p["file"] for p in data["points"]] == ["point-0001.qcow2", "point-0002.qcow2"]
    again = Manifest.from_json(data, "m")
    assert again == saved
    assert [p.seq for p in again.chain(2)] == [1, 2]
    assert again.points[1].backing == "point-0001.qcow2"


@pytest.mark.parametrize("text, message", [
    ("{", "not valid JSON"),
    ('{"format": "other"}', "not an nbdfleece-backup manifest"),
    ('{"format": "nbdfleece-backup", "version": 9}', "version 9 is not supported"),
    ('{"format": "nbdfleece-backup", "version": 1, "id": "x"}', "malformed manifest"),
])
async def test_bad_manifest_is_refused(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(BackupError, match=message) as caught:
        async with Folder(tmp_path):
            pass
    assert caught.value.status == 2


async def test_images_without_a_manifest_are_not_taken_for_an_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "point-0001.qcow2").write_bytes(b"x")
    with pytest.raises(BackupError, match=r"holds backup images but no manifest\.json"):
        async with Folder(tmp_path):
            pass


async def test_a_killed_run_leaves_nothing_the_next_run_keeps(tmp_path: Path) -> None:
    async with Folder(tmp_path, create=True) as folder:
        await add_point(folder, bytearray(b"\x01" * MiB))
    # What a backup killed at each step leaves: a temp image, a renamed image the
    # manifest does not name yet, a temp manifest; and a file that is not ours.
    (tmp_path / "point-0002.qcow2.tmp").write_bytes(b"half")
    (tmp_path / "point-0003.qcow2").write_bytes(b"whole but uncommitted")
    (tmp_path / "manifest.json.tmp").write_text("{")
    (tmp_path / "notes.txt").write_text("mine")
    before = (tmp_path / "manifest.json").read_text()
    async with Folder(tmp_path) as folder:
        assert len(folder.recovered) == 3
        assert [p.seq for p in folder.manifest.points] == [1]
    assert sorted(os.listdir(tmp_path)) == [".lock", "manifest.json", "notes.txt", "point-0001.qcow2"]
    assert (tmp_path / "manifest.json").read_text() == before


async def test_one_writer_at_a_time(tmp_path: Path) -> None:
    async with Folder(tmp_path, create=True):
        with pytest.raises(BackupError, match="another nbdfleece-backup is working on"):
            async with Folder(tmp_path, create=True):  # a second backup into the same folder
                pass
    async with Folder(tmp_path, create=True):  # released
        pass


async def test_reading_a_folder_no_backup_made_is_refused(tmp_path: Path) -> None:
    """verify, list, restore or prune on any other directory: an error, and nothing written."""
    (tmp_path / "notes.txt").write_text("x")
    for write in (False, True):
        with pytest.raises(BackupError, match=r"is not a backup folder \(no manifest.json\)"):
            async with Folder(tmp_path, write=write):
                pass
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_full_disk_message() -> None:
    text = describe_os_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "cannot write x")
    assert text == "cannot write x: the backup folder's filesystem is full (No space left on device)"


async def test_not_a_folder(tmp_path: Path) -> None:
    with pytest.raises(BackupError, match="no such directory"):
        async with Folder(tmp_path / "missing"):
            pass
