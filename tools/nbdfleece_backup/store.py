"""The backup folder: qcow2 images, the manifest, a lock, and crash-safe updates.

Layout of a folder::

    manifest.json          what the folder holds (the only file that commits anything)
    point-0001.qcow2       a full backup (no backing file)
    point-0002.qcow2       an incremental: backing file "point-0001.qcow2" (relative)
    point-0003.qcow2       ...
    .lock                  flock: one writer (backup, prune) at a time

Every change follows one rule: new files are written under a temporary name,
fsynced and renamed into place, and only then does a new ``manifest.json``
(also written as temp + fsync + rename, then the folder fsynced) name them.
A process killed at any point therefore leaves the previous manifest, which
names only complete images; what it left behind (``*.tmp`` files, images no
manifest names, an interrupted prune recorded in ``pending``) is cleaned up or
finished by :meth:`Folder.recover`, which every command runs first.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nbdfleece import durable
from nbdfleece.block.qcow2 import MAX_BACKING_DEPTH
from nbdfleece.block.workers import run_blocking
from nbdfleece.durable import TMP_SUFFIX
from nbdfleece.durable import fsync_dir as fsync_dir
from nbdfleece_backup.errors import BackupError

MANIFEST = "manifest.json"
MAX_CHAIN_IMAGES = MAX_BACKING_DEPTH + 1
"""Images a restore opens in one chain: a full backup and its incrementals."""
LOCK = ".lock"
FORMAT = "nbdfleece-backup"
VERSION = 1
IMAGE_RE = re.compile(r"point-(\d{4,})\.qcow2\Z")


def image_name(seq: int) -> str:
    return f"point-{seq:04d}.qcow2"


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Point:
    """One restorable point: a qcow2 image and what it took to make it."""

    seq: int
    kind: str
    """``full`` or ``incremental``."""
    file: str
    backing: str | None
    """The previous image's file name (the qcow2 backing file), None for a full backup."""
    snapshot_time: str
    """When the point-in-time snapshot was taken (UTC, ISO 8601)."""
    finished: str
    disk_size: int
    image_size: int
    """Bytes of the qcow2 file."""
    bytes_read: int
    """Bytes read over NBD to make this image."""
    data_bytes: int
    """Guest bytes stored as data clusters in this image."""
    zero_bytes: int
    """Guest bytes stored as zero clusters (dirty ranges that now read as zeroes)."""
    dirty_bytes: int | None
    """Incremental: bytes the frozen bitmap reported dirty."""
    bitmap: str
    """The bitmap started at this snapshot: it tracks changes since this point."""
    read_bitmap: str | None
    """Incremental: the frozen bitmap whose dirty extents were read."""
    checksum: str
    """``ALGORITHM:HEX`` of the image's content (see ``image.py``; ALGORITHM is the pieces' checksum,
    one of ``plan.CHECKSUMS``), layout-independent."""
    seconds: float = 0.0
    copy_seconds: float = 0.0
    """Of ``seconds``, the data path alone: NBD connections opened, block status, reads,
    image written and committed (what ``nbdcopy`` of the snapshot does)."""
    note: str | None = None
    """Why a full backup was taken when an incremental was asked for, or what prune did."""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Point:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class Manifest:
    """``manifest.json``: the folder's identity and its points, oldest first."""

    id: str = field(default_factory=lambda: secrets.token_hex(4))
    """Random; names the folder's bitmaps and scratch objects on the server."""
    export: str | None = None
    disk_size: int | None = None
    next_seq: int = 1
    points: list[Point] = field(default_factory=list)
    pending: dict[str, Any] | None = None
    """An operation that must be finished after a crash (prune)."""

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "id": self.id, "export": self.export,
                "disk_size": self.disk_size, "next_seq": self.next_seq,
                "points": [asdict(p) for p in self.points], "pending": self.pending}

    @classmethod
    def from_json(cls, data: Any, where: str) -> Manifest:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise BackupError(f"{where} is not an nbdfleece-backup manifest", 2)
        if data.get("version") != VERSION:
            raise BackupError(f"{where}: manifest version {data.get('version')} is not supported", 2)
        try:
            return cls(id=str(data["id"]), export=data.get("export"), disk_size=data.get("disk_size"),
                       next_seq=int(data["next_seq"]),
                       points=[Point.from_json(p) for p in data["points"]], pending=data.get("pending"))
        except (KeyError, TypeError, ValueError) as exc:
            raise BackupError(f"{where}: malformed manifest ({exc})", 2) from None

    # -- the chain ----------------------------------------------------------------
    def point(self, seq: int) -> Point:
        for p in self.points:
            if p.seq == seq:
                return p
        known = ", ".join(str(p.seq) for p in self.points) or "none"
        raise BackupError(f"there is no point {seq} (points: {known})", 2)

    def chain(self, seq: int) -> list[Point]:
        """The images point ``seq`` needs, full backup first."""
        by_file = {p.file: p for p in self.points}
        out = [self.point(seq)]
        while out[-1].backing is not None:
            parent = by_file.get(out[-1].backing)
            if parent is None:
                raise BackupError(f"point {out[-1].seq}: its backing image {out[-1].backing} is not in "
                                  "the manifest")
            out.append(parent)
        return out[::-1]

    @property
    def last(self) -> Point | None:
        return self.points[-1] if self.points else None


