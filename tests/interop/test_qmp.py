"""QMP against the real server process, driven by QEMU's own Python client (``qemu.qmp``).

Expected replies and error texts are those of qemu-storage-daemon 7.2 in the
reference transcripts (Appendix A/B); the sequence in
``test_transcript_sequence_on_a_cli_export`` follows Appendix A sections 4-10,
down to the bitmap SHA-256 QEMU printed for the same writes.

``qemu.qmp`` is asyncio based, so these are plain (non-trio) test functions
that run their client code with ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient

from tests.conftest import ServerProcess, make_image, require, run, wait_listening

pytestmark = pytest.mark.interop

KiB = 1 << 10
MiB = 1 << 20
BUSY = "Bitmap '{}' is currently in use by another operation and cannot be used"


def with_client(path: Path, body: Callable[[QMPClient], Awaitable[Any]]) -> Any:
    """Connect (greeting + negotiation), run ``body``, disconnect."""

    async def main() -> Any:
        client = QMPClient("nbdfleece-test")
        await client.connect(str(path))
        try:
            return await body(client)
        finally:
            await client.disconnect()

    return asyncio.run(main())


async def error_of(client: QMPClient, command: str, arguments: dict[str, Any] | None = None) -> str:
    with pytest.raises(ExecuteError) as info:
        await client.execute(command, arguments)
    assert info.value.error_class == "GenericError", info.value
    desc: str = info.value.error.error.desc
    return desc


async def bitmaps_of(client: QMPClient, node: str) -> dict[str, dict[str, Any]]:
    nodes: Any = await client.execute("query-named-block-nodes", {"flat": True})
    (entry,) = [n for n in nodes if n["node-name"] == node]
    return {b["name"]: b for b in entry.get("dirty-bitmaps", [])}


async def counts(client: QMPClient, node: str) -> dict[str, int]:
    return {name: b["count"] for name, b in (await bitmaps_of(client, node)).items()}


def qemu_io(uri: str, *commands: str) -> None:
    require("qemu-io")
    cmd = ["qemu-io", "-f", "raw"]
    for c in commands:
        cmd += ["-c", c]
    run([*cmd, uri])


def dirty_map(uri: str, bitmap: str) -> list[tuple[int, int, str]]:
    require("nbdinfo")
    out = run(["nbdinfo", f"--map=qemu:dirty-bitmap:{bitmap}", uri]).stdout
    return [(int(f[0]), int(f[1]), f[3]) for f in (line.split() for line in out.splitlines())]


# -- the reference sequence on an export from the command line -----------------------------------


def test_transcript_sequence_on_a_cli_export(server_factory: Any, tmp_path: Path, short_dir: Path) -> None:
    image = make_image(tmp_path / "live.raw", 64 * MiB, {0: b"\x11" * (4 * MiB)})
    qmp_path = short_dir / "qmp.sock"
    server: ServerProcess = server_factory(
        "--export", f"live={image},bitmap=bm0", "--qmp", f"unix:{qmp_path}",
    )
    server.wait_listening(qmp_path)
    assert stat.S_IMODE(os.stat(qmp_path).st_mode) == 0o600
    uri = server.unix_uri("live")

    async def section_4(client: QMPClient) -> None:
        assert await client.execute("block-dirty-bitmap-add",
                                    {"node": "live", "name": "b0", "granularity": 65536}) == {}
        assert (await bitmaps_of(client, "live"))["b0"] == {
            "name": "b0", "recording": True, "persistent": False, "busy": False,
            "granularity": 65536, "count": 0,
        }
        add = "block-dirty-bitmap-add"
        assert await error_of(client, add, {"node": "live", "name": "b0"}) == "Bitmap already exists: b0"
        for granularity in (1000, 256, 0):
            assert await error_of(client, add, {"node": "live", "name": "bad", "granularity": granularity}) \
                == "Granularity must be power of 2 and at least 512"
        assert await error_of(client, add, {"node": "live", "name": "bad", "granularity": 1 << 32}) \
            == "Parameter 'granularity' expects uint32_t"
        assert await error_of(client, add, {"node": "nosuch", "name": "x"}) \
            == "Cannot find device='nosuch' nor node-name='nosuch'"
        assert await error_of(client, add, {"node": "live", "name": ""}) == "Bitmap name cannot be empty"
        assert await error_of(client, add, {"node": "live"}) == "Parameter 'name' is missing"
        assert await error_of(client, add, {"node": "live", "name": "x", "bogus": 1}) \
            == "Parameter 'bogus' is unexpected"
        assert await error_of(client, add, {"node": "live", "name": 5}) \
            == "Invalid parameter type for 'name', expected: string"
        assert await error_of(client, add, {"node": "live", "name": "x", "disabled": "yes"}) \
            == "Invalid parameter type for 'disabled', expected: boolean"
        for command in ("remove", "clear", "enable", "disable"):
            name = f"block-dirty-bitmap-{command}"
            assert await error_of(client, name, {"node": "live", "name": "nosuch"}) \
                == "Dirty bitmap 'nosuch' not found"
            # bm0 is exported by --export ...,bitmap=bm0: busy.
            assert await error_of(client, name, {"node": "live", "name": "bm0"}) == BUSY.format("bm0")
        assert (await bitmaps_of(client, "live"))["bm0"]["busy"] is True
        with pytest.raises(ExecuteError) as info:
            await client.execute("nosuch")
        assert (info.value.error_class, info.value.error.error.desc) == (
            "CommandNotFound", "The command nosuch has not been found",
        )

    with_client(qmp_path, section_4)

    # Section 5: guest-like writes through the live NBD export.
    qemu_io(uri, "write -P 0x22 0 64k", "write -P 0x33 1M 128k", "write -P 0x44 100k 1")

    async def sections_5_to_10(client: QMPClient) -> None:
        assert await counts(client, "live") == {"b0": 262144, "bm0": 262144}
        # Point in time: b1 starts, b0 freezes (the blockdev-backup action is out of scope).
        await client.execute("transaction", {"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "live", "name": "b1", "granularity": 65536}},
            {"type": "block-dirty-bitmap-disable", "data": {"node": "live", "name": "b0"}},
        ]})
        assert (await bitmaps_of(client, "live"))["b0"]["recording"] is False

    with_client(qmp_path, sections_5_to_10)
    assert dirty_map(uri, "bm0") == [
        (0, 131072, "dirty"), (131072, 917504, "clean"),
        (1048576, 131072, "dirty"), (1179648, 65929216, "clean"),
    ]
    qemu_io(uri, "write -P 0x55 0 64k", "write -P 0x66 2M 64k")

    async def section_10(client: QMPClient) -> Any:
        assert await counts(client, "live") == {"b1": 131072, "b0": 262144, "bm0": 327680}
        # The same bits as QEMU's b1 in the transcript, so the same digest.
        assert await client.execute("x-debug-block-dirty-bitmap-sha256", {"node": "live", "name": "b1"}) == {
            "sha256": "baaf36d22dc28f002964f8e92f2d6e2e19c1bfb4681be7b5822e553bb336352d",
        }
        # Merge across granularities (7.2 accepts it), by name and by {node, name}.
        await client.execute("block-dirty-bitmap-add", {"node": "live", "name": "g32", "granularity": 32768})
        await client.execute("block-dirty-bitmap-add", {"node": "live", "name": "b2", "disabled": True})
        await client.execute("block-dirty-bitmap-merge", {"node": "live", "target": "g32", "bitmaps": ["b1"]})
        await client.execute("block-dirty-bitmap-merge", {
            "node": "live", "target": "b2", "bitmaps": ["b1", {"node": "live", "name": "g32"}],
        })
        assert await error_of(client, "block-dirty-bitmap-merge", {
            "node": "live", "target": "b2", "bitmaps": ["b1", "nosuch"],
        }) == "Dirty bitmap 'nosuch' not found"
        assert await counts(client, "live") == {
            "b2": 131072, "g32": 131072, "b1": 131072, "b0": 262144, "bm0": 327680,
        }
        # QEMU lists the newest bitmap first.
        assert list(await bitmaps_of(client, "live")) == ["b2", "g32", "b1", "b0", "bm0"]
        sha = "x-debug-block-dirty-bitmap-sha256"
        b1 = await client.execute(sha, {"node": "live", "name": "b1"})
        assert await client.execute(sha, {"node": "live", "name": "b2"}) == b1  # equal bits, equal digests

        # The transaction of the transcript: all or nothing.
        assert await error_of(client, "transaction", {"actions": [
            {"type": "block-dirty-bitmap-clear", "data": {"node": "live", "name": "b1"}},
            {"type": "block-dirty-bitmap-remove", "data": {"node": "live", "name": "nosuch"}},
        ]}) == "Dirty bitmap 'nosuch' not found"
        assert (await counts(client, "live"))["b1"] == 131072
        await client.execute("transaction", {"actions": [
            {"type": "block-dirty-bitmap-remove", "data": {"node": "live", "name": "g32"}},
            {"type": "block-dirty-bitmap-clear", "data": {"node": "live", "name": "b1"}},
        ]})
        assert await counts(client, "live") == {"b2": 131072, "b1": 0, "b0": 262144, "bm0": 327680}
        assert await client.execute(sha, {"node": "live", "name": "b1"}) != b1

        # Disabled bitmaps miss writes; enabling resumes recording.
        await client.execute("block-dirty-bitmap-disable", {"node": "live", "name": "b1"})
        return await client.execute(sha, {"node": "live", "name": "b1"})

    cleared = with_client(qmp_path, section_10)
    qemu_io(uri, "write -P 0x77 8M 4k")

    async def after_disable(client: QMPClient) -> None:
        sha = "x-debug-block-dirty-bitmap-sha256"
        assert (await counts(client, "live"))["b1"] == 0
        assert await client.execute(sha, {"node": "live", "name": "b1"}) == cleared
        await client.execute("block-dirty-bitmap-enable", {"node": "live", "name": "b1"})
        assert await client.execute("query-block-exports") == [
            {"id": "live", "type": "nbd", "node-name": "live", "shutting-down": False},
        ]

    with_client(qmp_path, after_disable)
    qemu_io(uri, "write -P 0x77 8M 4k")
    assert with_client(qmp_path, lambda c: counts(c, "live"))["b1"] == 65536


# -- a daemon built entirely over QMP ---------------------------------------------------------


def listening_ports(pid: int) -> set[int]:
    """TCP ports ``pid`` listens on, from /proc (no external tool needed)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_qmp_only_daemon_builds_graph_exports_and_serves(tmp_path: Path, short_dir: Path) -> None:
    require("qemu-io", "nbdinfo")
    image = make_image(tmp_path / "disk.raw", 64 * MiB)
    other = make_image(tmp_path / "other.raw", 1 * MiB)
    qmp_path = short_dir / "qmp.sock"
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nbdfleece", "serve", "--qmp", f"unix:{qmp_path}", "--log-level", "debug"],
            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        wait_listening(qmp_path, proc)
        assert listening_ports(proc.pid) == set()  # no NBD before nbd-server-start

        async def build(client: QMPClient) -> int:
            other_client = QMPClient("observer")
            await other_client.connect(str(qmp_path))
            try:
                await client.execute("blockdev-add", {"driver": "file", "node-name": "proto",
                                                      "filename": str(image)})
                await client.execute("blockdev-add", {"driver": "raw", "node-name": "live", "file": "proto"})
                await client.execute("blockdev-add", {"driver": "raw", "node-name": "inline",
                                                      "file": {"driver": "file", "filename": str(other)}})
                assert await error_of(client, "blockdev-add", {"driver": "raw", "node-name": "x",
                                                               "file": "nosuch"}) \
                    == "Cannot find device='nosuch' nor node-name='nosuch'"
                await client.execute("block-dirty-bitmap-add", {"node": "live", "name": "b0"})
                await client.execute("nbd-server-start", {
                    "addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": "0"}},
                })
                assert await error_of(client, "nbd-server-start", {
                    "addr": {"type": "unix", "path": str(short_dir / "nbd.sock")},
                }) == "NBD server already running"
                (port,) = listening_ports(proc.pid)
                assert await error_of(client, "block-export-add", {
                    "type": "nbd", "id": "ro", "node-name": "live", "bitmaps": ["b0"],
                }) == "Enabled bitmap 'b0' incompatible with readonly export"
                assert await error_of(client, "block-export-add", {
                    "type": "nbd", "id": "x", "node-name": "live", "bitmaps": ["nosuch"],
                }) == "Bitmap 'nosuch' is not found"
                assert await error_of(client, "block-export-add", {
                    "type": "nbd", "id": "x", "node-name": "nosuch",
                }) == "Cannot find device='' nor node-name='nosuch'"
                await client.execute("block-export-add", {
                    "type": "nbd", "id": "live", "node-name": "live", "name": "live", "writable": True,
                    "description": "live disk", "bitmaps": ["b0"], "allocation-depth": True,
                })
                assert await error_of(client, "block-export-add", {
                    "type": "nbd", "id": "live", "node-name": "live", "name": "other",
                }) == "Block export id 'live' is already in use"
                assert await error_of(client, "blockdev-del", {"node-name": "live"}) == "Node live is in use"
                assert await error_of(client, "blockdev-del", {"node-name": "proto"}) \
                    == "Block device proto is in use"
                assert await error_of(client, "block-dirty-bitmap-remove", {"node": "live", "name": "b0"}) \
                    == BUSY.format("b0")
                nodes: Any = await client.execute("query-named-block-nodes")
                by_name = {n["node-name"]: n for n in nodes}
                assert by_name["live"]["drv"] == "raw" and by_name["proto"]["drv"] == "file"
                assert by_name["live"]["image"]["virtual-size"] == 64 * MiB
                assert by_name["live"]["file"] == str(image)
                implicit = [n for n in by_name if n.startswith("#block")]
                assert len(implicit) == 1 and by_name[implicit[0]]["file"] == str(other)
                assert await error_of(client, "blockdev-del", {"node-name": implicit[0]}) \
                    == f"Node {implicit[0]} is not owned by the monitor"
                # Events reach every negotiated client.
                assert other_client.events.empty()
                return int(port)
            finally:
                await other_client.disconnect()

        port = with_client(qmp_path, build)
        uri = f"nbd://127.0.0.1:{port}/live"
        qemu_io(uri, "write -P 0x22 0 64k", "write -P 0x33 1M 128k", "write -P 0x44 100k 1")
        assert dirty_map(uri, "b0") == [
            (0, 131072, "dirty"), (131072, 917504, "clean"),
            (1048576, 131072, "dirty"), (1179648, 65929216, "clean"),
        ]
        with open(image, "rb") as f:
            assert f.read(2) == b"\x22\x22"

        async def teardown(client: QMPClient) -> None:
            observer = QMPClient("observer")
            await observer.connect(str(qmp_path))
            try:
                assert await counts(client, "live") == {"b0": 262144}
                await client.execute("block-export-del", {"id": "live"})
                for c in (client, observer):
                    event: Any = await asyncio.wait_for(c.events.get(), 5)
                    assert (event["event"], event["data"]) == ("BLOCK_EXPORT_DELETED", {"id": "live"})
                    assert set(event["timestamp"]) == {"seconds", "microseconds"}
                assert await error_of(client, "block-export-del", {"id": "live", "mode": "hard"}) \
                    == "Export 'live' is not found"
                assert await client.execute("query-block-exports") == []
                await client.execute("nbd-server-stop")
                assert await error_of(client, "nbd-server-stop") == "NBD server not running"
                assert listening_ports(proc.pid) == set()
                await client.execute("blockdev-del", {"node-name": "live"})
                await client.execute("blockdev-del", {"node-name": "proto"})
                await client.execute("blockdev-del", {"node-name": "inline"})
                assert await client.execute("query-named-block-nodes") == []
                assert await error_of(client, "blockdev-del", {"node-name": "live"}) \
                    == "Failed to find node with node-name='live'"
            finally:
                await observer.disconnect()

        with_client(qmp_path, teardown)
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log_path.read_text()
        assert not qmp_path.exists()  # the socket is removed on exit
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- the wire, with a raw socket --------------------------------------------------------------


