"""Push-mode ``blockdev-backup`` jobs (reference §2.8, Appendix A §9), driven by qemu.qmp.

Full backup to a raw target while the live export is written; an incremental
backup (bitmap b0) into a qcow2 overlay of the full backup; cancel of a
running bitmap job, which must give the bitmap back; QEMU's validation errors.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import qmp_only_server, require, run
from tests.interop.test_fleecing import bitmaps_of, free_port

QMP = pytest.importorskip("qemu.qmp")
SIZE = 64 << 20
pytestmark = pytest.mark.interop

Scenario = Callable[[Any, list[dict[str, Any]], str], Awaitable[dict[str, Any]]]


def drive(tmp_path: Path, live: Path, scenario: Scenario, *, fmt: str = "raw") -> dict[str, Any]:
    """Serve ``live`` (``fmt``: raw over a file node, or qcow2 with its ``file``
    inline) as writable export ``live`` and run ``scenario(client, events, uri)``."""
    port = free_port()

    async def main(sock: Path) -> dict[str, Any]:
        client = QMP.QMPClient("backup-test")
        await client.connect(str(sock))
        events: list[dict[str, Any]] = []

        async def collect() -> None:
            async for event in client.events:
                events.append(dict(event))

        collector = asyncio.create_task(collect())
        x = client.execute
        if fmt == "qcow2":
            await x("blockdev-add", {"driver": "qcow2", "node-name": "live",
                                     "file": {"driver": "file", "filename": str(live)}})
        else:
            await x("blockdev-add", {"driver": "file", "node-name": "live-file", "filename": str(live)})
            await x("blockdev-add", {"driver": "raw", "node-name": "live", "file": "live-file"})
        await x("nbd-server-start", {"addr": {"type": "inet",
                                              "data": {"host": "127.0.0.1", "port": str(port)}}})
        await x("block-export-add", {"type": "nbd", "id": "live", "node-name": "live", "writable": True})
        try:
            return await scenario(client, events, f"nbd://127.0.0.1:{port}/live")
        finally:
            collector.cancel()
            await client.disconnect()

    with qmp_only_server(tmp_path) as sock:
        return asyncio.run(main(sock))


async def wait_for(events: list[dict[str, Any]], match: Callable[[dict[str, Any]], bool],
                   what: str) -> dict[str, Any]:
    """The first collected event ``match`` accepts, waiting for it (60 s at most)."""
    deadline = time.monotonic() + 60
    while True:
        for event in events:
            if match(event):
                return event
        assert time.monotonic() < deadline, f"no {what}: {events}"
        await asyncio.sleep(0.01)


async def wait_event(events: list[dict[str, Any]], name: str, device: str) -> dict[str, Any]:
    event = await wait_for(events, lambda e: e.get("event") == name and e["data"].get("device") == device,
                           f"{name} for {device}")
    data: dict[str, Any] = event["data"]
    return data


def random_live(tmp_path: Path) -> Path:
    """``live.raw``: SIZE random bytes (every cluster allocated and distinct)."""
    live = tmp_path / "live.raw"
    live.write_bytes(os.urandom(SIZE))
    return live


def raw_file(path: Path) -> Path:
    with open(path, "wb") as f:
        f.truncate(SIZE)
    return path


def statuses(events: list[dict[str, Any]], job: str) -> list[str]:
    return [e["data"]["status"] for e in events
            if e.get("event") == "JOB_STATUS_CHANGE" and e["data"]["id"] == job]


def test_full_backup_while_writing(tmp_path: Path) -> None:
    require("qemu-io", "nbdcopy")
    live = random_live(tmp_path)
    target = raw_file(tmp_path / "full.raw")
    before = tmp_path / "before.raw"

    async def scenario(client: Any, events: list[dict[str, Any]], uri: str) -> dict[str, Any]:
        x = client.execute
        await x("blockdev-add", {"driver": "raw", "node-name": "tgt",
                                 "file": {"driver": "file", "filename": str(target)}})
        run(["nbdcopy", uri, str(before)])
        await x("blockdev-backup", {"job-id": "full0", "device": "live", "target": "tgt",
                                    "sync": "full"})
        jobs = await x("query-block-jobs")
        writer = await asyncio.create_subprocess_exec(
            "qemu-io", "-f", "raw", "-c", "write -P 0xaa 63M 1M", "-c", "write -P 0xbb 0 64k",
            "-c", "write -P 0xcc 32M 4k", uri, stdout=asyncio.subprocess.DEVNULL)
        completed = await wait_event(events, "BLOCK_JOB_COMPLETED", "full0")
        assert await writer.wait() == 0
        after = await x("query-block-jobs")
        await x("blockdev-del", {"node-name": "tgt"})
        return {"jobs": jobs, "completed": completed, "after": after}

    result = drive(tmp_path, live, scenario)
    assert result["jobs"][0]["device"] == "full0" and result["jobs"][0]["len"] == SIZE
    assert result["completed"] == {"device": "full0", "len": SIZE, "offset": SIZE, "speed": 0,
                                   "type": "backup"}
    assert result["after"] == []
    assert target.read_bytes() == before.read_bytes()
    image = live.read_bytes()
    assert image[63 << 20 :] == b"\xaa" * (1 << 20) and image[:65536] == b"\xbb" * 65536


def test_incremental_backup_to_qcow2_overlay(tmp_path: Path) -> None:
    require("qemu-io", "qemu-img", "nbdcopy")
    live = random_live(tmp_path)
    full = raw_file(tmp_path / "full.raw")
    inc = tmp_path / "inc.qcow2"
    at_inc = tmp_path / "at-inc.raw"

    async def scenario(client: Any, events: list[dict[str, Any]], uri: str) -> dict[str, Any]:
        x = client.execute
        await x("block-dirty-bitmap-add", {"node": "live", "name": "b0"})
        run(["qemu-io", "-f", "raw", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 4M 64k", uri])
        await x("blockdev-add", {"driver": "raw", "node-name": "full",
                                 "file": {"driver": "file", "filename": str(full)}})
        # The anchor: a full backup that also resets b0 on success.
        await x("blockdev-backup", {"job-id": "full0", "device": "live", "target": "full",
                                    "sync": "full", "bitmap": "b0", "bitmap-mode": "on-success"})
        await wait_event(events, "BLOCK_JOB_COMPLETED", "full0")
        await x("blockdev-del", {"node-name": "full"})
        after_full = await x("query-named-block-nodes", {"flat": True})
        run(["qemu-io", "-f", "raw", "-c", "write -P 0x33 2M 64k", "-c", "write -P 0x44 8M 100",
             "-c", "write -P 0x55 40M 128k", uri])
        run(["nbdcopy", uri, str(at_inc)])
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(full), "-F", "raw", str(inc)])
        await x("blockdev-add", {"driver": "qcow2", "node-name": "inc",
                                 "file": {"driver": "file", "filename": str(inc)}})
        await x("blockdev-backup", {"job-id": "inc0", "device": "live", "target": "inc",
                                    "sync": "incremental", "bitmap": "b0"})
        completed = await wait_event(events, "BLOCK_JOB_COMPLETED", "inc0")
        await x("blockdev-del", {"node-name": "inc"})
        after_inc = await x("query-named-block-nodes", {"flat": True})
        return {"after_full": after_full, "completed": completed, "after_inc": after_inc,
                "events": events}

    result = drive(tmp_path, live, scenario)
    assert bitmaps_of(result["after_full"], "live")[0]["count"] == 0
    assert result["completed"] == {"device": "inc0", "len": 4 * 65536, "offset": 4 * 65536,
                                   "speed": 0, "type": "backup"}
    assert statuses(result["events"], "inc0") == [
        "created", "running", "waiting", "pending", "concluded", "null"]
    b0 = bitmaps_of(result["after_inc"], "live")[0]
    assert b0["name"] == "b0" and b0["count"] == 0 and b0["recording"] and not b0["busy"]
    compare = run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(inc), str(at_inc)],
                  check=False)
    assert compare.returncode == 0, compare.stdout + compare.stderr
    check = run(["qemu-img", "check", str(inc)], check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    mapping = json.loads(run(["qemu-img", "map", "--output=json", str(inc)]).stdout)
    own = [(m["start"], m["length"]) for m in mapping if m["depth"] == 0 and m["data"]]
    assert own == [(2 << 20, 65536), (8 << 20, 65536), (40 << 20, 131072)]


def test_cancel_and_validation(tmp_path: Path) -> None:
    require("qemu-io")
    live = random_live(tmp_path)
    target = raw_file(tmp_path / "tgt.raw")

    async def scenario(client: Any, events: list[dict[str, Any]], uri: str) -> dict[str, Any]:
        x = client.execute
        await x("block-dirty-bitmap-add", {"node": "live", "name": "b0"})
        run(["qemu-io", "-f", "raw", "-c", f"write -P 0x11 0 {SIZE}", uri])
        await x("blockdev-add", {"driver": "raw", "node-name": "tgt",
                                 "file": {"driver": "file", "filename": str(target)}})
        errors = []
        for args in (
            {"sync": "bitmap", "bitmap": "b0"},
            {"sync": "none", "bitmap": "b0", "bitmap-mode": "never"},
            {"sync": "incremental"},
            {"sync": "bitmap", "bitmap": "nope", "bitmap-mode": "never"},
            {"sync": "incremental", "bitmap": "b0", "bitmap-mode": "never"},
        ):
            with pytest.raises(QMP.ExecuteError) as info:
                await x("blockdev-backup", {"job-id": "bad", "device": "live", "target": "tgt", **args})
            errors.append(info.value.error.error.desc)
        # Backup and cancel pipelined: the 64 MiB job is still running at the cancel.
        await asyncio.gather(
            x("blockdev-backup", {"job-id": "push0", "device": "live", "target": "tgt",
                                  "sync": "bitmap", "bitmap": "b0", "bitmap-mode": "on-success"}),
            x("block-job-cancel", {"device": "push0"}),
        )
        cancelled = await wait_event(events, "BLOCK_JOB_CANCELLED", "push0")
        after_cancel = await x("query-named-block-nodes", {"flat": True})
        # bitmap-mode never: a complete job leaves the bitmap as it was.
        await x("blockdev-backup", {"job-id": "push1", "device": "live", "target": "tgt",
                                    "sync": "bitmap", "bitmap": "b0", "bitmap-mode": "never"})
        completed = await wait_event(events, "BLOCK_JOB_COMPLETED", "push1")
        after_never = await x("query-named-block-nodes", {"flat": True})
        return {"errors": errors, "cancelled": cancelled, "after_cancel": after_cancel,
                "completed": completed, "after_never": after_never, "events": events}

    result = drive(tmp_path, live, scenario)
    assert result["errors"] == [
        "Bitmap sync mode must be given when providing a bitmap",
        "sync mode 'none' does not produce meaningful bitmap outputs",
        "must provide a valid bitmap name for 'incremental' sync mode",
        "Bitmap 'nope' could not be found",
        "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'",
    ]
    assert result["cancelled"]["len"] == SIZE and result["cancelled"]["offset"] < SIZE
    assert not any(e.get("event") == "BLOCK_JOB_COMPLETED" and e["data"]["device"] == "push0"
                   for e in result["events"])
    for nodes in (result["after_cancel"], result["after_never"]):
        b0 = bitmaps_of(nodes, "live")[0]
        assert b0["count"] == SIZE and not b0["busy"]
    assert result["completed"]["offset"] == SIZE
    assert target.read_bytes() == live.read_bytes()


def test_qcow2_live_disk_snapshot_push_backup_and_fleecing(tmp_path: Path) -> None:
    """A live disk that is a qcow2 node (``file`` given inline, as libvirt does): the
    snapshot export, a push backup and a fleecing target hold the disk's bytes at
    their instant, never those of the qcow2 file (header, tables) under it."""
    require("qemu-img", "qemu-io", "nbdcopy")
    size = 8 << 20
    live = tmp_path / "live.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(live), str(size)])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xab 0 1M", "-c", "write -P 0xcd 5M 64k", str(live)])
    backup = tmp_path / "full.raw"
    with open(backup, "wb") as f:
        f.truncate(size)
    fleece = tmp_path / "fleece.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(fleece), str(size)])

    async def scenario(client: Any, events: list[dict[str, Any]], live_uri: str) -> dict[str, Any]:
        x = client.execute
        uri = live_uri.rsplit("/", 1)[0]
        await x("blockdev-add", {"driver": "file", "node-name": "bk", "filename": str(backup)})
        await x("blockdev-add", {"driver": "qcow2", "node-name": "fl", "backing": "live",
                                 "file": {"driver": "file", "filename": str(fleece)}})
        before = tmp_path / "before.raw"
        run(["nbdcopy", live_uri, str(before)])
        await x("transaction", {"actions": [
            {"type": "blockdev-backup", "data": {"job-id": "fl0", "device": "live", "target": "fl",
                                                 "sync": "none"}},
            {"type": "blockdev-backup", "data": {"job-id": "bk0", "device": "live", "target": "bk",
                                                 "sync": "full"}},
        ]})
        snapshot = await x("x-nbdfleece-snapshot-create", {"name": "snap", "export": "live"})
        await x("block-export-add", {"type": "nbd", "id": "fl", "node-name": "fl"})
        run(["qemu-io", "-f", "raw", "-c", "write -P 0x11 0 2M", "-c", "write -P 0x22 5M 1M", live_uri])
        completed = await wait_event(events, "BLOCK_JOB_COMPLETED", "bk0")
        copies = {}
        for name in ("snap", "fl", "live"):
            copies[name] = tmp_path / f"{name}.out"
            run(["nbdcopy", f"{uri}/{name}", str(copies[name])])
        await x("block-export-del", {"id": "fl"})
        await x("block-job-cancel", {"device": "fl0"})
        await x("x-nbdfleece-snapshot-delete", {"name": "snap"})
        return {"before": before, "snapshot": snapshot, "completed": completed, "copies": copies}

    result = drive(tmp_path, live, scenario, fmt="qcow2")
    before = result["before"].read_bytes()
    assert len(before) == size and before[:1 << 20] == b"\xab" * (1 << 20)
    assert "error" not in result["completed"], result["completed"]
    assert result["copies"]["snap"].read_bytes() == before
    assert result["copies"]["fl"].read_bytes() == before
    assert backup.read_bytes() == before
    now = result["copies"]["live"].read_bytes()
    assert now[: 2 << 20] == b"\x11" * (2 << 20) and now[5 << 20 : 6 << 20] == b"\x22" * (1 << 20)
    run(["qemu-img", "check", "-q", str(live)])