# -- crash-safe file helpers ------------------------------------------------------------


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: temp file, fsync, rename, fsync the folder."""
    try:
        durable.write_atomic(path, data)
    except OSError as exc:
        raise BackupError(describe_os_error(exc, f"cannot write {path}")) from None


def describe_os_error(exc: OSError, what: str) -> str:
    if exc.errno == errno.ENOSPC:
        return f"{what}: the backup folder's filesystem is full (No space left on device)"
    if exc.errno == errno.EDQUOT:
        return f"{what}: disk quota exceeded"
    return f"{what}: {exc.strerror or exc}"


# -- the folder ----------------------------------------------------------------------------


class Folder:
    """A backup folder, locked while in use (``async with Folder(path) as folder``)."""

    def __init__(self, path: str | os.PathLike[str], *, create: bool = False, write: bool = True) -> None:
        self.path = Path(path)
        self.write = write
        if create:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise BackupError(describe_os_error(exc, f"cannot create {self.path}")) from None
        if not self.path.is_dir():
            raise BackupError(f"{self.path} is not a backup folder (no such directory)", 2)
        if not create and not (self.path / MANIFEST).exists():
            # Only a backup makes a folder: reading (or locking) any other directory is a mistake.
            self._refuse_stray_images()
            raise BackupError(f"{self.path} is not a backup folder (no {MANIFEST})", 2)
        self._lock_fd = -1
        self.manifest = Manifest()
        self.recovered: list[str] = []

    async def __aenter__(self) -> Folder:
        await self._lock()
        try:
            self.manifest = self._load()
            self.recovered = await self.recover()
            if not self.write:  # readers share the folder once it is consistent
                fcntl.flock(self._lock_fd, fcntl.LOCK_SH)
        except BaseException:
            self._unlock()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._unlock()

    def _unlock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    async def _lock(self) -> None:
        try:
            self._lock_fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            if not self.write and exc.errno in (errno.EACCES, errno.EROFS):
                self._lock_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
            else:
                raise BackupError(describe_os_error(exc, f"cannot lock {self.path}")) from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if self.write:
                os.close(self._lock_fd)
                self._lock_fd = -1
                raise BackupError(f"another nbdfleece-backup is working on {self.path}") from None
            print(f"nbdfleece-backup: waiting for another nbdfleece-backup working on {self.path}",
                  file=sys.stderr)
            await run_blocking(fcntl.flock, self._lock_fd, fcntl.LOCK_EX)

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def _refuse_stray_images(self) -> None:
        """No manifest: images in the folder mean it was lost, not that the folder is new."""
        if any(IMAGE_RE.match(n) for n in os.listdir(self.path)):
            raise BackupError(f"{self.path} holds backup images but no {MANIFEST}", 2)

    def _load(self) -> Manifest:
        try:
            text = self.manifest_path.read_text()
        except FileNotFoundError:
            self._refuse_stray_images()
            return Manifest()
        except OSError as exc:
            raise BackupError(describe_os_error(exc, f"cannot read {self.manifest_path}")) from None
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise BackupError(f"{self.manifest_path}: not valid JSON ({exc})", 2) from None
        return Manifest.from_json(data, str(self.manifest_path))

    def save(self) -> None:
        """Commit the manifest (atomically)."""
        text = json.dumps(self.manifest.to_json(), indent=2) + "\n"
        write_atomic(self.manifest_path, text.encode())

    def image_path(self, name: str) -> Path:
        return self.path / name

    def temp_path(self, name: str) -> Path:
        return self.path / (name + TMP_SUFFIX)

    # -- recovery --------------------------------------------------------------------
    async def recover(self) -> list[str]:
        """Finish or undo what a killed run left; returns what was done (for the log)."""
        done: list[str] = []
        if self.manifest.pending is not None:
            from nbdfleece_backup.prune import finish_pending  # prune needs the folder type

            done += await finish_pending(self)
        referenced = {p.file for p in self.manifest.points}
        for name in sorted(os.listdir(self.path)):
            path = self.path / name
            if name.endswith(TMP_SUFFIX) and (IMAGE_RE.match(name[: -len(TMP_SUFFIX)]) or name in (
                    MANIFEST + TMP_SUFFIX,)):
                self._unlink(path)
                done.append(f"removed {name} (left by an interrupted run)")
            elif IMAGE_RE.match(name) and name not in referenced:
                self._unlink(path)
                done.append(f"removed {name} (no manifest names it: an interrupted run)")
        if done and self.write:
            fsync_dir(self.path)
        return done

    def _unlink(self, path: Path) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if self.write:  # a reader of a read-only folder leaves the leftovers alone
                raise BackupError(describe_os_error(exc, f"cannot remove {path}")) from None

    def images(self) -> Iterator[Path]:
        for p in self.manifest.points:
            yield self.image_path(p.file)
