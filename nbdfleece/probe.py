"""``nbdfleece probe``: does an NBD server answer a real handshake? (container health checks).

A TCP connect alone says nothing about a server whose event loop is stuck, so the probe goes
through the fixed-newstyle greeting and one option round trip (``NBD_OPT_LIST``, or
``NBD_OPT_INFO`` for one export), then leaves politely with ``NBD_OPT_ABORT``. It is blocking
and has one overall deadline: it runs once and exits, so it needs no event loop. Byte layouts
come from :mod:`nbdfleece.wire`, numbers from :mod:`nbdfleece.constants`.
"""

from __future__ import annotations

import contextlib
import socket
import time
from dataclasses import dataclass, field

from nbdfleece.constants import (
    IHAVEOPT,
    MAX_STRING,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REP_ERROR_BIT,
    ClientFlag,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
)
from nbdfleece.errors import OptionError
from nbdfleece.server import parse_host_port
from nbdfleece.wire import (
    CLIENT_FLAGS,
    GREETING,
    INFO_EXPORT,
    OPTION_REPLY_HEADER,
    OPTION_REQUEST_HEADER,
    go_request,
    parse_option_payload,
    rep_server,
)

DEFAULT_ADDRESS = "127.0.0.1:10809"
MAX_REPLY_PAYLOAD = 3 * MAX_STRING + 64
"""Longest option reply the probe reads (a REP_SERVER with a long name and description)."""
MAX_REPLIES = 100_000
"""A LIST that sends more replies than this is treated as a broken server, not read forever."""


class ProbeError(Exception):
    """The address did not answer as an NBD server (the message says where it failed)."""


@dataclass
class ProbeResult:
    exports: list[str] = field(default_factory=list)
    """Names from NBD_OPT_LIST (empty if the server refused to list, see ``refusal``)."""
    refusal: str | None = None
    """The error reply's name when the server answered the option with an error (TLS, policy)."""
    size: int | None = None
    """The export's size when one export was asked for with NBD_OPT_INFO."""


class _Conn:
    """A socket with one deadline for every read and write."""

    def __init__(self, address: str, deadline: float) -> None:
        self.deadline = deadline
        try:
            if address.startswith("unix:"):
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.settimeout(self._left())
                self.sock.connect(address[5:])
            else:
                self.sock = socket.create_connection(parse_host_port(address), self._left())
        except ValueError as exc:
            raise ProbeError(str(exc)) from None

    def _left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        return left

    def send(self, data: bytes) -> None:
        self.sock.settimeout(self._left())
        self.sock.sendall(data)

    def recv_exact(self, n: int, what: str) -> bytes:
        chunks = bytearray()
        while len(chunks) < n:
            self.sock.settimeout(self._left())
            chunk = self.sock.recv(n - len(chunks))
            if not chunk:
                raise ProbeError(f"connection closed while reading the {what}")
            chunks += chunk
        return bytes(chunks)

    def option(self, option: Opt, payload: bytes = b"") -> None:
        self.send(OPTION_REQUEST_HEADER.pack(IHAVEOPT, option, len(payload)) + payload)

    def reply(self, option: Opt) -> tuple[int, bytes]:
        magic, echoed, rtype, length = OPTION_REPLY_HEADER.unpack(
            self.recv_exact(OPTION_REPLY_HEADER.size, "option reply header")
        )
        if magic != OPTION_REPLY_MAGIC:
            raise ProbeError(f"bad option reply magic {magic:#x}")
        if echoed != option:
            raise ProbeError(f"reply for option {echoed}, expected {option.name}")
        if length > MAX_REPLY_PAYLOAD:
            raise ProbeError(f"option reply of {length} bytes is too long")
        return rtype, self.recv_exact(length, "option reply")

    def close(self) -> None:
        self.sock.close()


def _rep_name(rtype: int) -> str:
    try:
        return Rep(rtype).name
    except ValueError:
        return f"{rtype:#x}"


