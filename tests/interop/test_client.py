"""nbdfleece's NBD client against real servers: nbdfleece, qemu-nbd, qemu-storage-daemon.

Every peer serves the same two exports on a Unix socket:

* ``disk``: 16 MiB, writable, the first MiB random data, the rest zero, with a
  dirty bitmap ``b0`` in which exactly [4 MiB, 4 MiB + 64 KiB) is dirty (a
  ``qemu-io`` write through the peer, or into the qcow2 image before it is
  served);
* ``ro``: 1 MiB, read-only.

The same tests run against each peer; peer-specific behaviour (TLS, a server
that dies, refused exports) follows.
"""

from __future__ import annotations

import itertools
import os
import signal
import ssl
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from nbdfleece.client import (
    NbdAddress,
    NbdConnectionError,
    NbdError,
    list_exports,
    open_client,
    parse_uri,
)
from nbdfleece.constants import Errno, TransmissionFlag
from tests.conftest import ServerProcess, make_image, qemu_io, require, run, wait_listening

pytestmark = pytest.mark.interop

MiB = 1 << 20
DISK_SIZE = 16 * MiB
RO_SIZE = 1 * MiB
DIRTY = (4 * MiB, 64 * 1024)
BITMAP = "qemu:dirty-bitmap:b0"
CONTEXTS = ("base:allocation", BITMAP)


@dataclass
class Peer:
    name: str
    socket: Path
    head: bytes
    """The first MiB of ``disk`` (the rest reads as zero)."""
    processes: list[subprocess.Popen[bytes]]

    def uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.socket}"


@contextmanager
def qemu_process(cmd: list[str], sock: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Start a QEMU tool that listens on ``sock``; stop it at exit."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_listening(sock, proc, log=log)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def qcow2_with_bitmap(tmp_path: Path, head: bytes) -> Path:
    """The ``disk`` contents as a qcow2 image whose bitmap b0 has only DIRTY set."""
    raw = make_image(tmp_path / "disk-src.raw", DISK_SIZE, {0: head})
    qcow2 = tmp_path / "disk.qcow2"
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)])
    run(["qemu-img", "bitmap", "--add", str(qcow2), "b0"])
    run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0 {DIRTY[0]} {DIRTY[1]}", str(qcow2)])
    return qcow2


@pytest.fixture(params=["nbdfleece", "qemu-nbd", "qemu-storage-daemon"])
def peer(request: pytest.FixtureRequest, tmp_path: Path, server_factory: Callable[..., ServerProcess]
         ) -> Iterator[Peer]:
    head = os.urandom(MiB)
    ro = make_image(tmp_path / "ro.raw", RO_SIZE, {0: b"read-only!"})
    kind = request.param
    if kind == "nbdfleece":
        disk = make_image(tmp_path / "disk.raw", DISK_SIZE, {0: head})
        server = server_factory("--export", f"disk={disk},bitmap=b0", "--export", f"ro={ro},readonly")
        qemu_io(server.unix_uri("disk"), [f"write -P 0 {DIRTY[0]} {DIRTY[1]}"])
        yield Peer(kind, server.unix_path, head, [])
        return
    require("qemu-img", "qemu-io", kind)
    qcow2 = qcow2_with_bitmap(tmp_path, head)
    sock = tmp_path / "peer.sock"
    if kind == "qemu-nbd":
        # qemu-nbd serves one export per process: 'ro' comes from a second one,
        # which a symlink makes reachable beside 'disk' for the tests.
        ro_sock = tmp_path / "ro.sock"
        with qemu_process(["qemu-nbd", "-t", "-e", "8", "-k", str(sock), "-x", "disk", "-f", "qcow2",
                           "-B", "b0", str(qcow2)], sock, tmp_path / "qemu-nbd.log") as p1, \
             qemu_process(["qemu-nbd", "-t", "-e", "8", "-k", str(ro_sock), "-x", "ro", "-f", "raw",
                           "-r", str(ro)], ro_sock, tmp_path / "qemu-nbd-ro.log") as p2:
            yield Peer(kind, sock, head, [p1, p2])
        return
    cmd = [
        "qemu-storage-daemon",
        "--blockdev", f"driver=file,node-name=f0,filename={qcow2}",
        "--blockdev", "driver=qcow2,node-name=disk0,file=f0",
        "--blockdev", f"driver=file,node-name=f1,filename={ro},read-only=on",
        "--blockdev", "driver=raw,node-name=ro0,file=f1,read-only=on",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=e0,node-name=disk0,name=disk,writable=on,bitmaps.0=b0,"
                    "description=the disk",
        "--export", "type=nbd,id=e1,node-name=ro0,name=ro",
    ]
    with qemu_process(cmd, sock, tmp_path / "qsd.log") as proc:
        yield Peer(kind, sock, head, [proc])


