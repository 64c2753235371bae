"""The job journal (``recovery.py``): what a killed server leaves is cleaned up or
reported, a live server's journal is left alone, a clean close leaves nothing.

A "killed server" is a child process that records entries and dies with SIGKILL,
so its flock is released by the kernel exactly as after a crash.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import threading
from multiprocessing.process import BaseProcess
from pathlib import Path

import pytest
import trio

from nbdfleece import recovery
from nbdfleece.recovery import INTERRUPTED, JobJournal, recover


def _record_then(data_dir: str, overlay: str, target: str, die: bool, ready: object) -> None:
    journal = JobJournal(data_dir)
    journal.record("snapshot:s1", "snapshot", "s1", overlay, owned=True)
    journal.record("job:bk", "backup job", "bk", target)
    journal.record("job:done", "backup job", "done", target + ".2")
    journal.forget("job:done")
    ready.set()  # type: ignore[attr-defined]
    if die:
        os.kill(os.getpid(), signal.SIGKILL)
    signal.pause()  # alive, holding the lock, until the test kills it


def run_writer(tmp_path: Path, *, die: bool) -> tuple[BaseProcess, Path, Path]:
    data = tmp_path / "data"
    overlay = data / "snapshot-s1.overlay"
    target = tmp_path / "target.raw"
    data.mkdir(exist_ok=True)
    overlay.write_bytes(b"old clusters")
    target.write_bytes(b"half a backup")
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    proc = ctx.Process(target=_record_then, args=(str(data), str(overlay), str(target), die, ready))
    proc.start()
    assert ready.wait(10)
    if die:
        proc.join(10)
        assert proc.exitcode == -signal.SIGKILL
    return proc, overlay, target


def test_dead_server_overlays_removed_targets_reported(tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    _, overlay, target = run_writer(tmp_path, die=True)
    journal = JobJournal(str(tmp_path / "data"))
    with caplog.at_level(logging.WARNING, logger="nbdfleece.recovery"):
        found = recover(journal)
    assert sorted((i.kind, i.job, i.removed) for i in found) == [
        ("backup job", "bk", False), ("snapshot", "s1", True)]
    assert not overlay.exists()
    assert target.read_bytes() == b"half a backup"  # the user's file: reported, never deleted
    assert list((tmp_path / "data").glob("jobs-*")) == []
    assert f"{target} is incomplete" in caplog.text and str(overlay) in caplog.text
    # reported again at every start, and when a new job writes to it
    caplog.clear()
    again = JobJournal(str(tmp_path / "data"))
    with caplog.at_level(logging.WARNING, logger="nbdfleece.recovery"):
        assert recover(again) == []
        assert f"{target} is incomplete" in caplog.text
        again.record("job:new", "backup job", "new", str(target))
        assert "holds the incomplete result of backup job 'bk'" in caplog.text
    # a full backup that completes makes it a backup again
    again.forget("job:new", completed_full=True)
    assert not (tmp_path / "data" / INTERRUPTED).exists() or \
        json.loads((tmp_path / "data" / INTERRUPTED).read_text())["entries"] == []
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nbdfleece.recovery"):
        recover(JobJournal(str(tmp_path / "data")))
    assert "incomplete" not in caplog.text
    again.close()


def test_report_dropped_when_the_target_is_deleted(tmp_path: Path) -> None:
    _, _, target = run_writer(tmp_path, die=True)
    first = JobJournal(str(tmp_path / "data"))
    recover(first)
    assert str(target) in first.interrupted
    target.unlink()
    second = JobJournal(str(tmp_path / "data"))
    recover(second)
    assert second.interrupted == {}
    assert not (tmp_path / "data" / INTERRUPTED).exists()


def test_live_server_journal_is_left_alone(tmp_path: Path) -> None:
    proc, overlay, _ = run_writer(tmp_path, die=False)
    try:
        journal = JobJournal(str(tmp_path / "data"))
        assert recover(journal) == []
        assert overlay.exists()
        assert len(list((tmp_path / "data").glob("jobs-*.json"))) == 1
    finally:
        proc.kill()
        proc.join(10)
    found = recover(JobJournal(str(tmp_path / "data")))
    assert {i.job for i in found} == {"s1", "bk"} and not overlay.exists()


def test_clean_close_leaves_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    journal = JobJournal(str(data))
    assert not data.exists()  # nothing is written before the first entry
    overlay = data / "snapshot-x.overlay"
    journal.record("snapshot:x", "snapshot", "x", str(overlay), owned=True)
    overlay.write_bytes(b"x")
    outside = tmp_path / "not-ours.overlay"
    outside.write_bytes(b"y")
    journal.record("snapshot:y", "snapshot", "y", str(outside), owned=True)
    doc = json.loads(journal.path.read_text())
    assert set(doc["entries"]) == {"snapshot:x", "snapshot:y"}
    journal.close()
    assert list(data.iterdir()) == []
    assert outside.exists()  # never deletes outside the data folder


def test_unreadable_journal_is_reported_not_fatal(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "jobs-1-deadbeef.json").write_text("{not json")
    with caplog.at_level(logging.ERROR, logger="nbdfleece.recovery"):
        assert recover(JobJournal(str(data))) == []
    assert "unreadable job journal" in caplog.text


async def test_inside_trio_the_journal_is_written_by_a_worker_in_order(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    journal = JobJournal(str(data))
    written: list[tuple[str, int]] = []
    real_write = recovery.write_atomic

    def spy(path: Path, payload: bytes) -> None:
        written.append((threading.current_thread().name, len(json.loads(payload)["entries"])))
        real_write(path, payload)

    monkeypatch.setattr(recovery, "write_atomic", spy)
    journal.record("job:0", "backup job", "0", str(tmp_path / "t0.raw"))
    assert not data.exists()  # record() itself does no I/O on the event loop
    first = journal.synced_event()
    assert not first.is_set()
    for i in range(1, 20):
        journal.record(f"job:{i}", "backup job", str(i), str(tmp_path / f"t{i}.raw"))
        if i % 3 == 0:
            await trio.sleep(0)  # let writes start while entries keep changing
    await first.wait()
    assert "job:0" in json.loads(journal.path.read_text())["entries"]  # durable when set
    await journal.sync()
    assert set(json.loads(journal.path.read_text())["entries"]) == {f"job:{i}" for i in range(20)}
    assert journal.synced_event().is_set()
    assert written and all(name.startswith("nbdfleece-io-") for name, _ in written)
    counts = [n for _, n in written]
    assert counts == sorted(counts) and counts[-1] == 20  # never back to an older state
    journal.forget("job:0")
    await journal.aclose()  # waits for the pending write, then removes everything
    assert list(data.iterdir()) == []
