"""Hostile and broken clients against the real server process, over raw sockets.

Every case asserts the exact answer the server gives (``protocol/nbd.md`` §7,
§9), then proves that the connection is either still usable (a good request
afterwards gets its answer) or closed (``recv`` returns ``b""``), and that a
fresh client connecting afterwards is served normally.

The wire numbers are written out here rather than imported from
``nbdfleece.constants`` so that these tests check the server against the
protocol, not against itself.
"""

from __future__ import annotations

import contextlib
import itertools
import resource
import signal
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import cast

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.conftest import ServerProcess, make_image, start_server

pytestmark = pytest.mark.interop

# -- wire numbers (NBD spec, protocol/nbd.md) ---------------------------------
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

C_FIXED_NEWSTYLE = 1
C_NO_ZEROES = 2

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_BIT = 1 << 31
REP_ERR_UNSUP = REP_ERR_BIT | 1
REP_ERR_POLICY = REP_ERR_BIT | 2
REP_ERR_INVALID = REP_ERR_BIT | 3
REP_ERR_UNKNOWN = REP_ERR_BIT | 6
REP_ERR_TOO_BIG = REP_ERR_BIT | 9

INFO_EXPORT = 0

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

FLAG_FUA = 1
FLAG_DF = 4
FLAG_REQ_ONE = 8

REPLY_FLAG_DONE = 1
TYPE_NONE = 0
TYPE_OFFSET_DATA = 1
TYPE_OFFSET_HOLE = 2
TYPE_BLOCK_STATUS = 5
TYPE_ERROR = 0x8001
TYPE_ERROR_OFFSET = 0x8002

EPERM = 1
EINVAL = 22
ENOSPC = 28

MAX_BLOCK = 32 * 1024 * 1024
MIB = 1 << 20
SIZE = 64 * MIB
PATTERN = bytes(range(256)) * 16
"""The first 4 KiB of every test image, checked by every 'still served' read."""

IO_TIMEOUT = 10.0
CLOSE_WITHIN = 5.0

TF_HAS_FLAGS = 0x0001
TF_READ_ONLY = 0x0002
TF_SEND_DF = 0x0080


class ConnectionClosedError(Exception):
    """The server closed the connection while the client expected more bytes."""


# -- a tiny raw NBD client ------------------------------------------------------


@dataclass
class Reply:
    cookie: int
    error: int
    data: bytes = b""
    chunk_types: list[int] = field(default_factory=list)
    message: bytes = b""
    status_payloads: list[bytes] = field(default_factory=list)


def go_payload(name: bytes, infos: Sequence[int] = ()) -> bytes:
    return (
        struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos))
        + b"".join(struct.pack(">H", i) for i in infos)
    )


def meta_payload(name: bytes, queries: Sequence[bytes]) -> bytes:
    out = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
    for query in queries:
        out += struct.pack(">I", len(query)) + query
    return out


def request_header(
    cmd: int, offset: int, length: int, cookie: int, flags: int = 0, magic: int = REQUEST_MAGIC
) -> bytes:
    return struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length)


DECOY_COOKIE = 0xDEC0DEC0DEC0DEC0


