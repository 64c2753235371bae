"""Jobs as QEMU 7.2 runs them (job.c), driven by qemu.qmp against the real server.

``auto-finalize``/``auto-dismiss`` false on ``blockdev-backup``, the job states
(created, running, paused, waiting, pending, aborting, concluded, null) in QEMU's
order with ``JOB_STATUS_CHANGE`` and ``BLOCK_JOB_PENDING``, the ``job-*`` and
``block-job-*`` verbs with QEMU's refusals, ``query-jobs`` / ``query-block-jobs``,
a failed and a cancelled job kept until dismissed, pause/resume of a running
push job, and a job whose transaction aborts before it starts.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import run
from tests.interop.test_backup_jobs import SIZE, drive, random_live, raw_file, statuses, wait_for
from tests.interop.test_fleecing import bitmaps_of

QMP = pytest.importorskip("qemu.qmp")
pytestmark = pytest.mark.interop

Events = list[dict[str, Any]]


def status_event(job: str, status: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: (e.get("event") == "JOB_STATUS_CHANGE"
                      and e["data"] == {"id": job, "status": status})


async def refused(call: Any) -> tuple[str, str]:
    """``(class, desc)`` of the QMP error a call must end with."""
    with pytest.raises(QMP.ExecuteError) as info:
        await call
    return info.value.error.error.class_, info.value.error.error.desc


def names(events: Events, job: str) -> list[str]:
    """The job's events in order, a status change shown as its status."""
    out = []
    for e in events:
        data = e.get("data", {})
        if data.get("id") == job or data.get("device") == job:
            out.append(data["status"] if e["event"] == "JOB_STATUS_CHANGE" else e["event"])
    return out


def test_manual_finalize_and_dismiss(tmp_path: Path) -> None:
    live = random_live(tmp_path)
    target = raw_file(tmp_path / "full.raw")

    async def scenario(client: Any, events: Events, uri: str) -> dict[str, Any]:
        x = client.execute
        out: dict[str, Any] = {}
        await x("block-dirty-bitmap-add", {"node": "live", "name": "b0"})
        await x("blockdev-add", {"driver": "raw", "node-name": "tgt",
                                 "file": {"driver": "file", "filename": str(target)}})
        await x("blockdev-backup", {"job-id": "j0", "device": "live", "target": "tgt", "sync": "full",
                                    "bitmap": "b0", "bitmap-mode": "on-success",
                                    "auto-finalize": False, "auto-dismiss": False})
        await wait_for(events, lambda e: e.get("event") == "BLOCK_JOB_PENDING", "BLOCK_JOB_PENDING")
        out["pending_jobs"] = await x("query-jobs")
        out["pending_block_jobs"] = await x("query-block-jobs")
        out["pending_nodes"] = await x("query-named-block-nodes", {"flat": True})
        out["refusals"] = [
            await refused(x("job-dismiss", {"id": "j0"})),
            await refused(x("block-job-dismiss", {"id": "j0"})),
            await refused(x("job-complete", {"id": "j0"})),
            await refused(x("job-finalize", {"id": "nope"})),
            await refused(x("block-job-finalize", {"id": "nope"})),
            await refused(x("blockdev-del", {"node-name": "tgt"})),
            await refused(x("blockdev-backup", {"job-id": "j0", "device": "live", "target": "tgt",
                                                "sync": "full"})),
        ]
        await x("job-finalize", {"id": "j0"})
        out["concluded_jobs"] = await x("query-jobs")
        out["concluded_refusals"] = [
            await refused(x("job-finalize", {"id": "j0"})),
            await refused(x("job-cancel", {"id": "j0"})),
            await refused(x("block-job-cancel", {"device": "j0"})),
            await refused(x("job-pause", {"id": "j0"})),
        ]
        await x("job-dismiss", {"id": "j0"})
        out["after"] = await x("query-jobs")
        out["after_nodes"] = await x("query-named-block-nodes", {"flat": True})
        out["dismissed_again"] = await refused(x("job-dismiss", {"id": "j0"}))
        await x("blockdev-del", {"node-name": "tgt"})
        out["events"] = list(events)
        return out

    r = drive(tmp_path, live, scenario)
    assert r["pending_jobs"] == [{"id": "j0", "type": "backup", "status": "pending",
                                  "current-progress": SIZE, "total-progress": SIZE}]
    info = r["pending_block_jobs"][0]
    assert (info["status"], info["auto-finalize"], info["auto-dismiss"], info["ready"], info["busy"]) == (
        "pending", False, False, False, False)
    # Not finalized yet: the bitmap is still the job's.
    b0 = bitmaps_of(r["pending_nodes"], "live")[0]
    assert b0["busy"] and b0["count"] == 0
    assert r["refusals"] == [
        ("GenericError", "Job 'j0' in state 'pending' cannot accept command verb 'dismiss'"),
        ("GenericError", "Job 'j0' in state 'pending' cannot accept command verb 'dismiss'"),
        ("GenericError", "Job 'j0' in state 'pending' cannot accept command verb 'complete'"),
        ("GenericError", "Job not found"),
        ("DeviceNotActive", "Block job 'nope' not found"),
        ("GenericError", "Node 'tgt' is busy: block device is in use by block job: backup"),
        ("GenericError", "Job ID 'j0' already in use"),
    ]
    assert r["concluded_jobs"][0]["status"] == "concluded" and "error" not in r["concluded_jobs"][0]
    assert r["concluded_refusals"] == [
        ("GenericError", f"Job 'j0' in state 'concluded' cannot accept command verb '{verb}'")
        for verb in ("finalize", "cancel", "cancel", "pause")
    ]
    assert r["after"] == [] and r["dismissed_again"] == ("GenericError", "Job not found")
    b0 = bitmaps_of(r["after_nodes"], "live")[0]
    assert not b0["busy"] and b0["count"] == 0
    # QEMU's order: BLOCK_JOB_PENDING right after the status, COMPLETED before concluded.
    assert names(r["events"], "j0") == [
        "created", "running", "waiting", "pending", "BLOCK_JOB_PENDING",
        "BLOCK_JOB_COMPLETED", "concluded", "null"]
    assert next(e["data"] for e in r["events"] if e["event"] == "BLOCK_JOB_PENDING") == {
        "type": "backup", "id": "j0"}
    assert target.read_bytes() == live.read_bytes()


