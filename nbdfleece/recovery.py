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

The journal is written like the bitmap sidecar (``durable.py``): new file,
fsync, rename over, fsync of the folder.  ``record`` and ``forget`` are called
in the middle of atomic, synchronous steps (a transaction, a job's end), so
they only change the entries in memory; inside trio the file is then written
by a worker thread (``block/workers.py``), never on the event loop.  Writes
are serialized and each writes the newest entries, so the file never goes back
to an older state.  What is recorded is durable before it is written to: a
copy-before-write filter copies nothing into its target before the
:meth:`JobJournal.synced_event` the daemon gives it is set (this covers
snapshot overlays, fleecing and push backup targets), and a QMP command
replies only after :meth:`JobJournal.sync` (``qmp/commands.py``).  Only the
empty, sparse overlay file of a snapshot is created before its entry is
durable: a crash in that millisecond leaves it in the data folder, and a new
snapshot of that name truncates it.  Outside trio (tests, tools) the file is
written at once.
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

import trio

from nbdfleece.block.workers import run_blocking
from nbdfleece.durable import write_atomic

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


def _document(entries: Any) -> bytes:
    return json.dumps({"format": FORMAT, "version": VERSION, "entries": entries}).encode()


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
        self._changes = 0
        """Changes made to the entries (``record``/``forget``) ..."""
        self._saved = 0
        """... and how many of them the file holds."""
        self._interrupted_changed = False
        self._writing = trio.Lock()
        """One write at a time, in order (inside trio)."""
        self._flush_scheduled = False
        self._synced_events: list[tuple[int, trio.Event]] = []

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

    def _changed(self) -> None:
        """Have the new entries written: at once outside trio, else by a worker thread."""
        self._changes += 1
        if not trio.lowlevel.in_trio_run():
            self._write(self._take())
            return
        if not self._flush_scheduled:
            self._flush_scheduled = True
            trio.lowlevel.spawn_system_task(self._flush, name="job-journal")

    async def _flush(self) -> None:
        self._flush_scheduled = False  # later changes schedule another flush
        try:
            await self.sync()
        except Exception:  # a bug: a system task must not take the server down
            log.exception("writing the job journal failed")

    async def sync(self) -> None:
        """Return once the journal file holds every change made so far."""
        if self._saved == self._changes and not self._interrupted_changed:
            return
        async with self._writing:
            if self._saved == self._changes and not self._interrupted_changed:
                return  # a write that started after our changes has covered them
            try:
                await run_blocking(self._write, self._take())
            except Exception:
                self._wake(everything=True)  # a bug: never leave a copy waiting for it
                raise
            self._wake()

    def synced_event(self) -> trio.Event:
        """An event set once the file holds every change made so far (a write that failed
        was logged and counts as done: the job goes on)."""
        event = trio.Event()
        if self._saved >= self._changes:
            event.set()
        else:
            self._synced_events.append((self._changes, event))
        return event

    def _wake(self, *, everything: bool = False) -> None:
        waiting = []
        for changes, event in self._synced_events:
            if everything or changes <= self._saved:
                event.set()
            else:
                waiting.append((changes, event))
        self._synced_events = waiting

    def _take(self) -> tuple[int, bytes | None, bytes | None]:
        """What to write, encoded now, so the writing thread never reads entries the loop
        changes: (changes it covers, the journal, the interrupted-jobs file or None)."""
        journal = _document(self._entries) if self._saved != self._changes else None
        interrupted = _document(list(self.interrupted.values())) if self._interrupted_changed else None
        self._interrupted_changed = False
        return self._changes, journal, interrupted

    def _write(self, pending: tuple[int, bytes | None, bytes | None]) -> None:
        """Blocking: write what :meth:`_take` took.  A failure is logged: the job itself can
        go on, only its clean-up after a crash is at stake."""
        changes, journal, interrupted = pending
        if journal is not None:
            try:
                self._open()
                write_atomic(self.path, journal)
            except OSError as exc:
                log.error("cannot write the job journal in %s: %s", self.data_dir, exc.strerror or exc)
        if interrupted is not None:
            self._write_interrupted(interrupted)
        self._saved = max(self._saved, changes)

    def record(self, key: str, kind: str, job: str, path: str, *, owned: bool = False) -> None:
        """Note that ``path`` is being written by ``job`` (``owned``: ours to delete)."""
        path = os.path.abspath(path)
        stale = self.interrupted.get(path)
        if stale is not None:
            log.warning("%s '%s' writes to %s, which holds the incomplete result of %s '%s' "
                        "interrupted by a crash", kind, job, path, stale["kind"], stale["job"])
        self._entries[key] = {"kind": kind, "job": job, "path": path, "owned": owned}
        self._changed()

    def forget(self, key: str, *, completed_full: bool = False) -> None:
        """The job ended; ``completed_full``: its target now holds a whole backup."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        if completed_full and self.interrupted.pop(entry["path"], None) is not None:
            self._interrupted_changed = True
        self._changed()

    def _save_interrupted(self) -> None:
        """Blocking: rewrite ``interrupted-jobs.json`` now (start-up, before serving)."""
        self._interrupted_changed = False
        self._write_interrupted(_document(list(self.interrupted.values())))

    def _write_interrupted(self, data: bytes) -> None:
        try:
            write_atomic(self.data_dir / INTERRUPTED, data)
        except OSError as exc:
            log.error("cannot update %s: %s", self.data_dir / INTERRUPTED, exc.strerror or exc)

    async def aclose(self) -> None:
        """:meth:`close` inside trio: after the writes under way, off the event loop."""
        async with self._writing:
            await run_blocking(self._remove, self._detach())

    def close(self) -> None:
        """Clean stop: jobs were cancelled (and reported by their events); owned files
        still listed (a snapshot whose creation failed half-way) are removed."""
        self._remove(self._detach())

    def _detach(self) -> tuple[list[str], int | None, bytes | None]:
        """Take, on the loop, what a close removes: the owned files, the lock, and the
        interrupted-jobs file if it is still to be written."""
        owned = [e["path"] for e in self._entries.values() if e["owned"]]
        self._entries.clear()
        self._saved = self._changes  # nothing is left to write: the journal goes away
        interrupted = _document(list(self.interrupted.values())) if self._interrupted_changed else None
        self._interrupted_changed = False
        lock_fd, self._lock_fd = self._lock_fd, None
        self._wake(everything=True)
        return owned, lock_fd, interrupted

    def _remove(self, detached: tuple[list[str], int | None, bytes | None]) -> None:
        """Blocking part of a close."""
        owned, lock_fd, interrupted = detached
        if interrupted is not None:
            self._write_interrupted(interrupted)
        for path in owned:
            if _inside(path, self.data_dir):
                with contextlib.suppress(OSError):
                    os.unlink(path)
        if lock_fd is None:
            return
        for suffix in (".json", ".lock"):
            with contextlib.suppress(FileNotFoundError):
                (self.data_dir / f"{self._stem}{suffix}").unlink()
        os.close(lock_fd)


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