class RawClient:
    """A line-oriented QMP client with no help from any library."""

    def __init__(self, path: Path, *, negotiate: bool = True) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rb")
        self.greeting = self.receive()
        if negotiate:
            assert self.command({"execute": "qmp_capabilities"}) == {"return": {}}

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def receive(self) -> Any:
        line = self.file.readline()
        assert line.endswith(b"\n"), line
        return json.loads(line)

    def command(self, message: Any) -> Any:
        self.send(json.dumps(message).encode() + b"\n")
        return self.receive()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def generic(desc: str) -> dict[str, Any]:
    return {"error": {"class": "GenericError", "desc": desc}}


@pytest.fixture
def qmp_server(server_factory: Any, short_dir: Path) -> Iterator[Path]:
    path = short_dir / "qmp.sock"
    server: ServerProcess = server_factory("--qmp", f"unix:{path}")
    server.wait_listening(path)
    yield path
    assert server.alive(), server.log()


def test_bad_input_on_the_wire_and_the_session_goes_on(qmp_server: Path) -> None:
    client = RawClient(qmp_server, negotiate=False)
    assert client.greeting["QMP"]["version"]["qemu"] == {"micro": 0, "minor": 2, "major": 7}
    assert client.greeting["QMP"]["capabilities"] == []
    assert client.command({"execute": "query-version", "id": "early"}) == {"error": {
        "class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'",
    }, "id": "early"}
    assert client.command({"execute": "qmp_capabilities", "id": 1}) == {"return": {}, "id": 1}
    assert client.command({"execute": "qmp_capabilities"}) == {"error": {
        "class": "CommandNotFound", "desc": "Capabilities negotiation is already complete, command ignored",
    }}
    assert client.command({"execute": "nosuch", "id": [1, "two"]}) == {"error": {
        "class": "CommandNotFound", "desc": "The command nosuch has not been found",
    }, "id": [1, "two"]}
    client.send(b'{"execute": "query-version", }\n')
    assert client.receive()["error"]["desc"].startswith("JSON parse error, ")
    assert client.command(["execute"]) == generic("QMP input must be a JSON object")
    assert client.command({"arguments": {}}) == generic("QMP input lacks member 'execute'")
    assert client.command({"execute": "query-version", "xyz": 1}) \
        == generic("QMP input member 'xyz' is unexpected")
    assert client.command({"execute": "query-version", "arguments": {"bad": 1}}) \
        == generic("Parameter 'bad' is unexpected")
    # 2 MiB on one line: refused, skipped to the newline, and the session goes on.
    client.send(b'{"execute": "query-version", "arguments": {"pad": "' + b"x" * (2 * MiB) + b'"}}\n')
    assert client.receive() == generic("JSON message too large")
    # QEMU's nesting limit: 1024 levels of [ and { reach the command, 1025 are refused.
    for levels, reply in ((1024, generic("Parameter 'a' is unexpected")),
                          (1025, generic("JSON nesting depth limit exceeded"))):
        inner = b"[" * (levels - 2) + b"]" * (levels - 2)
        client.send(b'{"execute": "query-version", "arguments": {"a": ' + inner + b"}}\n")
        assert client.receive() == reply
    # Several messages in one packet, split anywhere: answered in order.
    client.send(b'{"execute": "query-version", "id": 1}\n{"execute": "query-comm')
    client.send(b'ands", "id": 2}  {"execute": "nosuch", "id": 3}\n')
    first, second, third = client.receive(), client.receive(), client.receive()
    assert first["id"] == 1 and first["return"]["qemu"]["major"] == 7
    assert second["id"] == 2 and {"name": "transaction"} in second["return"]
    assert third["id"] == 3 and third["error"]["class"] == "CommandNotFound"
    client.close()