def decoy(n: int) -> bytes:
    """A WRITE payload made of valid READ request headers.

    If the server ever parses a payload it should have discarded as requests,
    it answers ``DECOY_COOKIE``, which no test expects.
    """
    one = request_header(CMD_READ, 0, 1, DECOY_COOKIE)
    return (one * (n // len(one) + 1))[:n]


class Client:
    """One raw TCP connection speaking just enough NBD to misbehave precisely."""

    def __init__(self, server: ServerProcess, timeout: float = IO_TIMEOUT) -> None:
        self.sock = server.connect()
        self.sock.settimeout(timeout)
        self.timeout = timeout
        self.structured = False
        self.size = 0
        self.tflags = 0
        self._cookies = itertools.count(1)
        self.pending: dict[int, tuple[int, int, int]] = {}

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    # -- bytes ----------------------------------------------------------------
    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        pos = 0
        while pos < n:
            got = self.sock.recv_into(view[pos:])
            if not got:
                raise ConnectionClosedError(f"closed after {pos} of {n} bytes")
            pos += got
        return bytes(buf)

    def expect_closed(self, within: float = CLOSE_WITHIN) -> float:
        """Assert the server closes without sending anything; return when it did."""
        self.sock.settimeout(within)
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            return time.monotonic()
        except TimeoutError:
            pytest.fail(f"connection still open {within} s later")
        finally:
            self.sock.settimeout(self.timeout)
        assert data == b"", f"expected a hard disconnect, got {data[:64]!r}"
        return time.monotonic()

    # -- handshake ------------------------------------------------------------
    def greet(self) -> None:
        magic, opt, hflags = struct.unpack(">QQH", self.recv_exact(18))
        assert (magic, opt, hflags) == (NBDMAGIC, IHAVEOPT, 0x0003)

    def start(self, flags: int = C_FIXED_NEWSTYLE | C_NO_ZEROES) -> Client:
        self.greet()
        self.send(struct.pack(">I", flags))
        return self

    def send_option(
        self, opt: int, data: bytes = b"", *, length: int | None = None, magic: int = IHAVEOPT
    ) -> None:
        self.send(struct.pack(">QII", magic, opt, len(data) if length is None else length) + data)

    def option_reply(self, opt: int) -> tuple[int, bytes]:
        magic, ropt, rtype, length = struct.unpack(">QIII", self.recv_exact(20))
        assert magic == OPTION_REPLY_MAGIC, hex(magic)
        assert ropt == opt, f"reply echoes option {ropt:#x}, sent {opt:#x}"
        return rtype, self.recv_exact(length)

    def option_replies(self, opt: int) -> list[tuple[int, bytes]]:
        """Replies up to and including the final one (ACK or an error)."""
        replies = []
        while True:
            rtype, payload = self.option_reply(opt)
            replies.append((rtype, payload))
            if rtype == REP_ACK or rtype & REP_ERR_BIT:
                return replies

    def option(self, opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        self.send_option(opt, data)
        return self.option_replies(opt)

    def option_error(self, opt: int, data: bytes, expected: int) -> str:
        """Send an option that must fail with ``expected`` alone; return the message."""
        replies = self.option(opt, data)
        assert [hex(r) for r, _ in replies] == [hex(expected)], replies
        message = replies[0][1]
        assert 1 <= len(message) <= 4096, "every error reply carries a message"
        return message.decode("utf-8")

    def structured_reply(self) -> None:
        assert self.option(OPT_STRUCTURED_REPLY) == [(REP_ACK, b"")]
        self.structured = True

    def set_meta(self, export: str, contexts: Sequence[str]) -> dict[str, int]:
        replies = self.option(
            OPT_SET_META_CONTEXT, meta_payload(export.encode(), [c.encode() for c in contexts])
        )
        assert replies[-1] == (REP_ACK, b""), replies
        ids = {}
        for rtype, payload in replies[:-1]:
            assert rtype == REP_META_CONTEXT, replies
            (cid,) = struct.unpack_from(">I", payload)
            ids[payload[4:].decode()] = cid
        return ids

    def go_replies(self, replies: list[tuple[int, bytes]]) -> None:
        assert replies[-1] == (REP_ACK, b""), replies
        for rtype, payload in replies[:-1]:
            assert rtype == REP_INFO, replies
            if struct.unpack_from(">H", payload)[0] == INFO_EXPORT:
                _, self.size, self.tflags = struct.unpack(">HQH", payload)
        assert self.size > 0 and self.tflags & TF_HAS_FLAGS

    def go(
        self, name: str = "live", *, structured: bool = False, contexts: Sequence[str] = ()
    ) -> Client:
        if structured:
            self.structured_reply()
        if contexts:
            self.set_meta(name, contexts)
        self.go_replies(self.option(OPT_GO, go_payload(name.encode())))
        assert bool(self.tflags & TF_SEND_DF) == self.structured
        return self

    # -- transmission ---------------------------------------------------------
    def request(
        self,
        cmd: int,
        offset: int = 0,
        length: int = 0,
        *,
        flags: int = 0,
        payload: bytes = b"",
        cookie: int | None = None,
    ) -> int:
        cookie = next(self._cookies) if cookie is None else cookie
        self.pending[cookie] = (cmd, offset, length)
        self.send(request_header(cmd, offset, length, cookie, flags))
        if payload:
            self.send(payload)
        return cookie

    def reply(self, cookie: int | None = None) -> Reply:
        reply = self._structured_reply() if self.structured else self._simple_reply()
        if cookie is not None:
            assert reply.cookie == cookie, f"reply to {reply.cookie:#x}, expected {cookie:#x}"
        return reply

    def _simple_reply(self) -> Reply:
        magic, error, cookie = struct.unpack(">IIQ", self.recv_exact(16))
        assert magic == SIMPLE_REPLY_MAGIC, hex(magic)
        assert cookie in self.pending, f"reply with unexpected cookie {cookie:#x}"
        cmd, _offset, length = self.pending.pop(cookie)
        data = self.recv_exact(length) if cmd == CMD_READ and error == 0 and length else b""
        return Reply(cookie, error, data)

    def _structured_reply(self) -> Reply:
        reply: Reply | None = None
        data = bytearray()
        covered = 0
        offset = length = 0
        while True:
            magic, flags, rtype, cookie, plen = struct.unpack(">IHHQI", self.recv_exact(20))
            assert magic == STRUCTURED_REPLY_MAGIC, hex(magic)
            assert flags & ~REPLY_FLAG_DONE == 0, hex(flags)
            if reply is None:
                assert cookie in self.pending, f"reply with unexpected cookie {cookie:#x}"
                reply = Reply(cookie, 0)
                cmd, offset, length = self.pending[cookie]
                if cmd == CMD_READ:
                    data = bytearray(length)
            else:
                assert cookie == reply.cookie, "chunks of another reply interleaved"
            payload = self.recv_exact(plen)
            reply.chunk_types.append(rtype)
            if rtype == TYPE_NONE:
                assert plen == 0
            elif rtype == TYPE_OFFSET_DATA:
                (at,) = struct.unpack_from(">Q", payload)
                rel = at - offset
                assert rel >= 0 and rel + plen - 8 <= length, (at, plen)
                data[rel : rel + plen - 8] = payload[8:]
                covered += plen - 8
            elif rtype == TYPE_OFFSET_HOLE:
                at, hlen = struct.unpack(">QI", payload)
                assert hlen and offset <= at and at + hlen <= offset + length
                covered += hlen
            elif rtype == TYPE_BLOCK_STATUS:
                reply.status_payloads.append(payload)
            elif rtype in (TYPE_ERROR, TYPE_ERROR_OFFSET):
                reply.error, mlen = struct.unpack_from(">IH", payload)
                extra = 8 if rtype == TYPE_ERROR_OFFSET else 0
                assert plen == 6 + mlen + extra, "error chunk length mismatch"
                reply.message = payload[6 : 6 + mlen]
                assert reply.error != 0
            else:
                pytest.fail(f"unknown chunk type {rtype:#x}")
            if flags & REPLY_FLAG_DONE:
                break
        cmd, _, _ = self.pending.pop(reply.cookie)
        if cmd == CMD_READ and reply.error == 0:
            assert covered == length, f"READ chunks cover {covered} of {length} bytes"
        reply.data = bytes(data) if reply.error == 0 else b""
        return reply

    def read(self, offset: int, length: int, *, flags: int = 0) -> Reply:
        return self.reply(self.request(CMD_READ, offset, length, flags=flags))

    def check_read(self, offset: int = 0, expected: bytes = PATTERN) -> None:
        reply = self.read(offset, len(expected))
        assert reply.error == 0, reply
        assert reply.data == expected

    def expect_error(
        self,
        cmd: int,
        offset: int,
        length: int,
        errno: int,
        *,
        flags: int = 0,
        payload: bytes = b"",
    ) -> Reply:
        reply = self.reply(self.request(cmd, offset, length, flags=flags, payload=payload))
        assert reply.error == errno, f"errno {reply.error}, expected {errno}"
        assert reply.data == b""
        if self.structured:
            assert reply.chunk_types == [TYPE_ERROR]
            assert reply.message, "structured errors carry a message"
            reply.message.decode("utf-8")
        return reply

    def disconnect(self) -> None:
        self.send(request_header(CMD_DISC, 0, 0, 0))
        self.expect_closed()


# -- servers and common checks ------------------------------------------------

ServerFactory = Callable[..., ServerProcess]

BAD_LOG_LINES = ("Traceback", "internal error", "failed unexpectedly")


def assert_clean_log(server: ServerProcess) -> None:
    log = server.log()
    for bad in BAD_LOG_LINES:
        assert bad not in log, f"server log contains {bad!r}:\n{log[-4000:]}"


def check_served(server: ServerProcess, export: str = "live") -> None:
    """A new client completes GO + READ: the server is alive and not wedged."""
    assert server.alive(), f"server died:\n{server.log()[-4000:]}"
    with Client(server) as client:
        client.start().go(export)
        assert client.size == SIZE
        client.check_read()
        client.disconnect()
    assert_clean_log(server)


def stop_checked(server: ServerProcess) -> None:
    assert server.alive(), f"server died:\n{server.log()[-4000:]}"
    rc = server.stop()
    assert rc == 0, f"server exited with {rc} on SIGTERM:\n{server.log()[-4000:]}"
    assert_clean_log(server)


def export_args(workdir: Path, size: int = SIZE) -> tuple[list[str], Path]:
    workdir.mkdir(parents=True, exist_ok=True)
    live = make_image(workdir / "live.raw", size, {0: PATTERN})
    snap = make_image(workdir / "snap.raw", SIZE, {0: PATTERN})
    return ["--export", f"live={live}", "--export", f"snap={snap},readonly"], live


@dataclass
class Shared:
    server: ServerProcess
    live: Path


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    """One server for every case that leaves the images alone (saves start-ups)."""
    workdir = tmp_path_factory.mktemp("bad-input")
    args, live = export_args(workdir)
    server = start_server(workdir / "srv", *args)
    try:
        yield Shared(server, live)
    finally:
        stop_checked(server)


@pytest.fixture
def factory(server_factory: object) -> ServerFactory:
    return cast(ServerFactory, server_factory)


# == handshake ==================================================================


def test_bad_option_magic_closes(shared: Shared) -> None:
    with Client(shared.server) as client:
        client.start()
        client.send_option(OPT_GO, go_payload(b"live"), magic=0x1122334455667788)
        client.expect_closed()
    check_served(shared.server)


@pytest.mark.parametrize("flags", [0x4 | 3, 0x80000000 | 3, 0xFFFFFFFF, 0x4])
def test_unknown_client_flags_close(shared: Shared, flags: int) -> None:
    with Client(shared.server) as client:
        client.start(flags)
        client.expect_closed()
    check_served(shared.server)


def test_option_too_big_is_refused_and_negotiation_continues(shared: Shared) -> None:
    with Client(shared.server) as client:
        client.start()
        client.send_option(OPT_LIST, b"\xa5" * 65537)
        [(rtype, message)] = client.option_replies(OPT_LIST)
        assert rtype == REP_ERR_TOO_BIG
        assert 1 <= len(message) <= 4096
        # The 65537 bytes were consumed: the next option is parsed correctly.
        client.go("live")
        client.check_read()
    check_served(shared.server)


def test_huge_option_length_then_vanish(shared: Shared) -> None:
    with Client(shared.server) as client:
        client.start()
        client.send_option(OPT_INFO, b"\x00" * 10, length=0xFFFFFFF0)
    check_served(shared.server)


def test_export_name_too_long_in_go(shared: Shared) -> None:
    with Client(shared.server) as client:
        client.start()
        client.option_error(OPT_GO, go_payload(b"x" * 4097), REP_ERR_INVALID)
        client.option_error(OPT_INFO, go_payload(b"x" * 4097), REP_ERR_INVALID)
        client.go("live")
        client.check_read()
    check_served(shared.server)


def test_unknown_export_in_go_continues(shared: Shared) -> None:
    with Client(shared.server) as client:
        client.start()
        message = client.option_error(OPT_GO, go_payload(b"nope"), REP_ERR_UNKNOWN)
        assert message == "export 'nope' not present"
        client.option_error(OPT_INFO, go_payload(b"nope"), REP_ERR_UNKNOWN)
        client.go("live")
        client.check_read()
    check_served(shared.server)


@pytest.mark.parametrize(
    "payload",
    [
        b"",  # shorter than the 6 fixed bytes
        struct.pack(">I", 100) + b"live" + struct.pack(">H", 0),  # name overruns
        go_payload(b"live", [1]) + b"\x00",  # trailing byte
        go_payload(b"live")[:-1] + struct.pack(">B", 3),  # 3 info requests, none sent
    ],
    ids=["empty", "name-overrun", "trailing", "info-overrun"],
)
def test_malformed_go_is_invalid(shared: Shared, payload: bytes) -> None:
    with Client(shared.server) as client:
        client.start()
        client.option_error(OPT_GO, payload, REP_ERR_INVALID)
        client.go("live")
        client.check_read()
    check_served(shared.server)


def test_export_name_unknown_closes(shared: Shared) -> None:
    with Client(shared.server) as client:
        client.start()
        client.send_option(OPT_EXPORT_NAME, b"nope")
        client.expect_closed()
    check_served(shared.server)


def test_export_name_known_works(shared: Shared) -> None:
    """The control for the case above: EXPORT_NAME itself works (no zeroes)."""
    with Client(shared.server) as client:
        client.start()
        client.send_option(OPT_EXPORT_NAME, b"live")
        size, tflags = struct.unpack(">QH", client.recv_exact(10))
        assert size == SIZE and tflags & TF_HAS_FLAGS
        client.check_read()
    check_served(shared.server)


def test_unknown_option_unsupported(shared: Shared) -> None:
    with Client(shared.server) as client:
        client.start()
        message = client.option_error(0x1234, b"some data", REP_ERR_UNSUP)
        assert message == "option 4660 not supported"
        client.option_error(0x1234, b"", REP_ERR_UNSUP)
        client.option_error(0xFFFFFFFF, b"", REP_ERR_UNSUP)
        client.go("live")
        client.check_read()
    check_served(shared.server)


def test_starttls_refused_by_policy(shared: Shared) -> None:
    with Client(shared.server) as client:
        client.start()
        assert client.option_error(OPT_STARTTLS, b"", REP_ERR_POLICY) == "TLS not configured"
        client.go("live")
        client.check_read()
    check_served(shared.server)


def test_starttls_with_data_refused_by_policy(shared: Shared) -> None:
    """nbd.md §3.3: 'Any data is read and dropped. The answer is always ERR_POLICY'."""
    with Client(shared.server) as client:
        client.start()
        assert client.option_error(OPT_STARTTLS, b"xyz", REP_ERR_POLICY) == "TLS not configured"
        client.go("live")
        client.check_read()
    check_served(shared.server)


def test_list_with_data_invalid_then_list_works(shared: Shared) -> None:
    with Client(shared.server) as client:
        client.start()
        client.option_error(OPT_LIST, b"x", REP_ERR_INVALID)
        replies = client.option(OPT_LIST)
        assert [r for r, _ in replies] == [REP_SERVER, REP_SERVER, REP_ACK]
        names = []
        for _, payload in replies[:-1]:
            (n,) = struct.unpack_from(">I", payload)
            names.append(payload[4 : 4 + n])
        assert names == [b"live", b"snap"]
        client.go("live")
        client.check_read()
    check_served(shared.server)


def test_structured_reply_twice(shared: Shared) -> None:
    with Client(shared.server) as client:
        client.start()
        client.option_error(OPT_STRUCTURED_REPLY, b"x", REP_ERR_INVALID)
        client.structured_reply()
        message = client.option_error(OPT_STRUCTURED_REPLY, b"", REP_ERR_INVALID)
        assert message == "structured reply already negotiated"
        client.go("live")
        assert client.structured and client.tflags & TF_SEND_DF
        client.check_read()
    check_served(shared.server)


def test_abort_acks_then_closes(shared: Shared) -> None:
    with Client(shared.server) as client:
        client.start()
        assert client.option(OPT_ABORT, b"ignored") == [(REP_ACK, b"")]
        client.expect_closed()
    check_served(shared.server)


def test_non_fixed_client_option_closes(shared: Shared) -> None:
    with Client(shared.server) as client:
        client.start(0)
        client.send_option(OPT_LIST)
        client.expect_closed()
    check_served(shared.server)


@pytest.mark.parametrize("opt", [OPT_SET_META_CONTEXT, OPT_LIST_META_CONTEXT])
def test_meta_context_before_structured_reply(shared: Shared, opt: int) -> None:
    with Client(shared.server) as client:
        client.start()
        client.option_error(opt, meta_payload(b"live", [b"base:allocation"]), REP_ERR_INVALID)
        client.go("live", structured=True)
        client.check_read()
    check_served(shared.server)


MALFORMED_META = {
    "namelen-overrun": struct.pack(">I", 50) + b"live" + struct.pack(">I", 0),
    "namelen-overrun-no-rest": struct.pack(">I", 5) + b"live",
    "nqueries-too-large": struct.pack(">I", 4) + b"live" + struct.pack(">II", 5, 15)
    + b"base:allocation",
    "query-overrun": struct.pack(">I", 4) + b"live" + struct.pack(">II", 1, 50)
    + b"base:allocation",
    "trailing": meta_payload(b"live", [b"base:allocation"]) + b"\x00",
    "truncated-nqueries": struct.pack(">I", 4) + b"live" + b"\x00\x00",
    "query-too-long": meta_payload(b"live", [b"base:" + b"a" * 4092]),
    "empty": b"",
}


@pytest.mark.parametrize("opt", [OPT_SET_META_CONTEXT, OPT_LIST_META_CONTEXT])
def test_malformed_meta_context_is_invalid(shared: Shared, opt: int) -> None:
    with Client(shared.server) as client:
        client.start()
        client.structured_reply()
        for name, payload in MALFORMED_META.items():
            try:
                client.option_error(opt, payload, REP_ERR_INVALID)
            except AssertionError as exc:
                raise AssertionError(f"case {name}: {exc}") from exc
        client.option_error(opt, meta_payload(b"nope", [b"base:allocation"]), REP_ERR_UNKNOWN)
        client.go("live")
        client.check_read()
    check_served(shared.server)


def test_failed_set_clears_selection(shared: Shared) -> None:
    with Client(shared.server) as client:
        client.start()
        client.structured_reply()
        assert client.set_meta("live", ["base:allocation"]) == {"base:allocation": 1}
        client.option_error(
            OPT_SET_META_CONTEXT, meta_payload(b"nope", [b"base:allocation"]), REP_ERR_UNKNOWN
        )
        client.go("live")
        client.expect_error(CMD_BLOCK_STATUS, 0, 4096, EINVAL)
        client.check_read()
    check_served(shared.server)


def test_valid_set_meta_context_and_block_status(shared: Shared) -> None:
    with Client(shared.server) as client:
        client.start()
        client.structured_reply()
        replies = client.option(
            OPT_SET_META_CONTEXT, meta_payload(b"live", [b"base:allocation"])
        )
        assert len(replies) == 2
        (rtype, payload), ack = replies
        assert ack == (REP_ACK, b"")
        assert rtype == REP_META_CONTEXT
        (cid,) = struct.unpack_from(">I", payload)
        assert payload[4:] == b"base:allocation" and cid == 1
        client.go("live")
        reply = client.reply(client.request(CMD_BLOCK_STATUS, 0, 8192))
        assert reply.error == 0 and reply.chunk_types == [TYPE_BLOCK_STATUS]
        [status] = reply.status_payloads
        assert struct.unpack_from(">I", status) == (cid,)
        extents = [struct.unpack_from(">II", status, pos) for pos in range(4, len(status), 8)]
        assert extents and sum(n for n, _ in extents) <= 8192
        assert extents[0][1] == 0  # PATTERN at offset 0 is data
        client.check_read()
    check_served(shared.server)


def test_go_with_pipelined_request(shared: Shared) -> None:
    """A client may send its first request before reading the GO replies."""
    with Client(shared.server) as client:
        client.start()
        client.send_option(OPT_GO, go_payload(b"live"))
        client.pending[7] = (CMD_READ, 0, len(PATTERN))
        client.send(request_header(CMD_READ, 0, len(PATTERN), 7))
        client.go_replies(client.option_replies(OPT_GO))
        reply = client.reply(7)
        assert reply.error == 0 and reply.data == PATTERN
    check_served(shared.server)


# == transmission: framing violations ==========================================


def test_bad_request_magic_closes(shared: Shared) -> None:
    with Client(shared.server) as client:
        client.start().go("live")
        client.send(request_header(CMD_READ, 0, 4096, 1, magic=0x25609514))
        client.expect_closed()
    check_served(shared.server)


def test_options_after_go_close(shared: Shared) -> None:
    with Client(shared.server) as client:
        client.start().go("live")
        # LIST + ABORT: 32 bytes, read as a request header starting with "IHAV".
        client.send_option(OPT_LIST)
        client.send_option(OPT_ABORT)
        client.expect_closed()
    check_served(shared.server)


@pytest.mark.parametrize(
    "case",
    ["option-after-go", "request-magic-4-bytes", "option-magic-8-bytes", "export-name-header"],
)
def test_bad_magic_detected_without_waiting_for_more(shared: Shared, case: str) -> None:
    """nbd.md §3.2/§4.2/§7: magics are checked as soon as they arrive.

    A single option sent after GO ("hard disconnect after 4 bytes"), a bad
    request magic alone, a bad option magic alone, and an EXPORT_NAME > 4096
    ("hard disconnect, without reading the data") must not wait for bytes
    that a confused client will never send.
    """
    with Client(shared.server) as client:
        client.start()
        if case == "option-after-go":
            client.go("live")
            client.send_option(OPT_LIST)
        elif case == "request-magic-4-bytes":
            client.go("live")
            client.send(struct.pack(">I", 0x12345678))
        elif case == "option-magic-8-bytes":
            client.send(struct.pack(">Q", 0x1122334455667788))
        else:
            client.send(struct.pack(">QII", IHAVEOPT, OPT_EXPORT_NAME, 5000))
        client.expect_closed()
    check_served(shared.server)


@pytest.mark.parametrize("length", [5000, 65537])
def test_export_name_too_long_closes_without_reply(shared: Shared, length: int) -> None:
    """EXPORT_NAME has no option replies: a long one is a hard disconnect."""
    with Client(shared.server) as client:
        client.start()
        client.send_option(OPT_EXPORT_NAME, b"n" * length)
        client.expect_closed()
    check_served(shared.server)


# == transmission: requests the server must refuse and survive ==================


@dataclass(frozen=True)
class BadRequest:
    export: str
    cmd: int
    offset: int
    length: int
    errno: int
    flags: int = 0
    send_payload: bool = False


BAD_REQUESTS = {
    "read-beyond-end": BadRequest("live", CMD_READ, SIZE - 4096, 8192, EINVAL),
    "read-at-end": BadRequest("live", CMD_READ, SIZE, 1, EINVAL),
    "read-offset-wraps": BadRequest("live", CMD_READ, 2**64 - 1, 2, EINVAL),
    "write-beyond-end": BadRequest("live", CMD_WRITE, SIZE - 4096, 8192, ENOSPC,
                                   send_payload=True),
    "write-zeroes-beyond-end": BadRequest("live", CMD_WRITE_ZEROES, SIZE - 4096, 8192, ENOSPC),
    "trim-beyond-end": BadRequest("live", CMD_TRIM, SIZE - 4096, 8192, EINVAL),
    "cache-beyond-end": BadRequest("live", CMD_CACHE, SIZE, 4096, EINVAL),
    "write-read-only": BadRequest("snap", CMD_WRITE, 0, 4096, EPERM, send_payload=True),
    "trim-read-only": BadRequest("snap", CMD_TRIM, 0, 4096, EPERM),
    "write-zeroes-read-only": BadRequest("snap", CMD_WRITE_ZEROES, 0, 4096, EPERM),
    "read-too-long": BadRequest("live", CMD_READ, 0, MAX_BLOCK + 1, EINVAL),
    "write-too-long": BadRequest("live", CMD_WRITE, 0, MAX_BLOCK + 1, EINVAL,
                                 send_payload=True),
    "unknown-command-99": BadRequest("live", 99, 0, 4096, EINVAL),
    "unknown-command-8": BadRequest("live", 8, 0, 0, EINVAL),
    "read-req-one": BadRequest("live", CMD_READ, 0, 4096, EINVAL, flags=FLAG_REQ_ONE),
    "read-flag-0x8000": BadRequest("live", CMD_READ, 0, 4096, EINVAL, flags=0x8000),
    "write-flag-0x8000": BadRequest("live", CMD_WRITE, 0, 4096, EINVAL, flags=0x8000,
                                    send_payload=True),
    "flush-offset": BadRequest("live", CMD_FLUSH, 1, 0, EINVAL),
    "flush-length": BadRequest("live", CMD_FLUSH, 0, 1, EINVAL),
    "block-status-no-context": BadRequest("live", CMD_BLOCK_STATUS, 0, 4096, EINVAL),
}


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_request_answered_and_connection_continues(
    shared: Shared, name: str, structured: bool
) -> None:
    bad = BAD_REQUESTS[name]
    with Client(shared.server) as client:
        client.start().go(bad.export, structured=structured)
        payload = decoy(bad.length) if bad.send_payload else b""
        client.expect_error(bad.cmd, bad.offset, bad.length, bad.errno,
                            flags=bad.flags, payload=payload)
        # In sync: the next request is answered (a payload parsed as requests
        # would have produced DECOY_COOKIE replies first).
        client.check_read()
        client.disconnect()
    check_served(shared.server)


def test_block_status_without_structured_replies(shared: Shared) -> None:
    with Client(shared.server) as client:
        client.start().go("live")
        client.expect_error(CMD_BLOCK_STATUS, 0, 4096, EINVAL)
        client.check_read()
    check_served(shared.server)


def test_block_status_length_zero(shared: Shared) -> None:
    with Client(shared.server) as client:
        client.start().go("live", structured=True, contexts=["base:allocation"])
        client.expect_error(CMD_BLOCK_STATUS, 0, 0, EINVAL)
        client.check_read()
    check_served(shared.server)


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_zero_length_read_succeeds(shared: Shared, structured: bool) -> None:
    with Client(shared.server) as client:
        client.start().go("live", structured=structured)
        for offset in (0, SIZE):
            reply = client.read(offset, 0)
            assert reply.error == 0 and reply.data == b""
            if structured:
                assert reply.chunk_types == [TYPE_NONE]
        client.check_read()
    check_served(shared.server)


def test_df_read_without_structured_replies(shared: Shared) -> None:
    with Client(shared.server) as client:
        client.start().go("live")
        client.expect_error(CMD_READ, 0, 4096, EINVAL, flags=FLAG_DF)
        client.check_read()
    check_served(shared.server)


def test_df_read_with_structured_replies(shared: Shared) -> None:
    with Client(shared.server) as client:
        client.start().go("live", structured=True)
        reply = client.read(0, 128 * 1024, flags=FLAG_DF)
        assert reply.error == 0 and reply.chunk_types == [TYPE_OFFSET_DATA]
        assert reply.data[: len(PATTERN)] == PATTERN
    check_served(shared.server)


def test_many_errors_in_one_pipeline(shared: Shared) -> None:
    """Errors and successes interleaved without waiting keep the stream in sync."""
    with Client(shared.server) as client:
        client.start().go("live", structured=True)
        expected: dict[int, int] = {}
        for bad in BAD_REQUESTS.values():
            if bad.export != "live" or bad.length > MIB:
                continue
            payload = decoy(bad.length) if bad.send_payload else b""
            cookie = client.request(bad.cmd, bad.offset, bad.length, flags=bad.flags,
                                    payload=payload)
            expected[cookie] = bad.errno
            expected[client.request(CMD_READ, 0, len(PATTERN))] = 0
        got: dict[int, int] = {}
        for _ in expected:
            reply = client.reply()
            assert reply.cookie not in got
            got[reply.cookie] = reply.error
            if reply.error == 0:
                assert reply.data == PATTERN
        assert got == expected
    check_served(shared.server)


# == clients that vanish ========================================================


@pytest.mark.parametrize("where", ["before-greeting", "after-greeting", "after-flags",
                                   "half-option-header", "half-option-payload"])
def test_vanish_mid_handshake(shared: Shared, where: str) -> None:
    with Client(shared.server) as client:
        if where != "before-greeting":
            client.greet()
        if where in ("after-flags", "half-option-header", "half-option-payload"):
            client.send(struct.pack(">I", C_FIXED_NEWSTYLE | C_NO_ZEROES))
        if where == "half-option-header":
            client.send(struct.pack(">Q", IHAVEOPT))
        if where == "half-option-payload":
            client.send(struct.pack(">QII", IHAVEOPT, OPT_GO, 10) + b"\x00\x00\x00")
    check_served(shared.server)


def test_vanish_mid_request_header(shared: Shared) -> None:
    with Client(shared.server) as client:
        client.start().go("live")
        client.send(request_header(CMD_READ, 0, 4096, 1)[:10])
    check_served(shared.server)


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_vanish_mid_write_payload_writes_nothing(shared: Shared, structured: bool) -> None:
    offset = 40 * MIB + (4 * MIB if structured else 0)
    length = MIB
    with Client(shared.server) as client:
        client.start().go("live", structured=structured)
        client.send(request_header(CMD_WRITE, offset, length, 1, flags=FLAG_FUA))
        client.send(b"\xee" * (length // 2))
        # EOF mid-payload: the server must drop the request and hang up
        # (waiting for its close also orders the checks below after it).
        client.sock.shutdown(socket.SHUT_WR)
        client.expect_closed()
    with Client(shared.server) as other:
        other.start().go("live")
        flush = other.reply(other.request(CMD_FLUSH))
        assert flush.error == 0
        reply = other.read(offset, length)
        assert reply.error == 0 and reply.data == bytes(length)
        other.disconnect()
    with open(shared.live, "rb") as f:
        f.seek(offset)
        assert f.read(length) == bytes(length), "a partial WRITE reached the image"
    check_served(shared.server)


# == timeouts ===================================================================


def test_handshake_and_request_timeouts(factory: ServerFactory, tmp_path: Path) -> None:
    args, _ = export_args(tmp_path / "img")
    server = factory(*args, "--handshake-timeout", "1", "--request-timeout", "1")
    t0 = time.monotonic()
    silent = Client(server)
    partial = Client(server).start().go("live")
    idle = Client(server).start().go("live")
    try:
        partial.send(request_header(CMD_READ, 0, 4096, 1)[:14])
        t_partial = time.monotonic()
        silent.greet()
        closed = silent.expect_closed(within=5) - t0
        assert 0.8 <= closed <= 3.0, f"silent client closed after {closed:.2f} s"
        closed = partial.expect_closed(within=5) - t_partial
        assert 0.8 <= closed <= 3.0, f"stalled header closed after {closed:.2f} s"
        time.sleep(max(0.0, t0 + 2.2 - time.monotonic()))
        # Idle with nothing partial is not a stall: still served after > 2 s.
        idle.check_read()
        idle.disconnect()
    finally:
        for c in (silent, partial, idle):
            c.close()
    check_served(server)


def test_handshake_timeout_is_total_not_per_byte(
    factory: ServerFactory, tmp_path: Path
) -> None:
    args, _ = export_args(tmp_path / "img")
    server = factory(*args, "--handshake-timeout", "1", "--request-timeout", "1")
    with Client(server) as client:
        t0 = time.monotonic()
        client.start()
        closed_at: float | None = None
        while time.monotonic() - t0 < 5:
            try:
                replies = client.option(OPT_LIST)
            except (ConnectionClosedError, ConnectionResetError, BrokenPipeError):
                closed_at = time.monotonic() - t0
                break
            assert replies[-1] == (REP_ACK, b"")
            time.sleep(0.25)
        assert closed_at is not None, "a chatty client was never cut off"
        assert 0.8 <= closed_at <= 3.0, closed_at
    check_served(server)


def test_request_timeout_restarts_on_every_byte(
    factory: ServerFactory, tmp_path: Path
) -> None:
    args, _ = export_args(tmp_path / "img")
    server = factory(*args, "--handshake-timeout", "1", "--request-timeout", "1")
    with Client(server) as client:
        client.start().go("live")
        data = b"trickle!"
        header = request_header(CMD_WRITE, 8192, len(data), 5)
        client.pending[5] = (CMD_WRITE, 8192, len(data))
        for piece in (header[:10], header[10:20], header[20:], data[:3], data[3:6], data[6:]):
            client.send(piece)
            time.sleep(0.5)
        assert client.reply(5).error == 0
        client.check_read(8192, data)
        client.disconnect()
    check_served(server)


def test_idle_timeout(factory: ServerFactory, tmp_path: Path) -> None:
    args, _ = export_args(tmp_path / "img")
    server = factory(*args, "--idle-timeout", "1")
    with Client(server) as client:
        t0 = time.monotonic()
        client.start().go("live")
        closed = client.expect_closed() - t0
        assert 0.8 <= closed <= 3.0, f"idle client closed after {closed:.2f} s"
    with Client(server) as busy:
        busy.start().go("live")
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2.4:
            busy.check_read()
            time.sleep(0.4)
        busy.disconnect()
    check_served(server)


def test_idle_timeout_after_a_request(factory: ServerFactory, tmp_path: Path) -> None:
    """nbd.md §9: idle = nothing partial and nothing in flight, also after requests."""
    args, _ = export_args(tmp_path / "img")
    server = factory(*args, "--idle-timeout", "1")
    with Client(server) as client:
        client.start().go("live")
        client.check_read()
        t0 = time.monotonic()
        closed = client.expect_closed() - t0
        assert closed <= 3.0, f"idle client closed after {closed:.2f} s"
    check_served(server)


# == storage errors =============================================================

FSIZE_LIMIT = 16 * MIB


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, FSIZE_LIMIT))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_efbig_from_the_file_is_enospc(
    factory: ServerFactory, tmp_path: Path, structured: bool
) -> None:
    args, _ = export_args(tmp_path / "img")
    server = factory(*args, preexec=_limit_file_size)
    data = b"\x5a" * 8192
    with Client(server) as client:
        client.start().go("live", structured=structured)
        client.expect_error(CMD_WRITE, 32 * MIB, len(data), ENOSPC, payload=data)
        client.expect_error(CMD_WRITE, FSIZE_LIMIT - 4096, len(data), ENOSPC, payload=data)
        client.expect_error(CMD_WRITE, FSIZE_LIMIT, len(data), ENOSPC, payload=data,
                            flags=FLAG_FUA)
        ok = client.reply(client.request(CMD_WRITE, MIB, len(data), payload=data))
        assert ok.error == 0
        client.check_read(MIB, data)
        client.check_read()
        client.disconnect()
    check_served(server)


# == pipelining and bounds ======================================================


def vm_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def run_in_thread(target: Callable[[], None]) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def wrapper() -> None:
        try:
            target()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=wrapper, daemon=True)
    thread.start()
    return thread, errors


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_pipelined_writes_all_answered_once(
    factory: ServerFactory, tmp_path: Path, structured: bool
) -> None:
    count = 200
    args, _ = export_args(tmp_path / "img", size=256 * MIB)
    server = factory(*args)
    with Client(server, timeout=30) as client:
        client.start().go("live", structured=structured)

        def payload(i: int) -> bytes:
            return struct.pack(">I", i) * (MIB // 4)

        cookies = [1000 + i for i in range(count)]
        for i, cookie in enumerate(cookies):
            client.pending[cookie] = (CMD_WRITE, (i + 1) * MIB, MIB)

        def send_all() -> None:
            for i, cookie in enumerate(cookies):
                client.send(request_header(CMD_WRITE, (i + 1) * MIB, MIB, cookie))
                client.send(payload(i))

        thread, errors = run_in_thread(send_all)
        thread.join(60)
        assert not thread.is_alive() and not errors, errors
        seen: list[int] = []
        for _ in range(count):
            reply = client.reply()
            assert reply.error == 0
            seen.append(reply.cookie)
        assert sorted(seen) == cookies
        assert not client.pending
        for i in range(0, count, 7):
            client.check_read((i + 1) * MIB, payload(i))
        client.check_read()
        client.disconnect()
    check_served(server, "snap")


def test_unread_big_writes_stay_bounded(factory: ServerFactory, tmp_path: Path) -> None:
    count = 64
    args, _ = export_args(tmp_path / "img")
    server = factory(*args)
    pid = server.proc.pid
    baseline = vm_rss(pid)
    blob = b"\x3c" * MAX_BLOCK
    with Client(server, timeout=60) as client:
        client.start().go("live")
        for i in range(count):
            client.pending[i + 1] = (CMD_WRITE, (i % 2) * MAX_BLOCK, MAX_BLOCK)

        def send_all() -> None:
            for i in range(count):
                client.send(request_header(CMD_WRITE, (i % 2) * MAX_BLOCK, MAX_BLOCK, i + 1))
                client.send(blob)

        thread, errors = run_in_thread(send_all)
        peak = baseline
        deadline = time.monotonic() + 60
        while thread.is_alive() and time.monotonic() < deadline:
            peak = max(peak, vm_rss(pid))
            time.sleep(0.005)
        thread.join(1)
        assert not thread.is_alive() and not errors, errors
        peak = max(peak, vm_rss(pid))
        assert peak < 600 * MIB, f"server RSS peaked at {peak / MIB:.0f} MiB"
        seen = sorted(client.reply().cookie for _ in range(count))
        assert seen == list(range(1, count + 1))
        client.check_read(0, blob[:4096])
        client.disconnect()
    check_served(server, "snap")


def test_unread_big_read_replies_stay_bounded(factory: ServerFactory, tmp_path: Path) -> None:
    """32 READs of 32 MiB whose replies are not read: the server must stop reading
    requests instead of holding 1 GiB of reply data."""
    count = 32
    args, _ = export_args(tmp_path / "img")
    server = factory(*args)
    pid = server.proc.pid
    with Client(server, timeout=60) as client:
        client.start().go("live")
        cookies = [client.request(CMD_READ, (i % 2) * MAX_BLOCK, MAX_BLOCK) for i in range(count)]
        peak = 0
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            peak = max(peak, vm_rss(pid))
            time.sleep(0.01)
        assert peak < 600 * MIB, f"server RSS peaked at {peak / MIB:.0f} MiB"
        seen = []
        for _ in range(count):
            reply = client.reply()
            assert reply.error == 0 and len(reply.data) == MAX_BLOCK
            if reply.cookie % 2:
                assert reply.data[: len(PATTERN)] == PATTERN
            seen.append(reply.cookie)
        assert sorted(seen) == cookies
        client.disconnect()
    check_served(server)


# == fuzzing ====================================================================


@contextlib.contextmanager
def fuzz_server() -> Iterator[ServerProcess]:
    with tempfile.TemporaryDirectory(prefix="nbdfleece-fuzz-") as tmp:
        args, _ = export_args(Path(tmp) / "img")
        server = start_server(Path(tmp) / "srv", *args)
        try:
            yield server
        finally:
            stop_checked(server)


def send_and_drain(client: Client, data: bytes) -> bytes:
    """Send ``data``, half-close, and read until the server closes (<= 10 s)."""
    try:
        client.send(data)
        client.sock.shutdown(socket.SHUT_WR)
    except TimeoutError:
        pytest.fail("the server stopped reading")
    except OSError:  # the server hung up first (bad magic): fine
        return b""
    received = bytearray()
    client.sock.settimeout(10)
    try:
        while chunk := client.sock.recv(1 << 20):
            received += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"server kept the connection open after EOF (sent {data[:80]!r}...)")
    return bytes(received)


FUZZ_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)


def _option(magic: int, opt: int, data: bytes, delta: int) -> bytes:
    length = max(0, len(data) + delta) if delta < 1000 else delta
    return struct.pack(">QII", magic, opt, length) + data


option_bytes = st.builds(
    _option,
    magic=st.sampled_from([IHAVEOPT] * 15 + [REQUEST_MAGIC, 0]),
    opt=st.integers(0, 12) | st.integers(0, 12) | u32,
    data=st.binary(max_size=40)
    | st.builds(go_payload, st.sampled_from([b"", b"live", b"snap", b"nope"]),
                st.lists(st.integers(0, 5), max_size=4))
    | st.builds(meta_payload, st.sampled_from([b"", b"live", b"nope"]),
                st.lists(st.sampled_from([b"base:", b"base:allocation", b"", b"x"]), max_size=3)),
    delta=st.sampled_from([0, 0, 0, 0, -1, 1, -6, 65537, 0xFFFFFFFF]),
)

_options_then_junk = st.builds(
    lambda flags, opts, tail: struct.pack(">I", flags) + b"".join(opts) + tail,
    st.sampled_from([3] * 12 + [1, 0, 2, 4, 0xFFFFFFFF]),
    st.lists(option_bytes, max_size=6),
    st.binary(max_size=16),
)
handshake_bytes = st.one_of(st.binary(max_size=200), _options_then_junk, _options_then_junk,
                            _options_then_junk)


def _request(magic: int, flags: int, cmd: int, cookie: int, offset: int, length: int,
             partial: int) -> bytes:
    """A request header; a WRITE gets its payload if short, else ``partial`` bytes."""
    header = request_header(cmd, offset, length, cookie, flags, magic)
    if cmd != CMD_WRITE:
        return header
    return header + b"\x77" * (length if length <= 4096 else partial)


request_bytes = st.builds(
    _request,
    magic=st.sampled_from([REQUEST_MAGIC] * 20 + [SIMPLE_REPLY_MAGIC, IHAVEOPT >> 32, 0]),
    flags=st.sampled_from([0, FLAG_FUA, FLAG_DF, FLAG_REQ_ONE, 0x8000, 0x20]) | st.integers(
        0, 0xFFFF),
    cmd=st.integers(0, 9) | st.integers(0, 9) | st.integers(0, 0xFFFF),
    cookie=u64,
    offset=st.sampled_from([0, 1, SIZE - 1, SIZE, SIZE + 1, 2**63, 2**64 - 1])
    | st.integers(0, SIZE),
    length=st.sampled_from([0, 1, 4096, 65536, 2**32 - 1, MAX_BLOCK + 1])
    | st.integers(0, 70000),
    partial=st.sampled_from([0, 5, 4096]),
)

transmission_bytes = st.builds(
    lambda reqs, tail: b"".join(reqs) + tail,
    st.lists(request_bytes, max_size=8),
    st.binary(max_size=40),
)


def check_chunk_framing(data: bytes) -> None:
    """Everything a structured connection sends is whole, well-formed chunks."""
    pos = 0
    while pos < len(data):
        assert len(data) - pos >= 20, f"truncated chunk header at {pos}"
        magic, flags, rtype, _cookie, plen = struct.unpack_from(">IHHQI", data, pos)
        assert magic == STRUCTURED_REPLY_MAGIC, f"bad chunk magic {magic:#x} at {pos}"
        assert flags & ~REPLY_FLAG_DONE == 0
        assert rtype in (TYPE_NONE, TYPE_OFFSET_DATA, TYPE_OFFSET_HOLE, TYPE_BLOCK_STATUS,
                         TYPE_ERROR)
        pos += 20 + plen
    assert pos == len(data), "truncated chunk payload"


def test_fuzz_after_greeting() -> None:
    with fuzz_server() as server:

        @FUZZ_SETTINGS
        @given(data=handshake_bytes)
        def run(data: bytes) -> None:
            with Client(server) as client:
                client.greet()
                received = send_and_drain(client, data)
            event(f"server answered: {bool(received)}")
            check_served(server)

        run()


def test_fuzz_in_transmission() -> None:
    with fuzz_server() as server:

        @FUZZ_SETTINGS
        @given(
            data=transmission_bytes,
            export=st.sampled_from(["live", "snap"]),
            mode=st.sampled_from(["simple", "structured", "structured+context"]),
        )
        def run(data: bytes, export: str, mode: str) -> None:
            with Client(server) as client:
                client.start().go(
                    export,
                    structured=mode != "simple",
                    contexts=["base:allocation"] if mode == "structured+context" else [],
                )
                received = send_and_drain(client, data)
                event(f"server answered: {bool(received)}")
                if mode != "simple":
                    check_chunk_framing(received)
            assert server.alive()
            with Client(server) as client:
                client.start().go("snap")
                client.check_read()
                client.disconnect()
            assert_clean_log(server)

        run()
