"""Sans-I/O client side of NBD: the handshake and the transmission phase.

Theory of operation
-------------------
Like the server core (``handshake.py``, ``transmission.py``), nothing here
touches a socket.  The I/O layer (``client.py``) moves bytes; the classes
below decide what they mean.

:class:`ClientHandshake` is fed with ``receive_data``, drained with
``data_to_send`` and polled with ``next_event``.  It negotiates in the order
libnbd and QEMU use::

    greeting ─> client flags ─> [STARTTLS ─> StartTLS event ─> tls_established()]
      ├─ list mode:   LIST ─> ExportList event ─> ABORT ─> Closed event
      ├─ fixed:       STRUCTURED_REPLY ─> [SET_META_CONTEXT] ─> GO ─> Negotiated
      │                                          GO answered ERR_UNSUP ─┐
      └─ not fixed:   EXPORT_NAME ─────────────────────────────────────┴─> Negotiated

A refusal the session cannot get past raises :class:`NegotiationError` with a
sentence saying why (unknown export, TLS required, ...); ``NBD_OPT_ABORT`` is
then left in ``data_to_send`` so the I/O layer can leave politely.  A server
that breaks the protocol raises :class:`~nbdfleece.errors.ProtocolError`.

:class:`ClientTransmission` builds request headers (payloads are sent by the
I/O layer from the caller's buffer, never concatenated) and decodes replies.
Decoding is *pull-based* so that READ data lands in the caller's buffer
without a copy: ``want()`` returns the buffer the next incoming bytes belong
in (a header field, or a slice of the reader's buffer for OFFSET_DATA and
simple-reply data) and ``advance(n)`` says that ``n`` bytes were written at
its start.  ``receive_data`` copies from any buffer through the same path
(TLS, tests).  Completed requests come out of ``next_event`` as
:class:`Reply` events, in the order their last chunk arrived::

    header (16) ─┬─ simple ──> [READ data into the caller's buffer] ─> Reply
                 └─ +4: chunk ─┬─ NONE ───────────────────────────────┐
                               ├─ OFFSET_DATA: +8 offset, data ───────┤
                               ├─ OFFSET_HOLE: +12, zero the range ───┤ DONE? ─> Reply
                               ├─ BLOCK_STATUS / ERROR*: payload ─────┤   else next header
                               └─ unknown error type: as ERROR ───────┘

Every violation (bad magic, unknown cookie, a chunk outside its request, an
unknown non-error chunk type, ...) is a sticky ``ProtocolError``: the
connection cannot be resynchronised.
"""

from __future__ import annotations

import enum
import os
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from nbdfleece import wire
from nbdfleece.constants import (
    EXPORT_NAME_PADDING,
    IHAVEOPT,
    MAX_BLOCK_SIZE,
    MAX_EXTENTS,
    MAX_STRING,
    MIN_BLOCK_SIZE,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    PREFERRED_BLOCK_SIZE,
    REP_ERROR_BIT,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ClientFlag,
    Cmd,
    Errno,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    ReplyFlag,
    ReplyType,
    TransmissionFlag,
)
from nbdfleece.errors import NbdfleeceError, ProtocolError

OLDSTYLE_MAGIC = 0x00420281861253
"""What an oldstyle server sends after NBDMAGIC (not supported)."""
MAX_OPTION_REPLY = 1 << 20
"""Longest option reply payload accepted (the longest legal one is ~8 KiB)."""
MAX_STATUS_PAYLOAD = 4 + 8 * 2 * MAX_EXTENTS
"""Longest BLOCK_STATUS chunk accepted: twice what a server SHOULD send."""
MAX_ERROR_PAYLOAD = 6 + 0xFFFF + 8
"""Longest error chunk: its message length is a u16."""
DEFAULT_INFO_REQUESTS = (Info.NAME, Info.BLOCK_SIZE)
ERROR_TYPE_BIT = 1 << 15


class NbdError(NbdfleeceError):
    """The server answered a request with an error; the connection stays usable.

    ``errno`` is the NBD error (Linux numbering; values outside the NBD set
    read as EINVAL, as the spec asks of clients), ``offset`` is set for
    ``NBD_REPLY_TYPE_ERROR_OFFSET``.
    """

    def __init__(self, errno: int, message: str, offset: int | None = None) -> None:
        super().__init__(errno, message, offset)
        self.errno = errno
        self.message = message
        self.offset = offset

    def __str__(self) -> str:
        where = f" at offset {self.offset}" if self.offset is not None else ""
        return f"[{_errno_name(self.errno)}] {self.message}{where}"


class NegotiationError(NbdfleeceError):
    """The handshake cannot succeed; the message says why."""


def _errno_name(value: int) -> str:
    try:
        return Errno(value).name
    except ValueError:
        return str(value)


