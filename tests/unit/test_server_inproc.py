"""The trio edge in-process: a real socketpair, a server task, controllable nodes."""

from __future__ import annotations

import errno
import struct

import trio
import trio.testing

from nbdfleece.block.memory import MemoryStore
from nbdfleece.block.node import Layer
from nbdfleece.constants import IHAVEOPT, REQUEST_MAGIC, Cmd, Opt
from nbdfleece.exports import Export, ExportRegistry
from nbdfleece.server import Limits, Server

SIZE = 1 << 20


class Faulty(Layer):
    """Fails reads at ``bad_offset`` with EIO and writes past ``full_at`` with ENOSPC."""

    def __init__(self, child: MemoryStore, bad_offset: int, full_at: int) -> None:
        super().__init__("faulty", child)
        self.bad_offset = bad_offset
        self.full_at = full_at

    async def read(self, offset: int, buf: memoryview, *, sparse: bool = False):  # type: ignore[no-untyped-def]
        if offset <= self.bad_offset < offset + len(buf):
            raise OSError(errno.EIO, "injected read error")
        return await super().read(offset, buf, sparse=sparse)

    async def write(self, offset: int, data: memoryview, *, fua: bool = False) -> None:
        if offset + len(data) > self.full_at:
            raise OSError(errno.ENOSPC, "injected full disk")
        await super().write(offset, data, fua=fua)


class Gate(Layer):
    """Holds every write until ``release`` is set, counting concurrent ones."""

    def __init__(self, child: MemoryStore) -> None:
        super().__init__("gate", child)
        self.release = trio.Event()
        self.waiting = 0

    async def write(self, offset: int, data: memoryview, *, fua: bool = False) -> None:
        self.waiting += 1
        await self.release.wait()
        await super().write(offset, data, fua=fua)