def ro_uri(peer: Peer) -> str:
    if peer.name == "qemu-nbd":
        return f"nbd+unix:///ro?socket={peer.socket.parent / 'ro.sock'}"
    return peer.uri("ro")


# ==========================================================================
# Every peer
# ==========================================================================


async def test_negotiation(peer: Peer) -> None:
    async with open_client(peer.uri("disk"), meta_contexts=(*CONTEXTS, "qemu:dirty-bitmap:nosuch")) as c:
        assert (c.export_name, c.size, c.read_only) == ("disk", DISK_SIZE, False)
        assert c.flags & TransmissionFlag.HAS_FLAGS and c.flags & TransmissionFlag.SEND_WRITE_ZEROES
        assert c.structured and set(c.contexts) == set(CONTEXTS)
        minimum, preferred, maximum = c.block_size
        assert minimum >= 1 and preferred >= minimum and maximum >= 32 * MiB
    async with open_client(ro_uri(peer)) as c:
        assert c.read_only and c.size == RO_SIZE and c.contexts == {}
    names = [name for name, _ in await list_exports(peer.uri(""))]
    assert "disk" in names
    if peer.name != "qemu-nbd":
        assert sorted(names) == ["disk", "ro"]


async def test_read_write_zero_trim_flush(peer: Peer) -> None:
    async with open_client(peer.uri("disk")) as c:
        assert await c.pread(0, MiB) == peer.head
        assert await c.pread(8 * MiB, 4096) == bytes(4096)
        pattern = bytes(range(256)) * 256
        await c.pwrite(8 * MiB, pattern)
        await c.pwrite(8 * MiB + 65536, b"fua!", fua=True)
        buf = bytearray(65536 + 4)
        await c.pread_into(8 * MiB, memoryview(buf))
        assert bytes(buf) == pattern + b"fua!"
        await c.write_zeroes(8 * MiB, 4096, no_hole=True)
        await c.write_zeroes(8 * MiB + 4096, 4096)
        assert await c.pread(8 * MiB, 8192) == bytes(8192)
        assert await c.pread(8 * MiB + 8192, 16) == pattern[8192 : 8192 + 16]
        await c.trim(12 * MiB, MiB)
        await c.flush()
    async with open_client(peer.uri("disk")) as c:  # the data is on the server, not in the client
        assert await c.pread(8 * MiB + 8192, 16) == pattern[8192 : 8192 + 16]


async def test_block_status(peer: Peer) -> None:
    async with open_client(peer.uri("disk"), meta_contexts=CONTEXTS) as c:
        found = await c.block_status(0, DISK_SIZE)
        assert set(found) == set(CONTEXTS)
        for extents in found.values():
            assert extents and all(length > 0 for length, _ in extents)
        head_flags = found["base:allocation"][0][1]
        assert not head_flags & 2, "the random first MiB cannot be reported as zero"
        one = await c.block_status(0, 4096, req_one=True)
        assert all(len(e) == 1 and e[0][0] <= 4096 for e in one.values())
        dirty = [e async for e in c.extents(BITMAP)]
        assert dirty == [(0, DIRTY[0], 0), (DIRTY[0], DIRTY[1], 1),
                         (sum(DIRTY), DISK_SIZE - sum(DIRTY), 0)]
        clipped = [e async for e in c.extents(BITMAP, DIRTY[0] - 100, 200, chunk=MiB)]
        assert clipped == [(DIRTY[0] - 100, 100, 0), (DIRTY[0], 100, 1)]
        allocation = [e async for e in c.extents("base:allocation", chunk=MiB)]
        assert allocation[0][0] == 0 and sum(n for _, n, _ in allocation) == DISK_SIZE
        assert all(a[0] + a[1] == b[0] and a[2] != b[2] for a, b in itertools.pairwise(allocation))
        with pytest.raises(NbdError, match="not negotiated"):
            async for _ in c.extents("qemu:dirty-bitmap:nosuch"):
                pass