def _nbd_errno(value: int) -> int:
    """Unknown error values are EINVAL (spec: clients treat them so)."""
    return value if value in Errno._value2member_map_ else int(Errno.EINVAL)


def _rep_name(rep: int) -> str:
    try:
        return f"NBD_REP_{Rep(rep).name}"
    except ValueError:
        return f"reply type {rep:#x}"


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


# ==========================================================================
# Handshake
# ==========================================================================


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()
"""``next_event`` result: feed more bytes before calling again."""


@dataclass(frozen=True, slots=True)
class ExportDetails:
    """What negotiation learnt about the export."""

    name: str
    size: int
    flags: TransmissionFlag
    structured: bool
    contexts: dict[str, int] = field(default_factory=dict)
    """Selected meta contexts, name -> id."""
    block_size: tuple[int, int, int] = (MIN_BLOCK_SIZE, PREFERRED_BLOCK_SIZE, MAX_BLOCK_SIZE)
    description: str = ""


@dataclass(frozen=True, slots=True)
class StartTLS:
    """The server accepted STARTTLS: run the TLS handshake, then ``tls_established()``."""


@dataclass(frozen=True, slots=True)
class Negotiated:
    """Transmission starts."""

    export: ExportDetails


@dataclass(frozen=True, slots=True)
class ExportList:
    """The answer to NBD_OPT_LIST: (name, description) pairs; ABORT is queued."""

    exports: list[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class Closed:
    """The server acknowledged NBD_OPT_ABORT."""


HandshakeEvent = StartTLS | Negotiated | ExportList | Closed


class Phase(enum.Enum):
    GREETING = "greeting"
    STARTTLS = "starttls"
    TLS_WAIT = "tls-wait"
    LIST = "list"
    ABORT = "abort"
    STRUCTURED = "structured-reply"
    META = "set-meta-context"
    GO = "go"
    EXPORT_NAME = "export-name"
    DONE = "done"
    ERROR = "error"


class ClientHandshake:
    """One connection's negotiation as a client; see the module docstring.

    Args:
        export_name: the export to open ("" is the server's default).
        structured: ask for structured replies (needed for block status and holes).
        meta_contexts: contexts to select with NBD_OPT_SET_META_CONTEXT.
        tls: start with NBD_OPT_STARTTLS (the I/O layer then wraps the stream).
        list_exports: only list the exports (NBD_OPT_LIST), then abort.
        info_requests: NBD_INFO_* items asked for in NBD_OPT_GO.
    """

    def __init__(
        self,
        export_name: str = "",
        *,
        structured: bool = True,
        meta_contexts: Sequence[str] = (),
        tls: bool = False,
        list_exports: bool = False,
        info_requests: Sequence[int] = DEFAULT_INFO_REQUESTS,
    ) -> None:
        if len(export_name.encode()) > MAX_STRING:
            raise ValueError(f"export name longer than {MAX_STRING} bytes")
        for context in meta_contexts:
            if len(context.encode()) > MAX_STRING:
                raise ValueError(f"meta context name longer than {MAX_STRING} bytes")
        self.export_name = export_name
        self._want_structured = structured
        self._want_contexts = list(dict.fromkeys(meta_contexts))
        self._want_tls = tls
        self._list = list_exports
        self._info_requests = list(dict.fromkeys(int(i) for i in info_requests))
        self._in = bytearray()
        self._out = bytearray()
        self.phase = Phase.GREETING
        self.fixed_newstyle = False
        self.no_zeroes = False
        self.tls_done = False
        self.structured = False
        self._asked_structured = False
        self._asked_contexts = False
        self.contexts: dict[str, int] = {}
        self._listing: list[tuple[str, str]] = []
        self._info: dict[str, object] = {}

    # -- I/O interface ----------------------------------------------------
    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self.phase in (Phase.DONE, Phase.ERROR):
            raise RuntimeError(f"handshake is over ({self.phase.value})")
        self._in += data

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def trailing_data(self) -> bytes:
        """Bytes received after the end of negotiation (a conforming server sends none)."""
        return bytes(self._in)

    def tls_established(self) -> None:
        """The TLS handshake succeeded: negotiate again, from scratch, inside TLS."""
        if self.phase is not Phase.TLS_WAIT:
            raise RuntimeError("tls_established() without a StartTLS event")
        self.tls_done = True
        self._next_option()

    def eof_message(self) -> str:
        """What an EOF from the server means in the current phase."""
        if self.phase is Phase.GREETING:
            return "the server closed the connection before its greeting (not an NBD server, or busy)"
        if self.phase is Phase.EXPORT_NAME:
            return (f"the server closed the connection: export '{self.export_name}' does not exist "
                    "or is not available (NBD_OPT_EXPORT_NAME cannot report errors)")
        return f"the server closed the connection during negotiation ({self.phase.value})"

    def next_event(self) -> HandshakeEvent | _NeedData:
        if self.phase is Phase.ERROR:
            raise RuntimeError("handshake failed earlier")
        if self.phase is Phase.DONE:
            raise RuntimeError("handshake is over")
        if self.phase is Phase.TLS_WAIT:
            raise RuntimeError("run the TLS handshake and call tls_established() first")
        try:
            while True:
                if self.phase is Phase.GREETING and not self._greeting():
                    return NEED_DATA
                if self.phase is Phase.EXPORT_NAME:
                    return self._export_name_reply()
                reply = self._option_reply()
                if reply is None:
                    return NEED_DATA
                event = self._dispatch(*reply)
                if event is not None:
                    return event
        except (NegotiationError, ProtocolError):
            self.phase = Phase.ERROR
            raise

    # -- greeting -----------------------------------------------------------
    def _greeting(self) -> bool:
        if len(self._in) >= 8 and int.from_bytes(self._in[:8], "big") != NBDMAGIC:
            raise ProtocolError("not an NBD server (bad greeting magic)")
        if len(self._in) >= 16:
            second = int.from_bytes(self._in[8:16], "big")
            if second == OLDSTYLE_MAGIC:
                raise NegotiationError("the server uses oldstyle negotiation, which is not supported")
            if second != IHAVEOPT:
                raise ProtocolError(f"not an NBD server (magic {second:#018x} after NBDMAGIC)")
        if len(self._in) < wire.GREETING.size:
            return False
        _, _, flags = wire.GREETING.unpack_from(self._in)
        del self._in[: wire.GREETING.size]
        self.fixed_newstyle = bool(flags & HandshakeFlag.FIXED_NEWSTYLE)
        self.no_zeroes = bool(flags & HandshakeFlag.NO_ZEROES)
        client = 0
        if self.fixed_newstyle:
            client |= ClientFlag.C_FIXED_NEWSTYLE
        if self.no_zeroes:
            client |= ClientFlag.C_NO_ZEROES
        self._out += wire.CLIENT_FLAGS.pack(client)
        self._next_option()
        return True

    # -- what to ask next -----------------------------------------------------
    def _send_option(self, option: int, payload: bytes = b"") -> None:
        self._out += wire.OPTION_REQUEST_HEADER.pack(IHAVEOPT, option, len(payload))
        self._out += payload

    def _next_option(self) -> None:
        if self._want_tls and not self.tls_done:
            if not self.fixed_newstyle:
                raise NegotiationError("TLS was requested but the server does not support fixed "
                                       "newstyle negotiation, so it cannot do STARTTLS")
            self._send_option(Opt.STARTTLS)
            self.phase = Phase.STARTTLS
        elif not self.fixed_newstyle:
            if self._list:
                raise NegotiationError("the server cannot list exports (no fixed newstyle negotiation)")
            self._send_option(Opt.EXPORT_NAME, self.export_name.encode())
            self.phase = Phase.EXPORT_NAME
        elif self._list:
            self._send_option(Opt.LIST)
            self.phase = Phase.LIST
        elif self._want_structured and not self._asked_structured:
            self._asked_structured = True
            self._send_option(Opt.STRUCTURED_REPLY)
            self.phase = Phase.STRUCTURED
        elif self._want_contexts and self.structured and not self._asked_contexts:
            self._asked_contexts = True
            self._send_option(Opt.SET_META_CONTEXT, wire.meta_context_request.build({
                "name": self.export_name.encode(),
                "queries": [c.encode() for c in self._want_contexts],
            }))
            self.phase = Phase.META
        else:
            self._send_option(Opt.GO, wire.go_request.build({
                "name": self.export_name.encode(), "info_requests": self._info_requests,
            }))
            self.phase = Phase.GO

    def _abort_and_fail(self, message: str) -> NegotiationError:
        """Queue a polite NBD_OPT_ABORT; the caller raises what this returns."""
        self._send_option(Opt.ABORT)
        return NegotiationError(message)

    # -- option replies -------------------------------------------------------
    def _option_reply(self) -> tuple[int, int, bytes] | None:
        size = wire.OPTION_REPLY_HEADER.size
        if len(self._in) >= 8 and int.from_bytes(self._in[:8], "big") != OPTION_REPLY_MAGIC:
            raise ProtocolError("bad option reply magic from the server")
        if len(self._in) < size:
            return None
        _, option, rep, length = wire.OPTION_REPLY_HEADER.unpack_from(self._in)
        if length > MAX_OPTION_REPLY:
            raise ProtocolError(f"option reply of {length} bytes is too long")
        if len(self._in) < size + length:
            return None
        payload = bytes(self._in[size : size + length])
        del self._in[: size + length]
        return option, rep, payload

    def _dispatch(self, option: int, rep: int, payload: bytes) -> HandshakeEvent | None:
        expected = {
            Phase.STARTTLS: Opt.STARTTLS, Phase.LIST: Opt.LIST, Phase.ABORT: Opt.ABORT,
            Phase.STRUCTURED: Opt.STRUCTURED_REPLY, Phase.META: Opt.SET_META_CONTEXT, Phase.GO: Opt.GO,
        }[self.phase]
        if option != expected:
            raise ProtocolError(f"reply to option {option} while waiting for {expected.name}")
        if self.phase is Phase.ABORT:
            self.phase = Phase.DONE
            return Closed()
        if rep & REP_ERROR_BIT:
            return self._option_error(rep, _text(payload))
        handler = {
            Phase.STARTTLS: self._starttls_reply,
            Phase.LIST: self._list_reply,
            Phase.STRUCTURED: self._structured_reply,
            Phase.META: self._meta_reply,
            Phase.GO: self._go_reply,
        }[self.phase]
        return handler(rep, payload)

    def _expect_ack(self, rep: int, what: str) -> None:
        if rep != Rep.ACK:
            raise ProtocolError(f"unexpected {_rep_name(rep)} in the reply to {what}")

    def _option_error(self, rep: int, message: str) -> HandshakeEvent | None:
        detail = f": {message}" if message else ""
        name = self.export_name
        if rep == Rep.ERR_TLS_REQD:
            raise self._abort_and_fail(
                f"the server requires TLS (use an nbds:// address with tls=){detail}")
        if rep == Rep.ERR_SHUTDOWN:
            raise self._abort_and_fail(f"the server is shutting down{detail}")
        if self.phase is Phase.STARTTLS:
            raise self._abort_and_fail(f"the server does not do TLS ({_rep_name(rep)}){detail}")
        if self.phase is Phase.LIST:
            raise self._abort_and_fail(f"the server refused to list its exports ({_rep_name(rep)}){detail}")
        if self.phase is Phase.STRUCTURED:
            # Simple replies only: still usable (no block status, no holes).
            self._next_option()
            return None
        if self.phase is Phase.META:
            self.contexts = {}
            self._next_option()
            return None
        # GO
        if rep == Rep.ERR_UNSUP:
            # A fixed-newstyle server without NBD_OPT_GO: the spec's fallback.
            self._send_option(Opt.EXPORT_NAME, name.encode())
            self.phase = Phase.EXPORT_NAME
            return None
        if rep == Rep.ERR_UNKNOWN:
            raise self._abort_and_fail(f"the server has no export '{name}'{detail}")
        if rep == Rep.ERR_POLICY:
            raise self._abort_and_fail(f"the server refused export '{name}' by policy{detail}")
        if rep == Rep.ERR_BLOCK_SIZE_REQD:
            raise self._abort_and_fail(
                f"export '{name}' requires block size negotiation (NBD_INFO_BLOCK_SIZE){detail}")
        raise self._abort_and_fail(f"the server refused export '{name}' ({_rep_name(rep)}){detail}")

    def _starttls_reply(self, rep: int, payload: bytes) -> HandshakeEvent:
        self._expect_ack(rep, "NBD_OPT_STARTTLS")
        if self._in:
            raise ProtocolError("the server sent data after accepting STARTTLS")
        self.phase = Phase.TLS_WAIT
        # Spec: nothing negotiated before TLS survives it.
        self.structured = False
        self.contexts = {}
        self._asked_structured = self._asked_contexts = False
        return StartTLS()

    def _list_reply(self, rep: int, payload: bytes) -> HandshakeEvent | None:
        if rep == Rep.SERVER:
            parsed = wire.parse_reply_payload(wire.rep_server, payload, "NBD_REP_SERVER")
            self._listing.append((_text(parsed.name), _text(parsed.description)))
            return None
        self._expect_ack(rep, "NBD_OPT_LIST")
        self._send_option(Opt.ABORT)
        self.phase = Phase.ABORT
        return ExportList(list(self._listing))

    def _structured_reply(self, rep: int, payload: bytes) -> None:
        self._expect_ack(rep, "NBD_OPT_STRUCTURED_REPLY")
        self.structured = True
        self._next_option()

    def _meta_reply(self, rep: int, payload: bytes) -> None:
        if rep == Rep.META_CONTEXT:
            parsed = wire.parse_reply_payload(wire.rep_meta_context, payload, "NBD_REP_META_CONTEXT")
            name = _text(parsed.name)
            if name not in self._want_contexts:
                raise ProtocolError(f"the server selected meta context '{name}', which was not asked for")
            self.contexts[name] = int(parsed.context_id)
            return
        self._expect_ack(rep, "NBD_OPT_SET_META_CONTEXT")
        self._next_option()

    def _go_reply(self, rep: int, payload: bytes) -> HandshakeEvent | None:
        if rep == Rep.INFO:
            self._info_item(payload)
            return None
        self._expect_ack(rep, "NBD_OPT_GO")
        if "size" not in self._info:
            raise ProtocolError("the server ended NBD_OPT_GO without NBD_INFO_EXPORT")
        return self._finish(
            size=int(self._info["size"]),  # type: ignore[call-overload]
            flags=int(self._info["flags"]),  # type: ignore[call-overload]
        )

    def _info_item(self, payload: bytes) -> None:
        if len(payload) < wire.INFO_TYPE.size:
            raise ProtocolError("NBD_REP_INFO without an info type")
        (kind,) = wire.INFO_TYPE.unpack_from(payload)
        if kind == Info.EXPORT:
            if len(payload) != wire.INFO_EXPORT.size:
                raise ProtocolError(f"NBD_INFO_EXPORT of {len(payload)} bytes")
            _, self._info["size"], self._info["flags"] = wire.INFO_EXPORT.unpack(payload)
        elif kind == Info.NAME:
            parsed = wire.parse_reply_payload(wire.info_name, payload, "NBD_INFO_NAME")
            self._info["name"] = _text(parsed.name)
        elif kind == Info.DESCRIPTION:
            parsed = wire.parse_reply_payload(wire.info_description, payload, "NBD_INFO_DESCRIPTION")
            self._info["description"] = _text(parsed.description)
        elif kind == Info.BLOCK_SIZE:
            if len(payload) != wire.INFO_BLOCK_SIZE.size:
                raise ProtocolError(f"NBD_INFO_BLOCK_SIZE of {len(payload)} bytes")
            _, minimum, preferred, maximum = wire.INFO_BLOCK_SIZE.unpack(payload)
            if not (minimum >= 1 and minimum & (minimum - 1) == 0 and preferred >= minimum
                    and maximum >= minimum):
                raise ProtocolError(f"invalid block sizes {minimum}/{preferred}/{maximum}")
            self._info["block_size"] = (minimum, preferred, maximum)
        # Unknown info types are ignored (spec: MUST).

    def _export_name_reply(self) -> HandshakeEvent | _NeedData:
        need = wire.EXPORT_NAME_REPLY.size + (0 if self.no_zeroes else EXPORT_NAME_PADDING)
        if len(self._in) < need:
            return NEED_DATA
        size, flags = wire.EXPORT_NAME_REPLY.unpack_from(self._in)
        del self._in[:need]
        return self._finish(size=size, flags=flags)

    def _finish(self, *, size: int, flags: int) -> Negotiated:
        if not flags & TransmissionFlag.HAS_FLAGS:
            flags = 0  # spec: the other bits mean nothing without HAS_FLAGS
        self.phase = Phase.DONE
        block_size = self._info.get("block_size", (MIN_BLOCK_SIZE, PREFERRED_BLOCK_SIZE, MAX_BLOCK_SIZE))
        details = ExportDetails(
            name=str(self._info.get("name", self.export_name)),
            size=size,
            flags=TransmissionFlag(flags),
            structured=self.structured,
            contexts=dict(self.contexts),
            block_size=block_size,  # type: ignore[arg-type]
            description=str(self._info.get("description", "")),
        )
        return Negotiated(details)


# ==========================================================================
# Transmission
# ==========================================================================


@dataclass(frozen=True, slots=True)
class Reply:
    """A request finished: ``error`` is None on success."""

    cookie: int
    error: NbdError | None
    extents: dict[str, list[tuple[int, int]]] | None = None
    """BLOCK_STATUS: per context name, (length, flags) from the request offset."""


@dataclass(eq=False, slots=True)
class _Pending:
    cmd: int
    offset: int
    length: int
    buf: memoryview | None
    started: bool = False
    """A structured chunk of this reply has arrived (a simple reply is then illegal)."""
    seen: int = 0
    error: NbdError | None = None
    extents: dict[str, list[tuple[int, int]]] = field(default_factory=dict)


class _Step(enum.Enum):
    HEADER = "header"
    CHUNK_HEADER = "chunk-header"
    SIMPLE_DATA = "simple-data"
    DATA_OFFSET = "data-offset"
    DATA = "data"
    HOLE = "hole"
    PAYLOAD = "payload"


_SIMPLE_MAGIC_BYTES = SIMPLE_REPLY_MAGIC.to_bytes(4, "big")
_STRUCTURED_MAGIC_BYTES = STRUCTURED_REPLY_MAGIC.to_bytes(4, "big")
_HEADER = wire.STRUCTURED_REPLY_HEADER.size  # 20; a simple reply is its first 16 bytes


class ClientTransmission:
    """Requests out, replies in, for one connection; see the module docstring."""

    def __init__(self, export: ExportDetails) -> None:
        self.export = export
        self.structured = export.structured
        self._context_names = {cid: name for name, cid in export.contexts.items()}
        self._pending: dict[int, _Pending] = {}
        self._next_cookie = 1
        self._events: deque[Reply] = deque()
        self._hdr = bytearray(32)
        self._hdr_view = memoryview(self._hdr)
        self._step = _Step.HEADER
        self._want: memoryview = self._hdr_view[: wire.SIMPLE_REPLY.size]
        self._filled = 0
        self._current: _Pending | None = None
        self._cookie = 0
        self._chunk_flags = 0
        self._chunk_type = 0
        self._chunk_length = 0
        self._data_start = 0
        self._payload = bytearray()
        self.closed = False
        """NBD_CMD_DISC was built: no more requests."""
        self.failure: ProtocolError | None = None

    # -- requests -----------------------------------------------------------
    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def request(
        self,
        cmd: int,
        offset: int = 0,
        length: int = 0,
        flags: int = 0,
        *,
        buf: memoryview | None = None,
        cookie: int | None = None,
    ) -> tuple[int, bytes]:
        """Register a request and return ``(cookie, header)``.

        A READ needs ``buf`` (``length`` writable bytes) for its data; a WRITE's
        payload follows the header on the wire and is the caller's to send.
        NBD_CMD_DISC gets no reply and ends the connection's requests.
        """
        if self.closed:
            raise RuntimeError("NBD_CMD_DISC was sent: no more requests")
        if self.failure is not None:
            raise self.failure
        if not (0 <= offset < 1 << 64 and 0 <= length < 1 << 32 and 0 <= flags < 1 << 16):
            raise ValueError(f"request fields out of range: offset {offset} length {length}")
        if cmd == Cmd.READ and (buf is None or len(buf) != length):
            raise ValueError("a READ needs a buffer of exactly `length` bytes")
        if cookie is None:
            cookie = self._next_cookie
            while cookie in self._pending or cookie == 0:
                cookie = (cookie + 1) & ((1 << 64) - 1)
            self._next_cookie = (cookie + 1) & ((1 << 64) - 1)
        elif cookie in self._pending:
            raise ValueError(f"cookie {cookie:#x} is already in flight")
        header = wire.REQUEST_HEADER.pack(REQUEST_MAGIC, flags, cmd, cookie, offset, length)
        if cmd == Cmd.DISC:
            self.closed = True
        else:
            self._pending[cookie] = _Pending(cmd, offset, length, buf if cmd == Cmd.READ else None)
        return cookie, header

    def abandon(self, cookie: int) -> None:
        """The caller of ``cookie`` left: its data, if any, goes to a scratch buffer.

        The reply is still decoded (the stream must stay in sync) and still
        produces a :class:`Reply` event.
        """
        pending = self._pending.get(cookie)
        if pending is None or pending.buf is None:
            return
        scratch = memoryview(bytearray(pending.length))
        if self._current is pending and self._step is _Step.DATA:
            # Redirect the rest of the transfer in progress.
            self._want = scratch[self._data_start : self._data_start + len(self._want)]
        elif self._current is pending and self._step is _Step.SIMPLE_DATA:
            self._want = scratch
        pending.buf = scratch

    # -- replies: I/O interface ---------------------------------------------
    def want(self) -> memoryview:
        """Where the next received bytes go (never empty); fill a prefix, then ``advance``."""
        if self.failure is not None:
            raise self.failure
        return self._want[self._filled :]

    def advance(self, n: int) -> None:
        """``n`` bytes were written at the start of ``want()``."""
        if self.failure is not None:
            raise self.failure
        remaining = len(self._want) - self._filled
        if not 0 < n <= remaining:
            raise ValueError(f"advance({n}) with {remaining} bytes wanted")
        self._filled += n
        if self._filled == len(self._want):
            self._filled = 0
            try:
                self._step_complete()
            except ProtocolError as exc:
                self.failure = exc
                raise

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` through ``want``/``advance`` (TLS streams, tests)."""
        view = memoryview(data).cast("B")
        while view:
            dest = self.want()
            n = min(len(dest), len(view))
            dest[:n] = view[:n]
            view = view[n:]
            self.advance(n)

    def next_event(self) -> Reply | _NeedData:
        if self._events:
            return self._events.popleft()
        if self.failure is not None:
            raise self.failure
        return NEED_DATA

    def pending_cookies(self) -> list[int]:
        return list(self._pending)

    def mid_reply(self) -> bool:
        """True while part of a reply has been received (EOF now is a truncated reply)."""
        return self._filled > 0 or self._step is not _Step.HEADER

    # -- reply decoding -----------------------------------------------------
    def _expect(self, step: _Step, view: memoryview) -> None:
        self._step = step
        self._want = view

    def _next_header(self) -> None:
        self._current = None
        self._expect(_Step.HEADER, self._hdr_view[: wire.SIMPLE_REPLY.size])

    def _step_complete(self) -> None:
        step = self._step
        if step is _Step.HEADER:
            self._header()
        elif step is _Step.CHUNK_HEADER:
            self._chunk_header()
        elif step is _Step.SIMPLE_DATA:
            assert self._current is not None
            self._finish(self._cookie, self._current)
        elif step is _Step.DATA_OFFSET:
            self._data_offset()
        elif step is _Step.DATA:
            assert self._current is not None
            self._current.seen += len(self._want)
            self._chunk_done()
        elif step is _Step.HOLE:
            self._hole()
        else:
            self._payload_done()

    def _lookup(self, cookie: int) -> _Pending:
        pending = self._pending.get(cookie)
        if pending is None:
            raise ProtocolError(f"reply for unknown cookie {cookie:#x}")
        return pending

    def _header(self) -> None:
        magic = bytes(self._hdr[:4])
        if magic == _SIMPLE_MAGIC_BYTES:
            _, error, cookie = wire.SIMPLE_REPLY.unpack_from(self._hdr)
            pending = self._lookup(cookie)
            if pending.started:
                raise ProtocolError(f"simple reply for cookie {cookie:#x} in the middle of its chunks")
            self._cookie, self._current = cookie, pending
            if error:
                pending.error = NbdError(_nbd_errno(error), os.strerror(error))
                self._finish(cookie, pending)
            elif pending.cmd == Cmd.READ and pending.length:
                assert pending.buf is not None
                pending.seen = pending.length
                self._expect(_Step.SIMPLE_DATA, pending.buf)
            else:
                pending.seen = pending.length
                self._finish(cookie, pending)
        elif magic == _STRUCTURED_MAGIC_BYTES:
            if not self.structured:
                raise ProtocolError("structured reply chunk, but structured replies were not negotiated")
            self._expect(_Step.CHUNK_HEADER, self._hdr_view[wire.SIMPLE_REPLY.size : _HEADER])
        else:
            raise ProtocolError(f"bad reply magic {magic.hex()}")

    def _chunk_header(self) -> None:
        _, flags, kind, cookie, length = wire.STRUCTURED_REPLY_HEADER.unpack_from(self._hdr)
        pending = self._lookup(cookie)
        pending.started = True
        self._cookie, self._current = cookie, pending
        self._chunk_flags, self._chunk_type, self._chunk_length = flags, kind, length
        name = f"chunk type {kind} for cookie {cookie:#x}"
        if kind == ReplyType.NONE:
            if length:
                raise ProtocolError(f"NONE chunk with {length} payload bytes")
            if not flags & ReplyFlag.DONE:
                raise ProtocolError("NONE chunk without the DONE flag")
            self._chunk_done()
        elif kind == ReplyType.OFFSET_DATA:
            if pending.cmd != Cmd.READ:
                raise ProtocolError(f"OFFSET_DATA in the reply to command {pending.cmd}")
            if length <= wire.OFFSET_DATA_PREFIX.size:
                raise ProtocolError(f"OFFSET_DATA chunk of {length} bytes")
            self._expect(_Step.DATA_OFFSET, self._hdr_view[_HEADER : _HEADER + wire.OFFSET_DATA_PREFIX.size])
        elif kind == ReplyType.OFFSET_HOLE:
            if pending.cmd != Cmd.READ:
                raise ProtocolError(f"OFFSET_HOLE in the reply to command {pending.cmd}")
            if length != wire.OFFSET_HOLE.size:
                raise ProtocolError(f"OFFSET_HOLE chunk of {length} bytes")
            self._expect(_Step.HOLE, self._hdr_view[_HEADER : _HEADER + wire.OFFSET_HOLE.size])
        elif kind == ReplyType.BLOCK_STATUS:
            if pending.cmd != Cmd.BLOCK_STATUS:
                raise ProtocolError(f"BLOCK_STATUS chunk in the reply to command {pending.cmd}")
            if (length < wire.BLOCK_STATUS_PREFIX.size + wire.BLOCK_DESCRIPTOR.size
                    or (length - wire.BLOCK_STATUS_PREFIX.size) % wire.BLOCK_DESCRIPTOR.size
                    or length > MAX_STATUS_PAYLOAD):
                raise ProtocolError(f"BLOCK_STATUS chunk of {length} bytes")
            self._read_payload(length)
        elif kind & ERROR_TYPE_BIT:
            if not wire.ERROR_PREFIX.size <= length <= MAX_ERROR_PAYLOAD:
                raise ProtocolError(f"error {name} of {length} bytes")
            self._read_payload(length)
        else:
            raise ProtocolError(f"unknown {name}")

    def _read_payload(self, length: int) -> None:
        self._payload = bytearray(length)
        self._expect(_Step.PAYLOAD, memoryview(self._payload))

    def _data_offset(self) -> None:
        pending = self._current
        assert pending is not None and pending.buf is not None
        (offset,) = wire.OFFSET_DATA_PREFIX.unpack_from(self._hdr, _HEADER)
        count = self._chunk_length - wire.OFFSET_DATA_PREFIX.size
        start = offset - pending.offset
        if start < 0 or start + count > pending.length:
            raise ProtocolError(
                f"OFFSET_DATA {offset}+{count} outside the read {pending.offset}+{pending.length}")
        self._data_start = start
        self._expect(_Step.DATA, pending.buf[start : start + count])

    def _hole(self) -> None:
        pending = self._current
        assert pending is not None and pending.buf is not None
        offset, count = wire.OFFSET_HOLE.unpack_from(self._hdr, _HEADER)
        start = offset - pending.offset
        if count == 0 or start < 0 or start + count > pending.length:
            raise ProtocolError(
                f"OFFSET_HOLE {offset}+{count} outside the read {pending.offset}+{pending.length}")
        np.frombuffer(pending.buf, dtype=np.uint8)[start : start + count] = 0
        pending.seen += count
        self._chunk_done()

    def _payload_done(self) -> None:
        pending = self._current
        assert pending is not None
        payload = bytes(self._payload)
        self._payload = bytearray()
        if self._chunk_type == ReplyType.BLOCK_STATUS:
            (context_id,) = wire.BLOCK_STATUS_PREFIX.unpack_from(payload)
            name = self._context_names.get(context_id)
            if name is None:
                raise ProtocolError(f"BLOCK_STATUS for unknown context id {context_id}")
            if name in pending.extents:
                raise ProtocolError(f"two BLOCK_STATUS chunks for context '{name}'")
            extents = list(wire.BLOCK_DESCRIPTOR.iter_unpack(
                memoryview(payload)[wire.BLOCK_STATUS_PREFIX.size :]))
            if any(length == 0 for length, _ in extents):
                raise ProtocolError(f"zero-length extent for context '{name}'")
            pending.extents[name] = extents
        else:
            self._error_chunk(pending, payload)
        self._chunk_done()

    def _error_chunk(self, pending: _Pending, payload: bytes) -> None:
        error, message_length = wire.ERROR_PREFIX.unpack_from(payload)
        end = wire.ERROR_PREFIX.size + message_length
        if end > len(payload):
            raise ProtocolError("error chunk message runs past its payload")
        if error == 0:
            raise ProtocolError("error chunk with error 0")
        message = _text(payload[wire.ERROR_PREFIX.size : end]) or os.strerror(error)
        offset: int | None = None
        if self._chunk_type == ReplyType.ERROR_OFFSET:
            if len(payload) < end + 8:
                raise ProtocolError("ERROR_OFFSET chunk without its offset")
            parsed = wire.parse_reply_payload(wire.error_offset_payload, payload, "ERROR_OFFSET chunk")
            offset = int(parsed.offset)
            if not pending.offset <= offset < pending.offset + max(pending.length, 1):
                raise ProtocolError(f"ERROR_OFFSET {offset} outside its request")
        if pending.error is None:  # the first error is the one reported
            pending.error = NbdError(_nbd_errno(error), message, offset)

    def _chunk_done(self) -> None:
        if self._chunk_flags & ReplyFlag.DONE:
            assert self._current is not None
            self._finish(self._cookie, self._current)
        else:
            self._next_header()

    def _finish(self, cookie: int, pending: _Pending) -> None:
        del self._pending[cookie]
        error = pending.error
        extents: dict[str, list[tuple[int, int]]] | None = None
        if error is None and pending.cmd == Cmd.READ and pending.seen != pending.length:
            error = NbdError(Errno.EIO, f"the server's reply covered {pending.seen} of the "
                                        f"{pending.length} bytes read")
        if error is None and pending.cmd == Cmd.BLOCK_STATUS:
            missing = [n for n in self._context_names.values() if n not in pending.extents]
            if missing:
                error = NbdError(Errno.EIO, f"no extents for context(s) {', '.join(missing)}")
            extents = pending.extents
        self._events.append(Reply(cookie, error, extents))
        self._next_header()

    def fail(self, exc: ProtocolError) -> None:
        """Mark the connection broken (the I/O layer saw EOF or an error)."""
        if self.failure is None:
            self.failure = exc


__all__ = [
    "NEED_DATA",
    "ClientHandshake",
    "ClientTransmission",
    "Closed",
    "ExportDetails",
    "ExportList",
    "NbdError",
    "Negotiated",
    "NegotiationError",
    "Phase",
    "Reply",
    "StartTLS",
]