def test_cancelled_and_failed_jobs_wait_for_dismiss(tmp_path: Path) -> None:
    live = random_live(tmp_path)
    target = raw_file(tmp_path / "t.raw")

    async def scenario(client: Any, events: Events, uri: str) -> dict[str, Any]:
        x = client.execute
        out: dict[str, Any] = {}
        await x("block-dirty-bitmap-add", {"node": "live", "name": "b0"})
        run(["qemu-io", "-f", "raw", "-c", "write -P 0x11 0 1M", uri])
        await x("blockdev-add", {"driver": "file", "node-name": "tgt-file", "filename": str(target)})
        await x("blockdev-add", {"driver": "raw", "node-name": "tgt", "file": "tgt-file"})
        # 1. finished, waiting to be finalized, then cancelled: the bitmap is given back
        await x("blockdev-backup", {"job-id": "c0", "device": "live", "target": "tgt",
                                    "sync": "bitmap", "bitmap": "b0", "bitmap-mode": "on-success",
                                    "auto-finalize": False, "auto-dismiss": False})
        await wait_for(events, status_event("c0", "pending"), "c0 pending")
        await x("block-job-cancel", {"device": "c0"})
        out["cancelled_jobs"] = await x("query-jobs")
        out["cancelled_nodes"] = await x("query-named-block-nodes", {"flat": True})
        await x("block-job-dismiss", {"id": "c0"})
        # 2. a target that fails: the job ends with its error and stays concluded
        await x("blockdev-add", {"driver": "x-nbdfleece-fault", "node-name": "bad", "image": "tgt-file",
                                 "rules": [{"ops": ["write"], "errno": "ENOSPC"}]})
        await x("blockdev-backup", {"job-id": "f0", "device": "live", "target": "bad", "sync": "full",
                                    "auto-dismiss": False})
        await wait_for(events, status_event("f0", "concluded"), "f0 concluded")
        out["failed_jobs"] = await x("query-jobs")
        out["failed_block_jobs"] = await x("query-block-jobs")
        await x("job-dismiss", {"id": "f0"})
        await x("blockdev-del", {"node-name": "bad"})
        await x("blockdev-del", {"node-name": "tgt"})
        await x("blockdev-del", {"node-name": "tgt-file"})
        out["events"] = list(events)
        return out

    r = drive(tmp_path, live, scenario)
    assert r["cancelled_jobs"] == [{"id": "c0", "type": "backup", "status": "concluded",
                                    "current-progress": 1 << 20, "total-progress": 1 << 20,
                                    "error": "Operation canceled"}]
    b0 = bitmaps_of(r["cancelled_nodes"], "live")[0]
    assert b0["count"] == 1 << 20 and not b0["busy"]
    assert names(r["events"], "c0") == [
        "created", "running", "waiting", "pending", "BLOCK_JOB_PENDING", "aborting",
        "BLOCK_JOB_CANCELLED", "concluded", "null"]
    failed = r["failed_jobs"][0]
    assert (failed["status"], failed["error"]) == ("concluded", "No space left on device")
    assert failed["current-progress"] < failed["total-progress"] == SIZE
    assert r["failed_block_jobs"][0]["error"] == "No space left on device"
    assert names(r["events"], "f0") == [
        "created", "running", "BLOCK_JOB_ERROR", "aborting", "BLOCK_JOB_COMPLETED", "concluded", "null"]