async def test_error_replies_keep_the_connection(peer: Peer) -> None:
    async with open_client(peer.uri("disk"), meta_contexts=CONTEXTS) as c:
        with pytest.raises(NbdError) as beyond:
            await c.pread(DISK_SIZE, 8)
        assert beyond.value.errno == Errno.EINVAL and beyond.value.message
        with pytest.raises(NbdError) as crossing:
            await c.pread(DISK_SIZE - 4, 8)
        assert crossing.value.errno == Errno.EINVAL
        with pytest.raises(NbdError) as status:
            await c.block_status(DISK_SIZE, 512)
        assert status.value.errno == Errno.EINVAL
        assert await c.pread(0, 16) == peer.head[:16]
    async with open_client(ro_uri(peer)) as c:
        with pytest.raises(NbdError) as denied:
            await c.pwrite(0, b"nope")
        # The spec says SHOULD EPERM; QEMU 7.2 answers EINVAL ("Export is read-only").
        assert denied.value.errno == (Errno.EPERM if peer.name == "nbdfleece" else Errno.EINVAL)
        assert "read-only" in denied.value.message
        with pytest.raises(NbdError) as trim:
            await c.trim(0, 4096)  # not even sent: the export does not offer it
        assert trim.value.errno == Errno.EPERM
        assert await c.pread(0, 10) == b"read-only!"


async def test_pipelined_requests_from_many_tasks(peer: Peer) -> None:
    """400 tasks share one connection (at most 16 requests in flight); replies
    come back in any order and each task gets its own."""
    piece = 32 * 1024
    count = 200
    async with open_client(peer.uri("disk"), max_in_flight=16) as c:
        # Observe (not replace) the core: how many requests are ever outstanding.
        core = c._core
        build = core.request
        most = 0

        def counting(*args: Any, **kwargs: Any) -> tuple[int, bytes]:
            nonlocal most
            built = build(*args, **kwargs)
            most = max(most, core.in_flight)
            return built

        core.request = counting  # type: ignore[method-assign]

        async def write(i: int) -> None:
            await c.pwrite(2 * MiB + i * piece, bytes([i % 251]) * piece)

        results: dict[int, bytes] = {}

        async def read(i: int) -> None:
            results[i] = await c.pread(2 * MiB + i * piece, piece)

        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(write, i)
        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(read, i)
                nursery.start_soon(c.flush if i % 50 == 0 else trio.lowlevel.checkpoint)
        assert all(results[i] == bytes([i % 251]) * piece for i in range(count))
        assert 1 < most <= 16


async def test_multi_connection_reads(peer: Peer) -> None:
    """Four connections read the whole export in parallel, into one buffer."""
    whole = bytearray(DISK_SIZE)
    view = memoryview(whole)
    step = 2 * MiB
    async with open_client(peer.uri("disk")) as first:
        assert first.can_multi_conn

    async def worker(index: int) -> None:
        async with open_client(peer.uri("disk"), max_in_flight=4) as c, trio.open_nursery() as nursery:
            for offset in range(index * step, DISK_SIZE, 4 * step):
                nursery.start_soon(c.pread_into, offset, view[offset : offset + step])

    async with trio.open_nursery() as nursery:
        for index in range(4):
            nursery.start_soon(worker, index)
    assert bytes(whole[:MiB]) == peer.head and not any(whole[MiB:])


# ==========================================================================
# Refusals, TLS, failures
# ==========================================================================


async def test_unknown_export_is_a_clear_error(peer: Peer) -> None:
    with pytest.raises(NbdConnectionError, match="has no export 'nosuch'"):
        async with open_client(peer.uri("disk"), export="nosuch"):
            pass


async def test_nothing_listening(tmp_path: Path) -> None:
    with pytest.raises(NbdConnectionError, match="cannot connect"):
        async with open_client(f"nbd+unix:///x?socket={tmp_path / 'none.sock'}"):
            pass


async def test_server_that_dies_fails_pending_and_later_requests(tmp_path: Path) -> None:
    require("qemu-nbd")
    image = make_image(tmp_path / "d.raw", MiB)
    sock = tmp_path / "d.sock"
    with qemu_process(["qemu-nbd", "-t", "-k", str(sock), "-x", "d", "-f", "raw", str(image)],
                      sock, tmp_path / "qemu-nbd.log") as proc:
        async with open_client(f"nbd+unix:///d?socket={sock}") as c:
            assert await c.pread(0, 4) == bytes(4)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            with pytest.raises(NbdConnectionError):
                for _ in range(100):  # the first ones may still be queued by the kernel
                    await c.pread(0, 4)
            assert c.broken is not None
            with pytest.raises(NbdConnectionError):
                await c.flush()


