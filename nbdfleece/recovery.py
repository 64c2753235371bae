"""Crash recovery of snapshot overlays and backup targets.

A server killed in the middle of a snapshot or a backup job leaves files
behind: the snapshot's overlay in the data folder, or a backup target that
holds only part of the backup.  Neither may be silently reused.  So every
running server keeps a *journal* of what it has under way, in its data folder::

    DATA_DIR/jobs-PID-TOKEN.lock   flock()ed for as long as the server lives
    DATA_DIR/jobs-PID-TOKEN.json   {"format": "nbdfleece-jobs", "version": 1,
                                    "entries": {"snapshot:s1": {"kind": "snapshot",
                                                "job": "s1", "path": "/abs/overlay",
                                                "owned": true}, ...}}

Both are created at the first entry and removed by a clean close.  At start-up
:func:`recover` looks at every other journal of the folder: one whose lock
can be taken belongs to a dead server.  Its *owned* files (snapshot overlays,
always inside the data folder) are deleted; the others (targets the user
named) are reported on the log and kept in ``DATA_DIR/interrupted-jobs.json``,
so that every later start reports them again, and a new job that writes to
one logs a warning, until the file is gone or a full backup to it completed.

The journal is written like the bitmap sidecar (``persistence.py``): new file,
fsync, rename over, fsync of the folder.  It is small and written only when a
job starts or ends (control path).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FORMAT = "nbdfleece-jobs"
VERSION = 1
INTERRUPTED = "interrupted-jobs.json"


@dataclass(frozen=True)
class Interrupted:
    """What a dead server left: ``kind`` (snapshot, backup, fleecing, copy-before-write),
    the job or snapshot name, the file, and whether it was removed here."""

    kind: str
    job: str
    path: str
    removed: bool


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_entries(path: Path) -> list[dict[str, Any]]:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        log.error("%s: unreadable job journal (%s); its files are not cleaned up", path, exc)
        return []
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        log.error("%s: not an %s file; ignored", path, FORMAT)
        return []
    entries = doc.get("entries", {})
    found = entries.values() if isinstance(entries, dict) else entries
    return [e for e in found if isinstance(e, dict) and isinstance(e.get("path"), str)]


class JobJournal:
    """This server's journal: ``record`` when a job or snapshot starts, ``forget`` when it ends."""

    def __init__(self, data_dir: str) -> None:
        self.data_dir = Path(data_dir)
        self._entries: dict[str, dict[str, Any]] = {}
        self._stem = f"jobs-{os.getpid()}-{secrets.token_hex(4)}"
        self._lock_fd: int | None = None
        self.interrupted: dict[str, dict[str, Any]] = {}
        """Targets of interrupted jobs (by path), as loaded by :func:`recover`."""

    @property
    def path(self) -> Path:
        return self.data_dir / f"{self._stem}.json"

    def _open(self) -> None:
        if self._lock_fd is not None:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.data_dir / f"{self._stem}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._lock_fd = fd

    def _save(self) -> None:
        try:
            self._open()
            _write_json(self.path, {"format": FORMAT, "version": VERSION, "entries": self._entries})
        except OSError as exc:
            # The job itself can go on; only its clean-up after a crash is at stake.
            log.error("cannot write the job journal in %s: %s", self.data_dir, exc.strerror or exc)

    def record(self, key: str, kind: str, job: str, path: str, *, owned: bool = False) -> None:
        """Note that ``path`` is being written by ``job`` (``owned``: ours to delete)."""
        path = os.path.abspath(path)
        stale = self.interrupted.get(path)
        if stale is not None:
            log.warning("%s '%s' writes to %s, which holds the incomplete result of %s '%s' "
                        "interrupted by a crash", kind, job, path, stale["kind"], stale["job"])
        self._entries[key] = {"kind": kind, "job": job, "path": path, "owned": owned}
        self._save()

    def forget(self, key: str, *, completed_full: bool = False) -> None:
        """The job ended; ``completed_full``: its target now holds a whole backup."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        if completed_full and self.interrupted.pop(entry["path"], None) is not None:
            self._save_interrupted()
        self._save()

    def _save_interrupted(self) -> None:
        try:
            _write_json(self.data_dir / INTERRUPTED,
                        {"format": FORMAT, "version": VERSION, "entries": list(self.interrupted.values())})
        except OSError as exc:
            log.error("cannot update %s: %s", self.data_dir / INTERRUPTED, exc.strerror or exc)

    def close(self) -> None:
        """Clean stop: jobs were cancelled (and reported by their events); owned files
        still listed (a snapshot whose creation failed half-way) are removed."""
        if self._lock_fd is None:
            return
        for entry in self._entries.values():
            if entry["owned"] and _inside(entry["path"], self.data_dir):
                with contextlib.suppress(OSError):
                    os.unlink(entry["path"])
        self._entries.clear()
        for suffix in (".json", ".lock"):
            with contextlib.suppress(FileNotFoundError):
                (self.data_dir / f"{self._stem}{suffix}").unlink()
        os.close(self._lock_fd)
        self._lock_fd = None


def _inside(path: str, folder: Path) -> bool:
    real = os.path.realpath(path)
    return os.path.dirname(real) == os.path.realpath(folder)


def recover(journal: JobJournal) -> list[Interrupted]:
    """Deal with the journals of dead servers in ``journal``'s data folder (see the module
    docstring); fill ``journal.interrupted``; return what was found this time."""
    folder = journal.data_dir
    if not folder.is_dir():
        return []
    found: list[Interrupted] = []
    stems = {p.name.rsplit(".", 1)[0] for p in folder.glob("jobs-*.lock")}
    stems |= {p.name.rsplit(".", 1)[0] for p in folder.glob("jobs-*.json")}
    stems.discard(journal._stem)
    for stem in sorted(stems):
        lock_path = folder / f"{stem}.lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            log.error("cannot open %s: %s", lock_path, exc.strerror)
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live server's journal
            for entry in _read_entries(folder / f"{stem}.json"):
                found.append(_settle(journal, entry))
            for suffix in (".json", ".lock"):
                with contextlib.suppress(FileNotFoundError):
                    (folder / f"{stem}{suffix}").unlink()
        finally:
            os.close(fd)
    previous = _read_entries(folder / INTERRUPTED)
    for entry in previous:
        journal.interrupted.setdefault(entry["path"], entry)
    for path in [p for p in journal.interrupted if not os.path.exists(p)]:
        del journal.interrupted[path]
    for entry in journal.interrupted.values():
        log.warning("%s '%s' was interrupted by a crash: %s is incomplete and must not be used "
                    "as a backup (delete it, or write a full backup to it)",
                    entry["kind"], entry["job"], entry["path"])
    if found or previous or (folder / INTERRUPTED).exists():
        if journal.interrupted:
            journal._save_interrupted()
        else:
            with contextlib.suppress(FileNotFoundError):
                (folder / INTERRUPTED).unlink()
    return found


def _settle(journal: JobJournal, entry: dict[str, Any]) -> Interrupted:
    kind, job, path = str(entry.get("kind")), str(entry.get("job")), entry["path"]
    if entry.get("owned") and _inside(path, journal.data_dir):
        try:
            os.unlink(path)
            log.warning("removed %s, the overlay of %s '%s' interrupted by a crash", path, kind, job)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.error("cannot remove %s (overlay of interrupted %s '%s'): %s", path, kind, job,
                      exc.strerror)
            return Interrupted(kind, job, path, False)
        return Interrupted(kind, job, path, True)
    journal.interrupted[path] = {"kind": kind, "job": job, "path": path}
    return Interrupted(kind, job, path, False)