def test_pause_and_resume(tmp_path: Path) -> None:
    live = random_live(tmp_path)
    target = raw_file(tmp_path / "t.raw")

    async def scenario(client: Any, events: Events, uri: str) -> dict[str, Any]:
        x = client.execute
        out: dict[str, Any] = {}
        # Each 1 MiB step of the job waits 50 ms at the target: the job runs for seconds.
        await x("blockdev-add", {"driver": "x-nbdfleece-fault", "node-name": "tgt",
                                 "image": {"driver": "file", "filename": str(target)},
                                 "rules": [{"ops": ["write"], "delay": 0.05}]})
        await x("blockdev-backup", {"job-id": "p0", "device": "live", "target": "tgt", "sync": "full"})
        await x("job-pause", {"id": "p0"})
        out["paused_at_once"] = (await x("query-block-jobs"))[0]["paused"]
        await wait_for(events, status_event("p0", "paused"), "p0 paused")
        first = (await x("query-jobs"))[0]
        await asyncio.sleep(0.3)
        out["progress"] = (first, (await x("query-jobs"))[0])
        out["refusals"] = [
            await refused(x("job-pause", {"id": "p0"})),
            await refused(x("block-job-cancel", {"device": "p0"})),
            await refused(x("block-job-complete", {"device": "p0"})),
        ]
        await x("block-job-resume", {"device": "p0"})
        out["resumed_twice"] = await refused(x("job-resume", {"id": "p0"}))
        await wait_for(events, lambda e: e.get("event") == "BLOCK_JOB_COMPLETED", "completion")
        out["events"] = list(events)
        return out

    r = drive(tmp_path, live, scenario)
    assert r["paused_at_once"] is True
    before, after = r["progress"]
    assert before["status"] == after["status"] == "paused"
    assert before["current-progress"] == after["current-progress"] < SIZE
    assert r["refusals"] == [
        ("GenericError", "Job is already paused"),
        ("GenericError", "The block job for device 'p0' is currently paused"),
        ("GenericError", "Job 'p0' in state 'paused' cannot accept command verb 'complete'"),
    ]
    assert r["resumed_twice"] == ("GenericError", "Can't resume a job that was not paused")
    assert names(r["events"], "p0") == [
        "created", "running", "paused", "running", "waiting", "pending", "BLOCK_JOB_COMPLETED",
        "concluded", "null"]
    assert target.read_bytes() == live.read_bytes()