def probe(address: str = DEFAULT_ADDRESS, export: str | None = None,
          timeout: float = 5.0) -> ProbeResult:
    """Handshake with the server at ``address`` (``HOST:PORT``, ``[V6]:PORT``, ``unix:PATH``).

    Raises :class:`ProbeError` or ``OSError`` (``TimeoutError`` included) when it is not a
    working NBD server, or when ``export`` is given and the server does not offer it.
    """
    conn = _Conn(address, time.monotonic() + timeout)
    try:
        nbdmagic, ihaveopt, hflags = GREETING.unpack(conn.recv_exact(GREETING.size, "greeting"))
        if nbdmagic != NBDMAGIC or ihaveopt != IHAVEOPT:
            raise ProbeError("not a fixed-newstyle NBD greeting")
        if not hflags & HandshakeFlag.FIXED_NEWSTYLE:
            raise ProbeError("the server does not offer fixed newstyle negotiation")
        cflags = ClientFlag.C_FIXED_NEWSTYLE | (ClientFlag.C_NO_ZEROES & hflags)
        conn.send(CLIENT_FLAGS.pack(cflags))
        result = ProbeResult()
        if export is None:
            _list(conn, result)
        else:
            _info(conn, export, result)
        # The server has answered; ABORT and its ACK are a courtesy (it may close at once).
        with contextlib.suppress(OSError, ProbeError):
            conn.option(Opt.ABORT)
            conn.reply(Opt.ABORT)
        return result
    finally:
        conn.close()


def _list(conn: _Conn, result: ProbeResult) -> None:
    conn.option(Opt.LIST)
    for _ in range(MAX_REPLIES):
        rtype, payload = conn.reply(Opt.LIST)
        if rtype == Rep.ACK:
            return
        if rtype == Rep.SERVER:
            try:
                name = parse_option_payload(rep_server, payload).name
            except OptionError:
                raise ProbeError("malformed NBD_REP_SERVER reply") from None
            result.exports.append(name.decode(errors="replace"))
        elif rtype & REP_ERROR_BIT:
            # An NBD server that will not list (TLS required, policy) is still alive and answering.
            result.refusal = _rep_name(rtype)
            return
        else:
            raise ProbeError(f"unexpected reply {_rep_name(rtype)} to NBD_OPT_LIST")
    raise ProbeError(f"more than {MAX_REPLIES} replies to NBD_OPT_LIST")


def _info(conn: _Conn, export: str, result: ProbeResult) -> None:
    conn.option(Opt.INFO, go_request.build({"name": export.encode(),
                                            "info_requests": [Info.BLOCK_SIZE]}))
    for _ in range(MAX_REPLIES):
        rtype, payload = conn.reply(Opt.INFO)
        if rtype == Rep.ACK:
            if result.size is None:
                raise ProbeError("NBD_OPT_INFO ended without NBD_INFO_EXPORT")
            return
        if rtype == Rep.INFO:
            if payload[:2] == Info.EXPORT.to_bytes(2, "big") and len(payload) == INFO_EXPORT.size:
                result.size = INFO_EXPORT.unpack(payload)[1]
        elif rtype & REP_ERROR_BIT:
            message = payload.decode(errors="replace")
            raise ProbeError(f"export {export!r}: {_rep_name(rtype)}" + (f" ({message})" if message else ""))
        else:
            raise ProbeError(f"unexpected reply {_rep_name(rtype)} to NBD_OPT_INFO")
    raise ProbeError(f"more than {MAX_REPLIES} replies to NBD_OPT_INFO")


def describe(address: str, result: ProbeResult, export: str | None) -> str:
    """One line for the health check's log."""
    if export is not None:
        return f"{address}: NBD server up, export '{export}' ({result.size} bytes)"
    if result.refusal is not None:
        return f"{address}: NBD server up (NBD_OPT_LIST refused: {result.refusal})"
    names = ", ".join(repr(n) for n in result.exports) or "none"
    return f"{address}: NBD server up, exports: {names}"