def test_two_clients_events_and_a_client_leaving_mid_message(qmp_server: Path, tmp_path: Path) -> None:
    image = make_image(tmp_path / "d.raw", 1 * MiB)
    first = RawClient(qmp_server)
    second = RawClient(qmp_server)
    silent = RawClient(qmp_server, negotiate=False)  # never negotiates: gets no events
    assert first.command({"execute": "blockdev-add", "arguments": {
        "driver": "file", "node-name": "n", "filename": str(image)}}) == {"return": {}}
    # A third client sends half a message and vanishes.
    quitter = RawClient(qmp_server)
    quitter.send(b'{"execute": "block-dirty-bitmap-add", "arguments": {"node": "n", "na')
    quitter.close()
    assert second.command({"execute": "block-dirty-bitmap-add", "arguments": {"node": "n", "name": "b"}}) \
        == {"return": {}}
    assert second.command({"execute": "block-dirty-bitmap-add", "arguments": {"node": "n", "name": "b"}}) \
        == generic("Bitmap already exists: b")
    assert first.command({"execute": "block-export-add", "arguments": {
        "type": "nbd", "id": "e", "node-name": "n"}}) == {"return": {}}
    # The event comes before the reply to the command that caused it, and to every client.
    first.send(b'{"execute": "block-export-del", "arguments": {"id": "e"}, "id": "del"}\n')
    event = first.receive()
    assert (event["event"], event["data"]) == ("BLOCK_EXPORT_DELETED", {"id": "e"})
    assert first.receive() == {"return": {}, "id": "del"}
    event = second.receive()
    assert (event["event"], event["data"]) == ("BLOCK_EXPORT_DELETED", {"id": "e"})
    assert silent.command({"execute": "qmp_capabilities"}) == {"return": {}}  # no event queued before
    for client in (first, second, silent):
        assert client.command({"execute": "query-block-exports"}) == {"return": []}
        client.close()