def test_fleecing_job_verbs_and_aborted_transaction(tmp_path: Path) -> None:
    live = random_live(tmp_path)
    fleece = raw_file(tmp_path / "fleece.raw")
    target = raw_file(tmp_path / "t.raw")

    async def scenario(client: Any, events: Events, uri: str) -> dict[str, Any]:
        x = client.execute
        out: dict[str, Any] = {}
        await x("block-dirty-bitmap-add", {"node": "live", "name": "b0"})
        run(["qemu-io", "-f", "raw", "-c", "write -P 0x11 0 64k", uri])
        await x("blockdev-add", {"driver": "raw", "node-name": "tgt",
                                 "file": {"driver": "file", "filename": str(target)}})
        # A transaction that aborts after the backup action: its job never starts.
        out["aborted"] = await refused(x("transaction", {"actions": [
            {"type": "blockdev-backup", "data": {"job-id": "t0", "device": "live", "target": "tgt",
                                                 "sync": "bitmap", "bitmap": "b0",
                                                 "bitmap-mode": "on-success"}},
            {"type": "abort", "data": {}},
        ]}))
        out["after_abort"] = (await x("query-jobs"), await x("query-named-block-nodes", {"flat": True}))
        # Fleecing: a job that only copies before writes; paused and resumed at once.
        await x("blockdev-add", {"driver": "raw", "node-name": "fleece",
                                 "file": {"driver": "file", "filename": str(fleece)}})
        await x("blockdev-backup", {"job-id": "fl", "device": "live", "target": "fleece", "sync": "none",
                                    "auto-dismiss": False})
        await x("block-job-pause", {"device": "fl"})
        out["paused"] = await x("query-jobs")
        await x("job-resume", {"id": "fl"})
        run(["qemu-io", "-f", "raw", "-c", "write -P 0x22 1M 128k", uri])
        out["running"] = await x("query-jobs")
        await x("job-cancel", {"id": "fl"})
        out["cancelled"] = await x("query-block-jobs")
        await x("job-dismiss", {"id": "fl"})
        await x("blockdev-del", {"node-name": "fleece"})
        await x("blockdev-del", {"node-name": "tgt"})
        out["events"] = list(events)
        return out

    r = drive(tmp_path, live, scenario)
    assert r["aborted"] == ("GenericError", "Transaction aborted using Abort action")
    jobs, nodes = r["after_abort"]
    assert jobs == []
    b0 = bitmaps_of(nodes, "live")[0]
    assert b0["count"] == 65536 and not b0["busy"]  # given back untouched
    # QEMU's job_cancel_sync of an unstarted job: no BLOCK_JOB_* event at all.
    assert names(r["events"], "t0") == ["created", "aborting", "concluded", "null"]
    assert r["paused"][0]["status"] == "paused"
    assert r["running"] == [{"id": "fl", "type": "backup", "status": "running",
                             "current-progress": 131072, "total-progress": SIZE}]
    cancelled = r["cancelled"][0]
    assert (cancelled["status"], cancelled["error"], cancelled["offset"]) == (
        "concluded", "Operation canceled", 131072)
    assert names(r["events"], "fl") == [
        "created", "running", "paused", "running", "aborting", "BLOCK_JOB_CANCELLED", "concluded",
        "null"]
    assert statuses(r["events"], "fl")[-1] == "null"


def test_speed_and_block_job_set_speed(tmp_path: Path) -> None:
    """``speed`` on ``blockdev-backup`` holds a push job back (8 MiB/s: 8 s for 64 MiB),
    ``block-job-set-speed`` changes it while it runs (0: no limit), both shown by
    ``query-block-jobs`` and the completion event; QEMU's refusals."""
    target = raw_file(tmp_path / "t.raw")
    backup = {"job-id": "s0", "device": "live", "target": "tgt", "sync": "full"}

    async def scenario(client: Any, events: Events, uri: str) -> dict[str, Any]:
        x = client.execute
        await x("blockdev-add", {"driver": "raw", "node-name": "tgt", "file": {"driver": "file",
                                                                               "filename": str(target)}})
        out = {"negative": await refused(x("blockdev-backup", {**backup, "speed": -1}))}
        t0 = time.monotonic()
        await x("blockdev-backup", {**backup, "speed": 8 << 20})
        await asyncio.sleep(0.5)
        job = (await x("query-block-jobs"))[0]
        out["limited"] = (job["speed"], job["offset"], job["len"], time.monotonic() - t0)
        out["set_negative"] = await refused(x("block-job-set-speed", {"device": "s0", "speed": -5}))
        out["unknown"] = await refused(x("block-job-set-speed", {"device": "nope", "speed": 0}))
        await x("block-job-set-speed", {"device": "s0", "speed": 0})
        out["free"] = (await x("query-block-jobs"))[0]["speed"]
        await wait_for(events, lambda e: e.get("event") == "BLOCK_JOB_COMPLETED", "completion")
        out["events"] = list(events)
        return out

    r = drive(tmp_path, live := random_live(tmp_path), scenario)
    assert r["negative"] == ("GenericError", "Parameter 'speed' expects a non-negative value")
    assert r["set_negative"] == ("GenericError", "Parameter 'speed' expects a non-negative value")
    assert r["unknown"] == ("DeviceNotActive", "Block job 'nope' not found")
    speed, offset, length, elapsed = r["limited"]
    # at most 8 MiB/s on average after a first 1 MiB step (the job's steps are 1 MiB)
    assert speed == 8 << 20 and length == SIZE and 0 < offset <= (2 << 20) + elapsed * (8 << 20), r["limited"]
    assert r["free"] == 0
    done = next(e for e in r["events"] if e["event"] == "BLOCK_JOB_COMPLETED")
    assert done["data"]["offset"] == SIZE and done["data"]["speed"] == 0
    assert target.read_bytes() == live.read_bytes()


