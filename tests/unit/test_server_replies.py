"""Reply batching and the send paths of the trio edge, in-process over a socketpair.

Requests that arrive together are served in the reader and their replies
leave together; these tests pipeline many requests in one send and check that
every reply arrives whole, exactly once, and right, on the paths that queue
replies (inline reads and writes, errors), the ``sendfile`` path (forced on for
a local peer here) and a graceful stop while the reader is blocked sending.
"""

from __future__ import annotations

import os
import random
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from nbdfleece import server as server_module
from nbdfleece.block.file import FileStore, memory_backed
from nbdfleece.constants import (
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    CmdFlag,
    ReplyType,
)
from nbdfleece.exports import Export, ExportRegistry
from nbdfleece.server import Server
from tests.unit.test_server_inproc import Client as RawClient

KiB = 1024
MiB = 1 << 20
SIZE = 16 * MiB


@pytest.fixture
def image() -> Iterator[Path]:
    """A random-data image on tmpfs, where FileStore serves reads and writes inline."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as folder:
        path = Path(folder) / "disk.raw"
        path.write_bytes(random.Random(7).randbytes(SIZE))
        fd = os.open(path, os.O_RDONLY)
        try:
            if not memory_backed(fd):
                pytest.skip("/dev/shm is not tmpfs")
        finally:
            os.close(fd)
        yield path


class Client(RawClient):
    """The raw test client, with READ data sized by cookie and structured reply chunks."""

    async def simple_reply(self, lengths: dict[int, int]) -> tuple[int, int, bytes]:
        """(error, cookie, data): a READ's data length is looked up by cookie."""
        magic, error, cookie = struct.unpack(">IIQ", await self.recv_exact(16))
        assert magic == SIMPLE_REPLY_MAGIC
        data = await self.recv_exact(lengths.get(cookie, 0)) if not error else b""
        return error, cookie, data

    async def chunk(self) -> tuple[int, int, int, bytes]:
        """(flags, type, cookie, payload) of one structured reply chunk."""
        magic, flags, type_, cookie, length = struct.unpack(">IHHQI", await self.recv_exact(20))
        assert magic == STRUCTURED_REPLY_MAGIC
        return flags, type_, cookie, await self.recv_exact(length)


def request(cmd: int, cookie: int, offset: int, length: int, data: bytes = b"", flags: int = 0) -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset, length) + data


async def connect(server: Server, nursery: trio.Nursery) -> Client:
    a, b = trio.socket.socketpair()
    nursery.start_soon(server._handle, a)
    return Client(b)


def file_server(path: Path) -> tuple[Server, FileStore]:
    store = FileStore("disk", str(path))
    registry = ExportRegistry()
    registry.add(Export("disk", store))
    return Server(registry), store