def test_qmp_on_loopback_tcp(server_factory: Any) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server_factory("--qmp", f"127.0.0.1:{port}")
    deadline = time.monotonic() + 15
    while True:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    with sock, sock.makefile("rb") as f:
        assert "QMP" in json.loads(f.readline())
        sock.sendall(b'{"execute": "qmp_capabilities"}\n{"execute": "query-block-exports"}\n')
        assert json.loads(f.readline()) == {"return": {}}
        assert json.loads(f.readline()) == {"return": []}


def test_non_loopback_qmp_is_refused_at_start_up(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "nbdfleece", "serve", "--qmp", "192.0.2.1:4444"],
        cwd=tmp_path, capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode != 0
    assert "refusing to listen on non-loopback host '192.0.2.1'" in proc.stderr


def test_error_texts_and_order_as_qemu_storage_daemon(tmp_path: Path, short_dir: Path) -> None:
    """Answers compared with qemu-storage-daemon 7.2.22 on the same sequence: bitmap
    lookups, the order of the merge, add, export and blockdev-backup checks, and a
    job's target, busy while the job runs and free once it is finalized."""
    from tests.conftest import qmp_only_server

    for name in ("n1.raw", "n2.raw", "t1.raw"):
        make_image(tmp_path / name, 64 * MiB)
    make_image(tmp_path / "small.raw", 32 * MiB)

    async def body(client: QMPClient) -> None:
        x = client.execute
        await x("blockdev-add", {"driver": "raw", "node-name": "n1",
                                 "file": {"driver": "file", "filename": str(tmp_path / "n1.raw")}})
        await x("blockdev-add", {"driver": "raw", "node-name": "s1",
                                 "file": {"driver": "file", "filename": str(tmp_path / "small.raw")}})
        await x("blockdev-add", {"driver": "raw", "node-name": "t1",
                                 "file": {"driver": "file", "filename": str(tmp_path / "t1.raw")}})
        await x("blockdev-add", {"driver": "raw", "node-name": "ro", "read-only": True,
                                 "file": {"driver": "file", "filename": str(tmp_path / "n2.raw"),
                                          "read-only": True}})
        for name, disabled in (("b0", False), ("d0", True), ("d1", True)):
            await x("block-dirty-bitmap-add", {"node": "n1", "name": name, "disabled": disabled})
        await x("block-dirty-bitmap-add", {"node": "s1", "name": "s0"})
        await x("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(short_dir / "n.sock")}}})
        for verb in ("remove", "clear", "enable", "disable"):
            assert await error_of(client, f"block-dirty-bitmap-{verb}", {"node": "nope", "name": "b0"}) \
                == "Node 'nope' not found"
        merge = "block-dirty-bitmap-merge"
        assert await error_of(client, merge, {"node": "n1", "target": "b0",
                                              "bitmaps": [{"node": "nope", "name": "x"}]}) \
            == "Node 'nope' not found"
        assert await error_of(client, merge, {"node": "n1", "target": "b0",
                                              "bitmaps": [{"node": "s1", "name": "s0"}]}) \
            == ("Bitmaps are of different sizes (destination size is 67108864, source size is "
                "33554432) and can't be merged")
        assert await error_of(client, "block-dirty-bitmap-add",
                              {"node": "n1", "name": "b0", "granularity": 1000}) \
            == "Granularity must be power of 2 and at least 512"
        assert await error_of(client, "block-export-add", {"type": "nbd", "id": "w", "node-name": "ro",
                                                           "writable": True}) \
            == "Cannot export read-only node as writable"
        # d0 exported (busy), named twice as QEMU accepts.
        await x("block-export-add", {"type": "nbd", "id": "e1", "node-name": "n1", "bitmaps": ["d0", "d0"]})
        assert await error_of(client, "block-export-add", {"type": "nbd", "id": "e2", "node-name": "n1",
                                                           "bitmaps": ["d0"]}) \
            == "NBD server already has export named 'n1'"
        assert await error_of(client, merge, {"node": "n1", "target": "d0", "bitmaps": ["zz"]}) \
            == "Dirty bitmap 'zz' not found"
        assert await error_of(client, merge, {"node": "n1", "target": "d1", "bitmaps": ["d0"]}) \
            == BUSY.format("d0")
        backup = {"device": "n1", "target": "t1"}
        assert await error_of(client, "blockdev-backup", {**backup, "sync": "none", "bitmap": "zz"}) \
            == "Bitmap 'zz' could not be found"
        assert await error_of(client, "blockdev-backup", {**backup, "sync": "incremental"}) \
            == "must provide a valid bitmap name for 'incremental' sync mode"
        assert await error_of(client, "blockdev-backup", {**backup, "sync": "full", "bitmap": "b0",
                                                          "bitmap-mode": "never", "job-id": "j0"}) \
            == "Bitmap sync mode 'never' has no meaningful effect when combined with sync mode 'full'"
        assert await error_of(client, "blockdev-backup", {**backup, "sync": "full"}) == "Invalid job ID ''"
        assert await error_of(client, "blockdev-backup", {"device": "n1", "target": "n1", "sync": "full"}) \
            == "Source and target cannot be the same"
        await x("blockdev-backup", {**backup, "sync": "full", "job-id": "j0",
                                    "auto-finalize": False, "auto-dismiss": False})
        deadline = time.monotonic() + 30
        while (await x("query-jobs"))[0]["status"] != "pending":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        assert await error_of(client, "blockdev-del", {"node-name": "t1"}) \
            == "Node 't1' is busy: block device is in use by block job: backup"
        assert await error_of(client, "blockdev-del", {"node-name": "n1"}) == "Node n1 is in use"
        await x("job-finalize", {"id": "j0"})
        await x("blockdev-del", {"node-name": "t1"})  # concluded: its target is free
        await x("job-dismiss", {"id": "j0"})

    with qmp_only_server(tmp_path) as sock:
        with_client(sock, body)