def test_grouped_transaction(tmp_path: Path) -> None:
    """``completion-mode: grouped``: two push jobs from one transaction; the first
    succeeds and waits for the second (paused meanwhile), whose target fails: the
    first is then cancelled too (QEMU's JobTxn); a bitmap action is refused in
    such a transaction with QEMU's text."""
    second = tmp_path / "second.raw"
    second.write_bytes(os.urandom(SIZE))
    targets = [raw_file(tmp_path / "t1.raw"), raw_file(tmp_path / "t2.raw")]

    async def scenario(client: Any, events: Events, uri: str) -> dict[str, Any]:
        x = client.execute
        await x("blockdev-add", {"driver": "raw", "node-name": "second",
                                 "file": {"driver": "file", "filename": str(second)}})
        await x("blockdev-add", {"driver": "raw", "node-name": "t1",
                                 "file": {"driver": "file", "filename": str(targets[0])}})
        # writes to t2 take 50 ms each (the job runs for seconds); from the 20th on they fail
        await x("blockdev-add", {"driver": "x-nbdfleece-fault", "node-name": "t2",
                                 "image": {"driver": "file", "filename": str(targets[1])},
                                 "rules": [{"ops": ["write"], "delay": 0.05},
                                           {"ops": ["write"], "errno": "EIO", "after": 20}]})
        grouped = {"completion-mode": "grouped"}
        refusal = await refused(x("transaction", {"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "live", "name": "b9"}}],
            "properties": grouped}))
        await x("transaction", {"actions": [
            {"type": "blockdev-backup", "data": {"job-id": "g1", "device": "live", "target": "t1",
                                                 "sync": "full"}},
            {"type": "blockdev-backup", "data": {"job-id": "g2", "device": "second", "target": "t2",
                                                 "sync": "full"}},
        ], "properties": grouped})
        await x("job-pause", {"id": "g2"})  # held at its first step until g1 has finished
        await wait_for(events, status_event("g1", "waiting"), "g1 waiting for g2")
        await x("job-resume", {"id": "g2"})
        await wait_for(events, lambda e: e.get("event") == "BLOCK_JOB_CANCELLED", "g1 cancelled")
        await wait_for(events, lambda e: e.get("event") == "BLOCK_JOB_COMPLETED", "g2 failed")
        # The events arrive through their own task: wait for the last ones the test checks.
        for job in ("g1", "g2"):
            await wait_for(events, status_event(job, "null"), f"{job} dismissed")
        return {"refusal": refusal, "events": list(events), "jobs": await x("query-jobs")}

    r = drive(tmp_path, random_live(tmp_path), scenario)
    assert r["refusal"] == ("GenericError", "Action 'block-dirty-bitmap-add' does not support "
                            "Transaction property completion-mode = grouped")
    assert names(r["events"], "g1")[:3] == ["created", "running", "waiting"]  # done, waiting for g2
    assert names(r["events"], "g1")[-4:] == ["aborting", "BLOCK_JOB_CANCELLED", "concluded", "null"]
    g2 = names(r["events"], "g2")
    assert "BLOCK_JOB_ERROR" in g2 and g2[-4:] == ["aborting", "BLOCK_JOB_COMPLETED", "concluded", "null"]
    failed = next(e for e in r["events"] if e["event"] == "BLOCK_JOB_COMPLETED")
    assert failed["data"]["device"] == "g2" and failed["data"]["error"] == "Input/output error"
    assert r["jobs"] == []