def make_pki(directory: Path) -> Path:
    """A CA and a server certificate for localhost, as QEMU's x509 credentials want them."""
    require("openssl")
    directory.mkdir()
    ca_key, ca_cert = directory / "ca-key.pem", directory / "ca-cert.pem"
    key, csr, cert = directory / "server-key.pem", directory / "server.csr", directory / "server-cert.pem"
    ext = directory / "ext.cnf"
    ext.write_text("subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n"
                   "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")
    run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key),
         "-out", str(ca_cert), "-days", "2", "-subj", "/CN=nbdfleece test CA",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign"])
    run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
         "-subj", "/CN=localhost"])
    run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
         "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext)])
    return ca_cert


async def test_tls_with_qemu_nbd(tmp_path: Path) -> None:
    require("qemu-nbd")
    ca = make_pki(tmp_path / "pki")
    image = make_image(tmp_path / "t.raw", MiB, {4096: b"secret"})
    sock = tmp_path / "t.sock"
    cmd = ["qemu-nbd", "-t", "-e", "4", "-k", str(sock), "-x", "t", "-f", "raw",
           "--object", f"tls-creds-x509,id=tls0,dir={ca.parent},endpoint=server,verify-peer=off",
           "--tls-creds", "tls0", str(image)]
    with qemu_process(cmd, sock, tmp_path / "qemu-nbd.log"):
        plain = f"nbd+unix:///t?socket={sock}"
        with pytest.raises(NbdConnectionError, match="requires TLS"):
            async with open_client(plain):
                pass
        with pytest.raises(ValueError, match="needs tls="):
            async with open_client(plain.replace("nbd+", "nbds+")):
                pass
        context = ssl.create_default_context(cafile=str(ca))
        with pytest.raises(NbdConnectionError, match="check_hostname"):
            async with open_client(plain, tls=context):
                pass
        context.check_hostname = False  # a Unix socket has no host name; the CA is still checked
        assert await list_exports(plain.replace("nbd+", "nbds+"), tls=context) == [("t", "")]
        async with open_client(plain.replace("nbd+", "nbds+"), tls=context,
                               meta_contexts=["base:allocation"]) as c:
            assert await c.pread(4096, 6) == b"secret"
            await c.pwrite(0, b"over tls")
            assert await c.pread(0, 8) == b"over tls"
            assert "base:allocation" in await c.block_status(0, MiB)
        untrusted = ssl.create_default_context()  # system CAs: our test CA is unknown
        untrusted.check_hostname = False
        with pytest.raises(NbdConnectionError, match="TLS handshake"):
            async with open_client(plain, tls=untrusted):
                pass


async def test_tcp_and_cancellation(live_server: ServerProcess) -> None:
    """TCP URIs; callers cancelled before or while waiting leave the connection usable."""
    async with open_client(live_server.uri("live")) as c:
        await c.pwrite(0, b"x" * 4096)
        buf = bytearray(4096)
        with trio.CancelScope() as scope:
            scope.cancel()
            await c.pread_into(0, memoryview(buf))  # cancelled before it is sent
        assert buf == bytearray(4096)
        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(c.pread, 0, 65536)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()  # their replies are still read, and dropped
        assert await c.pread(0, 4096) == b"x" * 4096
        assert c.broken is None


def test_parse_uri() -> None:
    assert parse_uri("nbd://example.com/disk") == NbdAddress(False, "example.com", 10809, None, "disk")
    assert parse_uri("nbds://[::1]:1234/a%20b/c") == NbdAddress(True, "::1", 1234, None, "a b/c")
    assert parse_uri("nbd://h") == NbdAddress(False, "h", 10809, None, "")
    assert parse_uri("nbd+unix:///e?socket=/run/x.sock") == NbdAddress(False, None, 0, "/run/x.sock", "e")
    assert parse_uri("nbds+unix://?socket=s").tls
    for bad in ("http://x/y", "nbd+unix:///e", "nbd+unix://host/e?socket=s", "nbd://h:99999999/"):
        with pytest.raises(ValueError):
            parse_uri(bad)