class Client:
    """A minimal raw NBD client over a trio socket (the handshake by hand, simple
    replies here; ``test_server_replies`` adds structured ones)."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.buf = bytearray()

    async def recv_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = await self.sock.recv(1 << 20)
            if not chunk:
                raise EOFError(f"closed with {len(self.buf)} of {n} bytes")
            self.buf += chunk
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[await self.sock.send(view) :]

    async def option(self, opt: int, payload: bytes = b"") -> None:
        await self.send(struct.pack(">QII", IHAVEOPT, opt, len(payload)) + payload)
        while True:
            _, _, rep, length = struct.unpack(">QIII", await self.recv_exact(20))
            await self.recv_exact(length)
            if rep == 1:
                return
            assert rep == 3, rep

    async def go(self, name: str, *, structured: bool = False) -> None:
        await self.recv_exact(18)
        await self.send(struct.pack(">I", 3))
        if structured:
            await self.option(Opt.STRUCTURED_REPLY)
        await self.option(Opt.GO, struct.pack(">I", len(name)) + name.encode() + struct.pack(">H", 0))

    async def request(self, cmd: int, cookie: int, offset: int, length: int, data: bytes = b"") -> None:
        await self.send(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, cmd, cookie, offset, length) + data)

    async def reply(self, read_length: int = 0) -> tuple[int, int, bytes]:
        _, error, cookie = struct.unpack(">IIQ", await self.recv_exact(16))
        data = await self.recv_exact(read_length) if error == 0 and read_length else b""
        return error, cookie, data


async def connect(server: Server, nursery: trio.Nursery) -> Client:
    a, b = trio.socket.socketpair()
    nursery.start_soon(server._handle, a)
    return Client(b)


async def test_storage_errors_reach_the_client_and_the_connection_continues() -> None:
    memory = MemoryStore("m", SIZE)
    registry = ExportRegistry()
    registry.add(Export("disk", Faulty(memory, bad_offset=8192, full_at=65536)))
    server = Server(registry)
    async with trio.open_nursery() as nursery:
        client = await connect(server, nursery)
        await client.go("disk")
        await client.request(Cmd.READ, 1, 8192, 512)
        assert await client.reply(512) == (errno.EIO, 1, b"")
        await client.request(Cmd.WRITE, 2, 65536 - 100, 200, b"x" * 200)
        assert await client.reply() == (errno.ENOSPC, 2, b"")
        await client.request(Cmd.WRITE, 3, 0, 4, b"abcd")
        assert await client.reply() == (0, 3, b"")
        await client.request(Cmd.READ, 4, 0, 4)
        assert await client.reply(4) == (0, 4, b"abcd")
        nursery.cancel_scope.cancel()


async def test_graceful_shutdown_finishes_in_flight_writes() -> None:
    memory = MemoryStore("m", SIZE)
    gate = Gate(memory)
    registry = ExportRegistry()
    registry.add(Export("disk", gate))
    server = Server(registry)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, [])
        client = await connect(server, nursery)
        await client.go("disk")
        for i in range(5):
            await client.request(Cmd.WRITE, i, i * 4096, 4096, bytes([i + 1]) * 4096)
        while gate.waiting < 5:
            await trio.sleep(0.001)
        server.shutdown()
        await trio.sleep(0.01)
        gate.release.set()
        replies = sorted([await client.reply() for _ in range(5)])
        assert replies == [(0, i, b"") for i in range(5)]
        assert await client.sock.recv(1) == b""  # then the server closes
    assert memory.data[:5 * 4096] == b"".join(bytes([i + 1]) * 4096 for i in range(5))
    assert memory.flushes >= 1


async def test_inflight_bytes_are_bounded() -> None:
    memory = MemoryStore("m", 64 << 20)
    gate = Gate(memory)
    registry = ExportRegistry()
    registry.add(Export("disk", gate))
    limits = Limits(inflight_bytes=4 << 20)
    server = Server(registry, limits)
    chunk = 1 << 20
    async with trio.open_nursery() as nursery:
        client = await connect(server, nursery)
        await client.go("disk")

        async def send_all() -> None:
            for i in range(20):
                await client.request(Cmd.WRITE, i, i * chunk, chunk, b"z" * chunk)

        nursery.start_soon(send_all)
        await trio.sleep(0.3)
        # at most limit / (chunk + overhead) writes were accepted
        assert 1 <= gate.waiting <= 4
        gate.release.set()
        replies = sorted([(await client.reply())[1] for _ in range(20)])
        assert replies == list(range(20))
        nursery.cancel_scope.cancel()
    assert memory.data[: 20 * chunk] == b"z" * 20 * chunk


async def test_trickled_requests_are_served() -> None:
    """Headers and payloads delivered one byte per send still frame correctly."""
    memory = MemoryStore("m", SIZE)
    registry = ExportRegistry()
    registry.add(Export("disk", memory))
    server = Server(registry)
    async with trio.open_nursery() as nursery:
        client = await connect(server, nursery)
        await client.go("disk")
        raw = struct.pack(">IHHQQI", REQUEST_MAGIC, 0, Cmd.WRITE, 77, 100, 3) + b"xyz"
        raw += struct.pack(">IHHQQI", REQUEST_MAGIC, 0, Cmd.READ, 78, 99, 5)
        for i in range(len(raw)):
            await client.sock.send(raw[i : i + 1])
            await trio.testing.wait_all_tasks_blocked()
        first = await client.reply()
        assert first == (0, 77, b"")
        assert await client.reply(5) == (0, 78, b"\0xyz\0")
        nursery.cancel_scope.cancel()


def test_limits_refuse_nan_infinite_and_negative_values() -> None:
    """NaN slips through "< 0" and then breaks every client's timeout: refused at start."""
    import math

    import pytest

    from nbdfleece.errors import ConfigError

    for field in ("handshake_timeout", "request_timeout", "idle_timeout", "shutdown_grace"):
        for bad in (math.nan, math.inf, -1.0):
            with pytest.raises(ConfigError, match="must be a finite number"):
                Limits(**{field: bad})
    assert Limits(idle_timeout=0.0).idle_timeout == 0.0


def test_a_second_writer_of_an_image_is_refused(tmp_path: object) -> None:
    """Another server (or node) writing the same image would escape this one's bitmaps."""
    from pathlib import Path

    import pytest

    from nbdfleece.block.file import FileStore

    path = Path(str(tmp_path)) / "d.raw"
    path.write_bytes(bytes(4096))
    first = FileStore("a", str(path))
    try:
        with pytest.raises(OSError) as info:
            FileStore("b", str(path))
        assert info.value.errno == errno.EBUSY and "open for writing elsewhere" in str(info.value)
        FileStore("r", str(path), read_only=True).close_sync()  # readers are not kept out
    finally:
        first.close_sync()
    FileStore("c", str(path)).close_sync()  # free again once closed
