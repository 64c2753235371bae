"""Image fleecing the QEMU 7.2 way (reference §3.1, Appendix A §6), driven by qemu.qmp.

blockdev-add a target (raw, or a qcow2 overlay backed by the live node) ->
transaction {bitmap-add b1, bitmap-disable b0, blockdev-backup sync=none} ->
block-export-add of the target with b0 -> live writes -> the export still reads
the point in time, b0 shows what changed before it, b1 what changed after ->
teardown: export-del, block-job-cancel, blockdev-del, bitmap-remove.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import qmp_only_server, require, run

QMP = pytest.importorskip("qemu.qmp")
SIZE = 64 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def scenario(sock: Path, live: Path, target: Path, fmt: str, port: int, work: Path) -> dict[str, Any]:
    client = QMP.QMPClient("fleecing-test")
    await client.connect(str(sock))
    events: list[dict[str, Any]] = []

    async def collect() -> None:
        async for event in client.events:
            events.append(dict(event))

    collector = asyncio.create_task(collect())
    x = client.execute
    uri = f"nbd://127.0.0.1:{port}"
    await x("blockdev-add", {"driver": "file", "node-name": "live-file", "filename": str(live)})
    await x("blockdev-add", {"driver": "raw", "node-name": "live", "file": "live-file"})
    target_file = {"driver": "file", "filename": str(target)}
    if fmt == "qcow2":
        await x("blockdev-add", {"driver": "qcow2", "node-name": "fleece", "file": target_file,
                                 "backing": "live"})
    else:
        await x("blockdev-add", {"driver": "raw", "node-name": "fleece", "file": target_file})
    await x("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": str(port)}}})
    await x("block-export-add", {"type": "nbd", "id": "live", "node-name": "live", "writable": True})
    await x("block-dirty-bitmap-add", {"node": "live", "name": "b0"})
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 4M 64k", f"{uri}/live"])
    before = work / "before.raw"
    run(["nbdcopy", f"{uri}/live", str(before)])
    await x("transaction", {"actions": [
        {"type": "block-dirty-bitmap-add", "data": {"node": "live", "name": "b1", "granularity": 65536}},
        {"type": "block-dirty-bitmap-disable", "data": {"node": "live", "name": "b0"}},
        {"type": "blockdev-backup", "data": {"job-id": "fleecing", "device": "live",
                                             "target": "fleece", "sync": "none"}},
    ]})
    jobs = await x("query-block-jobs")
    await x("block-export-add", {"type": "nbd", "id": "fleece", "node-name": "fleece", "name": "fleece",
                                 "writable": False, "bitmaps": ["b0"]})
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x55 0 64k", "-c", "write -P 0x66 2M 64k", f"{uri}/live"])
    copy = work / "fleece-copy.raw"
    run(["nbdcopy", "--connections=4", f"{uri}/fleece", str(copy)])
    frozen_map = run(["nbdinfo", "--map=qemu:dirty-bitmap:b0", f"{uri}/fleece"]).stdout
    write_to_snapshot = run(["qemu-io", "-f", "raw", "-c", "write -P 0x77 0 512", f"{uri}/fleece"],
                            check=False)
    nodes = await x("query-named-block-nodes", {"flat": True})
    await x("block-export-del", {"id": "fleece"})
    await x("block-job-cancel", {"device": "fleecing"})
    await x("blockdev-del", {"node-name": "fleece"})
    await x("block-dirty-bitmap-remove", {"node": "live", "name": "b0"})
    after_nodes = await x("query-named-block-nodes", {"flat": True})
    await asyncio.sleep(0.1)
    collector.cancel()
    await client.disconnect()
    return {
        "jobs": jobs, "before": before, "copy": copy, "frozen_map": frozen_map,
        "write_to_snapshot": write_to_snapshot, "nodes": nodes, "after_nodes": after_nodes,
        "events": events,
    }


def run_with_qmp_server(tmp_path: Path, body: Callable[[Path, int], Awaitable[Any]]) -> Any:
    """Start ``nbdfleece serve --qmp`` alone, run ``body(sock, port)``, stop it (rc 0)."""
    port = free_port()
    with qmp_only_server(tmp_path) as sock:
        return asyncio.run(body(sock, port))


def bitmaps_of(nodes: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    node = next(n for n in nodes if n["node-name"] == name)
    found: list[dict[str, Any]] = node.get("dirty-bitmaps", [])
    return found


@pytest.mark.interop
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_classic_fleecing_transaction(tmp_path: Path, fmt: str) -> None:
    require("qemu-io", "qemu-img", "nbdcopy", "nbdinfo")
    live = tmp_path / "live.raw"
    live.write_bytes(os.urandom(SIZE))
    target = tmp_path / f"fleece.{fmt}"
    if fmt == "qcow2":
        run(["qemu-img", "create", "-q", "-f", "qcow2", str(target), str(SIZE)])
    else:
        with open(target, "wb") as f:
            f.truncate(SIZE)
    result = run_with_qmp_server(tmp_path, lambda sock, port: scenario(sock, live, target, fmt, port,
                                                                       tmp_path))

    assert result["jobs"] == [{
        "auto-finalize": True, "io-status": "ok", "device": "fleecing", "auto-dismiss": True,
        "busy": False, "len": SIZE, "offset": 0, "status": "running", "paused": False,
        "speed": 0, "ready": False, "type": "backup",
    }]
    # The point in time, byte for byte, after later live writes.
    assert result["copy"].read_bytes() == result["before"].read_bytes()
    # b0 (frozen by the transaction) shows exactly the writes before it.
    assert result["frozen_map"].split("\n")[:4] == [
        "         0     1048576    1  dirty",
        "   1048576     3145728    0  clean",
        "   4194304       65536    1  dirty",
        "   4259840    62849024    0  clean",
    ]
    assert result["write_to_snapshot"].returncode != 0
    # b1 (added in the transaction) counts only the two later 64 KiB writes; b0 frozen.
    live_bitmaps = {b["name"]: b for b in bitmaps_of(result["nodes"], "live")}
    assert live_bitmaps["b1"]["count"] == 131072 and live_bitmaps["b1"]["recording"]
    assert live_bitmaps["b0"]["count"] == 1048576 + 65536 and not live_bitmaps["b0"]["recording"]
    assert [b["name"] for b in bitmaps_of(result["after_nodes"], "live")] == ["b1"]
    cancelled = [e for e in result["events"] if e.get("event") == "BLOCK_JOB_CANCELLED"]
    assert len(cancelled) == 1
    data = cancelled[0]["data"]
    assert data["device"] == "fleecing" and data["len"] == SIZE and data["type"] == "backup"
    assert data["offset"] == 2 * 65536  # the two clusters copied before being overwritten
    # The live image holds every acknowledged write.
    image = live.read_bytes()
    assert image[:65536] == b"\x55" * 65536 and image[2 << 20 : (2 << 20) + 65536] == b"\x66" * 65536
    assert image[65536 : 1 << 20] == b"\x11" * ((1 << 20) - 65536)
    if fmt == "qcow2":
        check = run(["qemu-img", "check", str(target)], check=False)
        assert check.returncode == 0, check.stdout + check.stderr
        # The overlay holds the old data of exactly the clusters that were copied.
        overlay = run(["qemu-img", "map", "--output=json", "-f", "qcow2", str(target)]).stdout
        first = '"start": 0, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true'
        assert first in overlay


async def cbw_scenario(sock: Path, live: Path, target: Path, port: int, work: Path) -> dict[str, Any]:
    """The QEMU >= 7.0 recipe (perf-baseline W5): copy-before-write + snapshot-access nodes,
    inserted while the live export is in use (no blockdev-reopen, no pause)."""
    client = QMP.QMPClient("cbw-test")
    await client.connect(str(sock))
    x = client.execute
    uri = f"nbd://127.0.0.1:{port}"
    await x("blockdev-add", {"driver": "file", "node-name": "live-file", "filename": str(live)})
    await x("blockdev-add", {"driver": "raw", "node-name": "live", "file": "live-file"})
    await x("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": str(port)}}})
    await x("block-export-add", {"type": "nbd", "id": "exp-live", "node-name": "live", "name": "bench",
                                 "writable": True})
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x11 0 1M", f"{uri}/bench"])
    before = work / "before.raw"
    run(["nbdcopy", f"{uri}/bench", str(before)])
    await x("blockdev-add", {"driver": "qcow2", "node-name": "fleece",
                             "file": {"driver": "file", "filename": str(target)}})
    await x("blockdev-add", {"driver": "copy-before-write", "node-name": "cbw", "file": "live",
                             "target": "fleece"})
    await x("blockdev-add", {"driver": "snapshot-access", "node-name": "snap", "file": "cbw"})
    await x("block-export-add", {"type": "nbd", "id": "exp-fleece", "node-name": "snap",
                                 "name": "bench-fleece", "writable": False})
    # Writes through the export of 'live' itself (not of the filter node) are covered too.
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x55 0 2M", "-c", "write -P 0x66 10M 64k", f"{uri}/bench"])
    copy = work / "fleece-copy.raw"
    run(["nbdcopy", f"{uri}/bench-fleece", str(copy)])
    await x("block-export-del", {"id": "exp-fleece"})
    await x("blockdev-del", {"node-name": "snap"})
    await x("blockdev-del", {"node-name": "cbw"})
    await x("blockdev-del", {"node-name": "fleece"})
    # After the filter is gone, live writes no longer touch the target.
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x77 20M 64k", f"{uri}/bench"])
    await client.disconnect()
    return {"before": before, "copy": copy}


@pytest.mark.interop
def test_copy_before_write_and_snapshot_access_nodes(tmp_path: Path) -> None:
    require("qemu-io", "qemu-img", "nbdcopy")
    live = tmp_path / "live.raw"
    live.write_bytes(os.urandom(SIZE))
    target = tmp_path / "fleece.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", str(target), str(SIZE)])
    result = run_with_qmp_server(tmp_path, lambda sock, port: cbw_scenario(sock, live, target, port,
                                                                           tmp_path))
    assert result["copy"].read_bytes() == result["before"].read_bytes()
    check = run(["qemu-img", "check", str(target)], check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    # The target holds exactly the clusters copied before being overwritten: 2 MiB + 64 KiB.
    mapped = run(["qemu-img", "map", "--output=json", "-f", "qcow2", str(target)]).stdout
    assert '"start": 0, "length": 2097152' in mapped and '"start": 10485760, "length": 65536' in mapped
    assert '"start": 20971520, "length": 65536, "depth": 0, "present": true' not in mapped


async def cbw_bitmap_scenario(sock: Path, live: Path, work: Path, port: int) -> dict[str, Any]:
    """Reference Appendix A §8: a copy-before-write filter with ``bitmap``."""
    client = QMP.QMPClient("cbw-bitmap-test")
    await client.connect(str(sock))
    x = client.execute
    uri = f"nbd://127.0.0.1:{port}"
    out: dict[str, Any] = {}

    async def refused(args: dict[str, Any]) -> str:
        with pytest.raises(QMP.ExecuteError) as info:
            await x("blockdev-add", args)
        desc: str = info.value.error.error.desc
        return desc

    await x("blockdev-add", {"driver": "file", "node-name": "proto", "filename": str(live)})
    await x("blockdev-add", {"driver": "raw", "node-name": "live", "file": "proto"})
    await x("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": str(port)}}})
    await x("block-export-add", {"type": "nbd", "id": "live", "node-name": "live", "writable": True})
    await x("block-dirty-bitmap-add", {"node": "live", "name": "b2"})
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x77 2M 64k", "-c", "write -P 0x88 8M 64k", f"{uri}/live"])
    out["before"] = live.read_bytes()  # every write above was acknowledged
    target = work / "fleece3.raw"
    with open(target, "wb") as f:
        f.truncate(SIZE)
    small = work / "small.raw"
    with open(small, "wb") as f:
        f.truncate(SIZE // 2)
    await x("blockdev-add", {"driver": "file", "node-name": "tmp3", "filename": str(target)})
    await x("blockdev-add", {"driver": "file", "node-name": "small", "filename": str(small)})
    await x("block-dirty-bitmap-add", {"node": "small", "name": "half"})
    await x("block-dirty-bitmap-add", {"node": "proto", "name": "cbwmap", "granularity": 65536,
                                       "disabled": True})
    await x("block-dirty-bitmap-merge", {"node": "proto", "target": "cbwmap",
                                         "bitmaps": [{"node": "live", "name": "b2"}]})
    cbw = {"driver": "copy-before-write", "node-name": "fl-cbw3", "file": "proto", "target": "tmp3"}
    out["refusals"] = [
        await refused({**cbw, "bitmap": {"node": "nope", "name": "cbwmap"}}),
        await refused({**cbw, "bitmap": {"node": "proto", "name": "nope"}}),
        await refused({**cbw, "bitmap": {"node": "small", "name": "half"}}),
    ]
    await x("blockdev-add", {**cbw, "bitmap": {"node": "proto", "name": "cbwmap"}})
    await x("blockdev-add", {"driver": "snapshot-access", "node-name": "fl-access3", "file": "fl-cbw3"})
    with pytest.raises(QMP.ExecuteError) as info:
        await x("block-export-add", {"type": "nbd", "id": "snap3", "node-name": "fl-access3",
                                     "name": "snap3", "bitmaps": ["cbwmap"]})
    out["local_name"] = info.value.error.error.desc
    await x("block-export-add", {"type": "nbd", "id": "snap3", "node-name": "fl-access3", "name": "snap3",
                                 "bitmaps": [{"node": "proto", "name": "cbwmap"}]})
    # Live writes inside (2M) and outside (0, 16M) the bitmap.
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x55 2M 64k", "-c", "write -P 0x66 0 64k",
         "-c", "write -P 0x44 16M 64k", f"{uri}/live"])
    out["map"] = run(["nbdinfo", "--map=qemu:dirty-bitmap:cbwmap", f"{uri}/snap3"]).stdout
    out["reads"] = run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0x77 2M 64k",
                        "-c", "read -P 0x88 8M 64k", f"{uri}/snap3"]).stdout
    out["outside"] = run(["qemu-io", "-r", "-f", "raw", "-c", "read 0 64k", f"{uri}/snap3"], check=False)
    out["straddling"] = run(["qemu-io", "-r", "-f", "raw", "-c", "read 2M 128k", f"{uri}/snap3"],
                            check=False)
    out["base_map"] = run(["nbdinfo", "--map", f"{uri}/snap3"], check=False)
    await x("block-export-del", {"id": "snap3"})
    await asyncio.sleep(0.1)
    for node in ("fl-access3", "fl-cbw3", "tmp3", "small"):
        await x("blockdev-del", {"node-name": node})
    await x("block-dirty-bitmap-remove", {"node": "proto", "name": "cbwmap"})
    await client.disconnect()
    out["target"] = target.read_bytes()
    return out


@pytest.mark.interop
def test_copy_before_write_bitmap(tmp_path: Path) -> None:
    require("qemu-io", "nbdinfo")
    live = tmp_path / "live.raw"
    live.write_bytes(os.urandom(SIZE))
    r = run_with_qmp_server(tmp_path, lambda sock, port: cbw_bitmap_scenario(sock, live, tmp_path, port))
    assert r["refusals"] == [
        "Node 'nope' not found",
        "Dirty bitmap 'nope' not found",
        "Cannot create block-copy-state: Failed to merge bitmap 'half' to internal copy-bitmap: "
        "Bitmaps are incompatible and can't be merged",
    ]
    assert r["local_name"] == "Bitmap 'cbwmap' is not found"
    assert r["map"].split("\n")[:5] == [
        "         0     2097152    0  clean",
        "   2097152       65536    1  dirty",
        "   2162688     6225920    0  clean",
        "   8388608       65536    1  dirty",
        "   8454144    58654720    0  clean",
    ]
    assert r["reads"].count("read 65536/65536 bytes") == 2
    # Outside the bitmap, even partly: EACCES inside QEMU, EINVAL on the wire.
    assert r["outside"].returncode != 0 and "Invalid argument" in r["outside"].stdout + r["outside"].stderr
    assert r["straddling"].returncode != 0
    assert r["base_map"].returncode != 0 and "Invalid argument" in r["base_map"].stderr
    # Only the written cluster inside the bitmap was copied; the others were not.
    target = r["target"]
    assert target[2 << 20 : (2 << 20) + 65536] == r["before"][2 << 20 : (2 << 20) + 65536]
    assert not target.replace(b"\0", b"")[65536:]  # nothing but those 64 KiB
    image = live.read_bytes()
    assert image[:65536] == b"\x66" * 65536 and image[16 << 20 : (16 << 20) + 65536] == b"\x44" * 65536


async def cbw_timeout_scenario(sock: Path, live: Path, work: Path, port: int, policy: str) -> dict[str, Any]:
    """``cbw-timeout`` with a target whose first write takes 2 s (a fault node)."""
    client = QMP.QMPClient("cbw-timeout-test")
    await client.connect(str(sock))
    x = client.execute
    uri = f"nbd://127.0.0.1:{port}"
    out: dict[str, Any] = {}
    target = work / "ovl.raw"
    with open(target, "wb") as f:
        f.truncate(SIZE)
    await x("blockdev-add", {"driver": "file", "node-name": "proto", "filename": str(live)})
    await x("blockdev-add", {"driver": "raw", "node-name": "live", "file": "proto"})
    await x("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": str(port)}}})
    await x("block-export-add", {"type": "nbd", "id": "live", "node-name": "live", "writable": True})
    await x("blockdev-add", {"driver": "x-nbdfleece-fault", "node-name": "slow",
                             "image": {"driver": "file", "filename": str(target)},
                             "rules": [{"ops": ["write"], "delay": 2.0, "once": True}]})
    await x("blockdev-add", {"driver": "copy-before-write", "node-name": "cbw", "file": "live",
                             "target": "slow", "cbw-timeout": 1, "on-cbw-error": policy})
    await x("blockdev-add", {"driver": "snapshot-access", "node-name": "snap", "file": "cbw"})
    await x("block-export-add", {"type": "nbd", "id": "snap", "node-name": "snap"})
    out["first"] = run(["qemu-io", "-f", "raw", "-c", "write -P 0x55 1M 4k", f"{uri}/live"], check=False)
    # The timed-out copy goes on in the background; once it is done, writes pass.
    deadline = time.monotonic() + 30
    while True:
        again = run(["qemu-io", "-f", "raw", "-c", "write -P 0x56 1M 4k", f"{uri}/live"], check=False)
        if again.returncode == 0 and "wrote 4096/4096" in again.stdout:
            break
        assert time.monotonic() < deadline, again.stdout + again.stderr
        await asyncio.sleep(0.2)
    out["snapshot"] = run(["qemu-io", "-r", "-f", "raw", "-c", "read -v 1M 16", f"{uri}/snap"],
                          check=False)
    await x("block-export-del", {"id": "snap"})
    await asyncio.sleep(0.1)
    for node in ("snap", "cbw", "slow"):
        await x("blockdev-del", {"node-name": node})
    await client.disconnect()
    return out


@pytest.mark.interop
@pytest.mark.parametrize("policy", ["break-guest-write", "break-snapshot"])
def test_cbw_timeout(tmp_path: Path, policy: str) -> None:
    require("qemu-io")
    live = tmp_path / "live.raw"
    old = os.urandom(SIZE)
    live.write_bytes(old)
    r = run_with_qmp_server(tmp_path, lambda sock, port: cbw_timeout_scenario(sock, live, tmp_path, port,
                                                                             policy))
    first = r["first"]
    snapshot = r["snapshot"]
    if policy == "break-guest-write":
        # The guest write failed (ETIMEDOUT, sent as EIO) and the snapshot is whole.
        assert "write failed: Input/output error" in first.stdout + first.stderr
        assert snapshot.returncode == 0
        assert " ".join(f"{b:02x}" for b in old[1 << 20 : (1 << 20) + 16]) in snapshot.stdout
    else:
        # The guest write passed; the snapshot broke: its reads fail.
        assert first.returncode == 0 and "wrote 4096/4096" in first.stdout
        assert "read failed: Input/output error" in snapshot.stdout + snapshot.stderr
    assert live.read_bytes()[1 << 20 : (1 << 20) + 4096] == b"\x56" * 4096


async def discard_scenario(sock: Path, live: Path, target: Path, port: int) -> dict[str, Any]:
    """A writable export of ``snapshot-access``: TRIM is a snapshot discard with
    ``discard: unmap`` (QEMU 7.2, checked with qemu-storage-daemon: discarded
    clusters then read as EINVAL, writes get ENOTSUP), a no-op without it."""
    client = QMP.QMPClient("discard-test")
    await client.connect(str(sock))
    x = client.execute
    uri = f"nbd://127.0.0.1:{port}"
    out: dict[str, Any] = {}
    await x("blockdev-add", {"driver": "file", "node-name": "live-file", "filename": str(live)})
    await x("blockdev-add", {"driver": "raw", "node-name": "live", "file": "live-file"})
    await x("blockdev-add", {"driver": "qcow2", "node-name": "fleece",
                             "file": {"driver": "file", "filename": str(target)}})
    await x("blockdev-add", {"driver": "copy-before-write", "node-name": "cbw", "file": "live",
                             "target": "fleece"})
    await x("blockdev-add", {"driver": "snapshot-access", "node-name": "snap", "file": "cbw",
                             "discard": "unmap"})
    await x("blockdev-add", {"driver": "snapshot-access", "node-name": "snap2", "file": "cbw"})
    await x("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": str(port)}}})
    await x("block-export-add", {"type": "nbd", "id": "e-live", "node-name": "live", "name": "live",
                                 "writable": True})
    for node in ("snap", "snap2"):
        await x("block-export-add", {"type": "nbd", "id": f"e-{node}", "node-name": node, "name": node,
                                     "writable": True})
    # clusters 0..3 copied into the overlay by live writes
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x22 0 256k", f"{uri}/live"])
    snap, snap2 = f"{uri}/snap", f"{uri}/snap2"
    out["write"] = run(["qemu-io", "-f", "raw", "-c", "write -P 0x33 512k 64k", snap], check=False)
    out["zero"] = run(["qemu-io", "-f", "raw", "-c", "write -z 512k 64k", snap], check=False)
    out["ignored"] = run(["qemu-io", "-f", "raw", "-c", "discard 0 128k", "-c", "read 0 64k", snap2],
                         check=False)
    out["discard"] = run(["qemu-io", "-f", "raw", "-c", "discard 0 128k", snap], check=False)
    out["read0"] = run(["qemu-io", "-f", "raw", "-c", "read 0 64k", snap], check=False)
    out["read64k"] = run(["qemu-io", "-f", "raw", "-c", "read 64k 64k", snap2], check=False)
    out["tiny"] = run(["qemu-io", "-f", "raw", "-c", "discard 200k 100k", snap], check=False)
    out["after"] = run(["qemu-io", "-f", "raw", "-c", "read 128k 128k", snap], check=False)
    nodes = await x("query-named-block-nodes")
    out["alive"] = any(n["node-name"] == "snap" for n in nodes)
    for node in ("snap", "snap2"):
        await x("block-export-del", {"id": f"e-{node}"})
    await x("block-export-del", {"id": "e-live"})
    await asyncio.sleep(0.2)
    for node in ("snap", "snap2", "cbw", "fleece"):
        await x("blockdev-del", {"node-name": node})
    await client.disconnect()
    return out


@pytest.mark.interop
def test_snapshot_access_discard(tmp_path: Path) -> None:
    require("qemu-io", "qemu-img")
    live = tmp_path / "live.raw"
    old = os.urandom(SIZE)
    live.write_bytes(old)
    target = tmp_path / "fleece.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", str(target), str(SIZE)])
    out = run_with_qmp_server(tmp_path, lambda sock, port: discard_scenario(sock, live, target, port))
    for key in ("write", "zero"):
        assert out[key].returncode != 0 or "Operation not supported" in out[key].stdout, out[key]
        assert "Operation not supported" in out[key].stdout + out[key].stderr, out[key]
    assert "read 65536/65536 bytes at offset 0" in out["ignored"].stdout, out["ignored"]  # discard=ignore
    assert "discard 131072/131072 bytes at offset 0" in out["discard"].stdout, out["discard"]
    assert "Invalid argument" in out["read0"].stdout + out["read0"].stderr, out["read0"]
    # the same clusters through the other snapshot-access node of the same filter: gone too
    assert "Invalid argument" in out["read64k"].stdout + out["read64k"].stderr, out["read64k"]
    assert "discard 102400/102400 bytes at offset 204800" in out["tiny"].stdout, out["tiny"]
    assert "read 131072/131072 bytes at offset 131072" in out["after"].stdout, out["after"]
    assert out["alive"]
    # the overlay gave back the two discarded clusters and kept the two others
    check = run(["qemu-img", "check", str(target)], check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    mapped = run(["qemu-img", "map", "--output=json", "-f", "qcow2", str(target)]).stdout
    assert '"start": 131072, "length": 131072, "depth": 0, "present": true, "zero": false, "data": true' \
        in mapped, mapped
    assert '"start": 0, "length": 131072, "depth": 0, "present": true, "zero": false, "data": true' \
        not in mapped, mapped