async def test_pipelined_requests_get_whole_replies_once(image: Path) -> None:
    """Reads, writes (some with FUA, served by tasks), a refused request and a read
    past the batch limit, sent as one burst: every reply is whole, arrives once,
    and reads see earlier writes."""
    expected = bytearray(image.read_bytes())
    server, store = file_server(image)
    rng = random.Random(1)
    burst = bytearray()
    lengths: dict[int, int] = {}
    want: dict[int, tuple[int, bytes]] = {}
    fua_slots = iter(range(8 * MiB, SIZE, 160 * KiB))  # tasks may run late: a region of their own
    for cookie in range(1, 301):
        kind = rng.random()
        offset = rng.randrange(8 * MiB // 4096 - 128) * 4096
        if cookie == 150:  # longer than one batch: sent at once, between queued ones
            length = server_module.REPLY_BATCH_BYTES + 4096
            burst += request(Cmd.READ, cookie, offset, length)
            lengths[cookie] = length
            want[cookie] = (0, bytes(expected[offset : offset + length]))
        elif cookie == 200:  # beyond the end: an error reply, queued like the others
            burst += request(Cmd.READ, cookie, SIZE - 512, 4096)
            want[cookie] = (22, b"")  # EINVAL
        elif kind < 0.4:  # FUA writes take the task path, the others are written at once
            data = rng.randbytes(rng.choice((512, 4096, 20000, 150000)))
            fua = 0
            if kind < 0.08:
                fua, offset = CmdFlag.FUA, next(fua_slots)
            burst += request(Cmd.WRITE, cookie, offset, len(data), data, fua)
            expected[offset : offset + len(data)] = data
            want[cookie] = (0, b"")
        else:
            length = rng.choice((512, 4096, 65536))
            burst += request(Cmd.READ, cookie, offset, length)
            lengths[cookie] = length
            want[cookie] = (0, bytes(expected[offset : offset + length]))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            client = await connect(server, nursery)
            await client.go("disk")
            nursery.start_soon(client.send, bytes(burst))
            got = {}
            for _ in range(len(want)):
                error, cookie, data = await client.simple_reply(lengths)
                assert cookie not in got
                got[cookie] = (error, data)
            assert got == want
            await client.send(request(Cmd.DISC, 0, 0, 0))
            with pytest.raises(EOFError):
                await client.recv_exact(1)
    await store.close()
    assert image.read_bytes() == bytes(expected)


@pytest.mark.parametrize("sendfile", [True, False], ids=["sendfile", "copy"])
async def test_structured_reads_around_a_hole(
    image: Path, monkeypatch: pytest.MonkeyPatch, sendfile: bool
) -> None:
    """Large reads next to a hole go out as data and hole chunks, after the small
    replies queued before them: with sendfile (forced on here, as for a remote
    peer) and through a pooled buffer (what a local peer gets)."""
    monkeypatch.setattr(server_module, "SENDFILE_TO_LOCAL_PEERS", sendfile)
    expected = bytearray(image.read_bytes())
    server, store = file_server(image)
    hole = 2 * MiB + 64 * KiB
    await store.trim(hole, 64 * KiB)
    expected[hole : hole + 64 * KiB] = bytes(64 * KiB)
    burst = b"".join(request(Cmd.READ, c, c * 8192, 4096) for c in range(1, 6))
    burst += request(Cmd.READ, 6, hole - 64 * KiB, 128 * KiB)  # data, then the hole
    burst += request(Cmd.READ, 7, hole, 128 * KiB)  # the hole, then data
    burst += request(Cmd.READ, 8, 5 * MiB, 256 * KiB)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            client = await connect(server, nursery)
            await client.go("disk", structured=True)
            await client.send(burst)
            chunks = [await client.chunk() for _ in range(5 + 2 + 2 + 1)]
            nursery.cancel_scope.cancel()
    await store.close()
    by_cookie: dict[int, list[tuple[int, int, bytes]]] = {}
    for flags, type_, cookie, payload in chunks:
        by_cookie.setdefault(cookie, []).append((flags, type_, payload))
    assert [c[2] for c in chunks[:5]] == [1, 2, 3, 4, 5]  # the queued ones left first

    def data_chunk(offset: int, length: int, done: bool) -> tuple[int, int, bytes]:
        payload = struct.pack(">Q", offset) + expected[offset : offset + length]
        return int(done), ReplyType.OFFSET_DATA, payload

    def hole_chunk(offset: int, length: int, done: bool) -> tuple[int, int, bytes]:
        return int(done), ReplyType.OFFSET_HOLE, struct.pack(">QI", offset, length)

    for cookie in range(1, 6):
        assert by_cookie[cookie] == [data_chunk(cookie * 8192, 4096, True)]
    assert by_cookie[6] == [data_chunk(hole - 64 * KiB, 64 * KiB, False), hole_chunk(hole, 64 * KiB, True)]
    assert by_cookie[7] == [hole_chunk(hole, 64 * KiB, False), data_chunk(hole + 64 * KiB, 64 * KiB, True)]
    assert by_cookie[8] == [data_chunk(5 * MiB, 256 * KiB, True)]


async def test_stop_waits_for_a_reply_being_sent(image: Path) -> None:
    """A graceful stop while the reader is blocked sending a reply to a client that
    does not read yet: the reply still arrives whole, then the connection closes."""
    expected = image.read_bytes()
    server, store = file_server(image)
    length = 8 * MiB  # far more than a socketpair buffers
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, [])
            client = await connect(server, nursery)
            await client.go("disk")
            await client.send(request(Cmd.READ, 9, MiB, length))
            await trio.testing.wait_all_tasks_blocked()  # the reader waits to send the rest
            server.shutdown()
            await trio.testing.wait_all_tasks_blocked()
            assert await client.simple_reply({9: length}) == (0, 9, expected[MiB : MiB + length])
            with pytest.raises(EOFError):
                await client.recv_exact(1)
    await store.close()
