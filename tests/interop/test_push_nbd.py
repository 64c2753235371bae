"""Push backups over NBD: ``blockdev-backup`` into a ``blockdev-add driver=nbd`` node.

The source is nbdfleece's live export (driven with qemu.qmp, as in
``test_backup_jobs``); the target is a raw file served by ``qemu-nbd`` or
by a second nbdfleece server.  A full backup (which also resets bitmap b0)
and then an incremental one (b0) run while ``qemu-io`` writes to the live
export; after each, the target must equal the image as it was when the job
started (``qemu-img compare``).
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from nbdfleece.block.nbd import NbdNode
from nbdfleece.block.node import Segment
from nbdfleece.client import NbdAddress, NbdConnectionError
from nbdfleece.constants import AllocationState, Errno
from nbdfleece.errors import nbd_errno
from tests.conftest import ServerProcess, make_image, require, run
from tests.interop.test_backup_jobs import SIZE, drive, raw_file, statuses, wait_event
from tests.interop.test_client import qemu_process

QMP = pytest.importorskip("qemu.qmp")
pytestmark = pytest.mark.interop

WRITES = [  # each pair of bursts overlaps the running job somewhere in the 64 MiB
    ["write -P 0xa1 0 1M", "write -P 0xa2 63M 1M", "write -P 0xa3 32M 4k", "write -P 0xa4 17M 300k"],
    ["write -P 0xb1 5M 64k", "write -P 0xb2 40M 1M", "write -P 0xb3 0 4k", "write -P 0xb4 62M 2M"],
]


def qemu_io_args(uri: str, commands: list[str]) -> list[str]:
    args = ["-f", "raw"]
    for command in commands:
        args += ["-c", command]
    return [*args, uri]


async def backup_while_writing(x: Any, events: list[dict[str, Any]], uri: str, job: str,
                               arguments: dict[str, Any], writes: list[str],
                               at_start: Path) -> dict[str, Any]:
    """Copy the export to ``at_start``, start the job, write while it runs; its completion."""
    run(["nbdcopy", uri, str(at_start)])
    await x("blockdev-backup", {"job-id": job, "device": "live", "target": "tgt", **arguments})
    writer = await asyncio.create_subprocess_exec("qemu-io", *qemu_io_args(uri, writes),
                                                  stdout=asyncio.subprocess.DEVNULL)
    completed = await wait_event(events, "BLOCK_JOB_COMPLETED", job)
    assert await writer.wait() == 0
    return completed


def push_scenario(tmp_path: Path, server: dict[str, Any]) -> Callable[..., Any]:
    """Full (b0 on-success) then incremental (b0) into the nbd node ``tgt`` at ``server``."""
    full_at, inc_at = tmp_path / "full-at-start.raw", tmp_path / "inc-at-start.raw"

    async def scenario(client: Any, events: list[dict[str, Any]], uri: str) -> dict[str, Any]:
        x = client.execute
        await x("block-dirty-bitmap-add", {"node": "live", "name": "b0"})
        await x("blockdev-add", {"driver": "nbd", "node-name": "tgt", "server": server, "export": "tgt"})
        nodes = await x("query-named-block-nodes", {"flat": True})
        full = await backup_while_writing(x, events, uri, "full0",
                                          {"sync": "full", "bitmap": "b0", "bitmap-mode": "on-success"},
                                          WRITES[0], full_at)
        return {"nodes": nodes, "full": full, "events": events, "inc": await incremental(x, events, uri)}

    async def incremental(x: Any, events: list[dict[str, Any]], uri: str) -> dict[str, Any]:
        completed = await backup_while_writing(x, events, uri, "inc0",
                                               {"sync": "incremental", "bitmap": "b0"}, WRITES[1], inc_at)
        await x("blockdev-del", {"node-name": "tgt"})
        after = await x("query-named-block-nodes", {"flat": True})
        return {"completed": completed, "after": after}

    return scenario


def check_result(result: dict[str, Any], target: Path, tmp_path: Path) -> None:
    node = next(n for n in result["nodes"] if n["node-name"] == "tgt")
    assert node["drv"] == "nbd" and not node["ro"] and node["image"]["virtual-size"] == SIZE
    assert node["file"].startswith(("nbd+unix:///tgt?socket=", "nbd://127.0.0.1:"))
    assert node["file"].endswith(("tgt.sock", "/tgt"))
    assert result["full"] == {"device": "full0", "len": SIZE, "offset": SIZE, "speed": 0, "type": "backup"}
    inc = result["inc"]["completed"]
    assert "error" not in inc and inc["device"] == "inc0" and 0 < inc["len"] < SIZE
    assert statuses(result["events"], "inc0") == [
        "created", "running", "waiting", "pending", "concluded", "null"]
    assert all(n["node-name"] != "tgt" for n in result["inc"]["after"])
    compare = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(target),
                   str(tmp_path / "inc-at-start.raw")], check=False)
    assert compare.returncode == 0, compare.stdout + compare.stderr


@contextmanager
def qemu_nbd_target(tmp_path: Path, target: Path, *extra: str) -> Iterator[Path]:
    sock = tmp_path / "tgt.sock"
    with qemu_process(["qemu-nbd", "-t", "-k", str(sock), "-x", "tgt", "-f", "raw", *extra, str(target)],
                      sock, tmp_path / "qemu-nbd.log"):
        yield sock


def test_push_full_and_incremental_into_qemu_nbd(tmp_path: Path) -> None:
    require("qemu-nbd", "qemu-io", "qemu-img", "nbdcopy", "nbdinfo")
    live = tmp_path / "live.raw"
    live.write_bytes(os.urandom(SIZE))
    target = raw_file(tmp_path / "target.raw")
    # qemu-nbd's default --shared=1 serves one client at a time: nbdinfo gets
    # through afterwards only because blockdev-del closed the node's connection.
    with qemu_nbd_target(tmp_path, target) as sock:
        result = drive(tmp_path, live, push_scenario(tmp_path, {"type": "unix", "path": str(sock)}))
        size = run(["nbdinfo", "--size", f"nbd+unix:///tgt?socket={sock}"], timeout=20).stdout
        assert int(size) == SIZE
    check_result(result, target, tmp_path)


def test_push_full_and_incremental_into_nbdfleece(
        tmp_path: Path, server_factory: Callable[..., ServerProcess]) -> None:
    require("qemu-io", "qemu-img", "nbdcopy")
    live = tmp_path / "live.raw"
    live.write_bytes(os.urandom(SIZE))
    target = raw_file(tmp_path / "target.raw")
    remote = server_factory("--export", f"tgt={target}")
    result = drive(tmp_path, live, push_scenario(
        tmp_path, {"type": "inet", "host": "127.0.0.1", "port": str(remote.port)}))
    check_result(result, target, tmp_path)
    assert "conn" in remote.log()


def test_blockdev_add_nbd_refusals(tmp_path: Path) -> None:
    require("qemu-nbd")
    live = tmp_path / "live.raw"
    live.write_bytes(bytes(SIZE))
    readonly = raw_file(tmp_path / "ro.raw")

    def unix(path: Path) -> dict[str, str]:
        return {"type": "unix", "path": str(path)}

    with qemu_nbd_target(tmp_path, readonly, "-r", "-e", "4") as sock:
        async def scenario(client: Any, events: list[dict[str, Any]], uri: str) -> dict[str, Any]:
            x = client.execute
            errors = []
            for args in (
                {"server": unix(tmp_path / "none.sock"), "export": "tgt"},
                {"server": unix(sock), "export": "nosuch"},
                {"server": unix(sock), "export": "tgt"},  # read-only export, writable node
                {"server": unix(sock), "export": "tgt", "tls-creds": "tls0"},
                {"server": {"type": "inet", "host": "127.0.0.1", "port": "nbd-port"}, "export": "tgt"},
                {"server": unix(sock), "export": "tgt", "reconnect-delay": 5},
            ):
                with pytest.raises(QMP.ExecuteError) as info:
                    await x("blockdev-add", {"driver": "nbd", "node-name": "tgt", **args})
                errors.append(info.value.error.error.desc)
            await x("blockdev-add", {"driver": "nbd", "node-name": "tgt", "server": unix(sock),
                                     "export": "tgt", "read-only": True})
            with pytest.raises(QMP.ExecuteError) as backup:
                await x("blockdev-backup", {"job-id": "j", "device": "live", "target": "tgt", "sync": "full"})
            # A raw node over an inline nbd child, deleted together.
            await x("blockdev-add", {"driver": "raw", "node-name": "fmt", "read-only": True,
                                     "file": {"driver": "nbd", "server": unix(sock), "export": "tgt"}})
            nodes = await x("query-named-block-nodes", {"flat": True})
            await x("blockdev-del", {"node-name": "fmt"})
            await x("blockdev-del", {"node-name": "tgt"})
            # Left attached: the server must still stop cleanly (exit 0) on SIGTERM.
            await x("blockdev-add", {"driver": "nbd", "node-name": "kept", "server": unix(sock),
                                     "export": "tgt", "read-only": True})
            after = await x("query-named-block-nodes", {"flat": True})
            return {"errors": errors, "backup": backup.value.error.error.desc, "nodes": nodes,
                    "after": after}

        result = drive(tmp_path, live, scenario)
    errors = result["errors"]
    assert errors[0].startswith("Failed to connect to unix:") and "No such file" in errors[0]
    assert "has no export 'nosuch'" in errors[1]
    assert errors[2] == "NBD export is read-only"
    assert "tls-creds" in errors[3] and "not supported" in errors[3]
    assert errors[4].startswith("Address resolution failed for 127.0.0.1:nbd-port")
    assert "reconnect-delay" in errors[5]
    assert result["backup"] == "Node 'tgt' is read-only"
    drivers = {n["node-name"]: (n["drv"], n["ro"]) for n in result["nodes"]}
    assert drivers["tgt"] == ("nbd", True) and drivers["fmt"] == ("raw", True)
    assert sum(1 for d, _ in drivers.values() if d == "nbd") == 2
    assert {n["node-name"] for n in result["after"]} == {"live", "live-file", "kept"}



async def test_nbd_node_operations(tmp_path: Path, server_factory: Callable[..., ServerProcess]) -> None:
    """NbdNode itself against a real server: splitting, emulation, errno mapping, close."""
    image = make_image(tmp_path / "remote.raw", 80 << 20, {0: b"head"})
    remote = server_factory("--export", f"r={image}")
    node = await NbdNode.connect("r", NbdAddress(False, None, 0, str(remote.unix_path), "r"))
    try:
        assert node.size == 80 << 20 and not node.read_only and node.can_fast_zero
        big = memoryview(os.urandom(40 << 20))  # more than the 32 MiB maximum block size
        await node.write(1 << 20, big, fua=True)
        back = bytearray(40 << 20)
        segments = await node.read(1 << 20, memoryview(back))
        assert back == big and segments == [Segment(0, 40 << 20, False)]
        await node.write_zeroes(1 << 20, 4096, may_trim=False)
        await node.write_zeroes(2 << 20, 1 << 20, may_trim=True, fast=True)
        await node.trim(70 << 20, 1 << 20)
        await node.flush()
        await node.cache(0, 4096)
        check = bytearray(8192)
        await node.read(1 << 20, memoryview(check))
        assert check == bytes(4096) + big[4096:8192]
        extents = await node.block_status(60 << 20, 8 << 20)
        assert sum(e.length for e in extents) <= 8 << 20 and extents[0].flags & AllocationState.ZERO
        with pytest.raises(OSError) as beyond:
            await node.read(80 << 20, memoryview(bytearray(8)))
        assert beyond.value.errno == errno.EINVAL
        assert nbd_errno(beyond.value) == Errno.EINVAL  # what the server above would answer
    finally:
        await node.close()
    with pytest.raises(NbdConnectionError):
        await node.flush()  # closed: no silent success
    assert image.read_bytes()[(1 << 20) + 4096 : (1 << 20) + 8192] == bytes(big[4096:8192])


def test_nbd_node_exported_again(tmp_path: Path, server_factory: Callable[..., ServerProcess]) -> None:
    """An nbd node is a node like any other: exported by nbdfleece, it proxies to the remote."""
    require("qemu-io")
    image = make_image(tmp_path / "remote.raw", 1 << 20, {4096: b"remote data"})
    remote = server_factory("--export", f"r={image}")
    live = raw_file(tmp_path / "live.raw")

    async def scenario(client: Any, events: list[dict[str, Any]], uri: str) -> dict[str, Any]:
        x = client.execute
        await x("blockdev-add", {"driver": "nbd", "node-name": "proxy", "export": "r",
                                 "server": {"type": "unix", "path": str(remote.unix_path)}})
        await x("block-export-add", {"type": "nbd", "id": "proxy", "node-name": "proxy", "writable": True})
        proxy = uri.rsplit("/", 1)[0] + "/proxy"
        run(["qemu-io", "-f", "raw", "-c", "read -P 0 0 4096", "-c", "write -P 0x5a 8192 4096", proxy])
        out = run(["qemu-io", "-f", "raw", "-c", "read -v 4096 11", proxy]).stdout
        await x("block-export-del", {"id": "proxy"})
        await x("blockdev-del", {"node-name": "proxy"})
        return {"out": out}

    result = drive(tmp_path, live, scenario)
    assert "72 65 6d 6f 74 65 20 64 61 74 61" in result["out"]  # "remote data"
    assert image.read_bytes()[8192:12288] == b"\x5a" * 4096
