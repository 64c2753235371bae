"""Sans-I/O server side of the NBD fixed-newstyle handshake.

Theory of operation
-------------------
The I/O layer feeds whatever bytes arrived to :meth:`ServerHandshake.receive_data`,
sends whatever :meth:`ServerHandshake.data_to_send` returns, and calls
:meth:`ServerHandshake.next_event` until it returns :data:`NEED_DATA`.  The
handshake never touches a socket, so it is tested by feeding bytes.

Phases (rule: every transition lives in ``next_event``, except the end of TLS)::

    CLIENT_FLAGS --4 bytes--> OPTIONS --EXPORT_NAME / GO ok--> DONE (Negotiated)
                               |  ^  \\--ABORT--> DONE (Closed, soft)
                               |  |   \\--MUST violated--> DONE (Closed, hard)
                      STARTTLS |  | tls_established()
                               v  |
                               TLS (StartTLS: the edge runs the TLS handshake)

``OPTIONS`` may also be *skipping* the payload of an oversized option, which
is discarded as it arrives (never buffered) and then answered TOO_BIG.

TLS (see ``protocol/nbd.md`` §12): with a :class:`~nbdfleece.tls.TlsPolicy`
in a TLS mode, a valid ``NBD_OPT_STARTTLS`` queues ``NBD_REP_ACK`` and
returns :class:`StartTLS`.  The edge sends the ACK, wraps the socket, runs the
TLS handshake and calls :meth:`ServerHandshake.tls_established` with the
client's certificate subject; from then on the bytes fed in and taken out are
the plaintext inside TLS, and the negotiation state starts afresh (spec).
``required`` refuses every other option with ``NBD_REP_ERR_TLS_REQD`` until
then, so no export name, size or list leaves before TLS.

Every refusal that the spec lets a server answer is an :class:`OptionError`
turned into an error reply with a message; negotiation continues.  Only
protocol violations that forbid an answer (bad magic, unknown client flags,
a failed EXPORT_NAME, a non-fixed client sending anything else) end the
connection.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from nbdfleece import wire
from nbdfleece.constants import (
    EXPORT_NAME_PADDING,
    IHAVEOPT,
    MAX_BLOCK_SIZE,
    MAX_OPTION_LENGTH,
    MAX_STRING,
    MIN_BLOCK_SIZE,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    PREFERRED_BLOCK_SIZE,
    ClientFlag,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    TransmissionFlag,
)
from nbdfleece.errors import OptionError
from nbdfleece.exports import ExportInfo
from nbdfleece.tls import DistinguishedName, TlsMode, TlsPolicy

SERVER_HANDSHAKE_FLAGS = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
_IHAVEOPT_BYTES = IHAVEOPT.to_bytes(8, "big")


class ExportDirectory(Protocol):
    """The handshake's read-only view of the export catalogue."""

    def lookup(self, name: str) -> ExportInfo | None: ...

    def listing(self) -> list[tuple[str, str]]: ...


class Phase(enum.Enum):
    CLIENT_FLAGS = "client-flags"
    OPTIONS = "options"
    TLS = "tls"
    """STARTTLS was acknowledged: waiting for :meth:`ServerHandshake.tls_established`."""
    DONE = "done"


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()
"""``next_event`` result: feed more bytes before calling again."""


@dataclass(frozen=True, slots=True)
class Negotiated:
    """The client chose an export: switch to the transmission phase."""

    export: ExportInfo
    structured: bool
    contexts: dict[int, str] = field(default_factory=dict)
    """Selected meta contexts, context id -> name."""
    flags: TransmissionFlag = TransmissionFlag.HAS_FLAGS


@dataclass(frozen=True, slots=True)
class Closed:
    """Negotiation ended without an export; ``hard`` when the peer broke a MUST."""

    reason: str
    hard: bool


@dataclass(frozen=True, slots=True)
class StartTLS:
    """STARTTLS was acknowledged: send :meth:`~ServerHandshake.data_to_send`, then run TLS.

    ``pending`` are bytes that came after the option: they can only be the
    start of the client's TLS handshake, so they go to TLS, never back to the
    handshake core (no plaintext option may survive into the TLS session).
    """

    pending: bytes


Event = Negotiated | Closed | StartTLS

_NOT_TLS_GATED = (Opt.STARTTLS, Opt.ABORT)


def transmission_flags(export: ExportInfo, structured: bool) -> TransmissionFlag:
    """The flags word for ``export`` as QEMU 7.2 composes it."""
    tf = TransmissionFlag
    flags = tf.HAS_FLAGS | tf.SEND_FLUSH | tf.SEND_FUA | tf.CAN_MULTI_CONN | tf.SEND_CACHE
    if export.read_only:
        flags |= tf.READ_ONLY
    else:
        flags |= tf.SEND_TRIM | tf.SEND_WRITE_ZEROES | tf.SEND_FAST_ZERO
    if structured:
        flags |= tf.SEND_DF
    return flags


def match_contexts(offered: Sequence[str], queries: Sequence[str], *, listing: bool) -> list[str]:
    """Resolve meta-context queries against the contexts an export offers.

    LIST: no query means everything; ``ns:`` and ``qemu:dirty-bitmap:``
    prefixes expand.  SET: exact names only (wildcards select nothing).
    Unknown namespaces and leaves are ignored, never errors.  The result keeps
    the export's order and has no duplicates.
    """
    if listing and not queries:
        return list(offered)
    chosen: set[str] = set()
    for query in queries:
        if listing and query.endswith(":") and query.count(":") >= 1:
            chosen.update(c for c in offered if c.startswith(query))
        elif query in offered:
            chosen.add(query)
    return [c for c in offered if c in chosen]


class ServerHandshake:
    """One connection's negotiation, fed with bytes; see the module docstring."""

    def __init__(self, directory: ExportDirectory, tls: TlsPolicy | None = None) -> None:
        self._directory = directory
        self._tls = tls if tls is not None and tls.mode is not TlsMode.OFF else None
        self.tls_active = False
        self.peer: DistinguishedName | None = None
        """The client certificate's subject once TLS is up (None: no certificate)."""
        self._denials: list[str] = []
        self._in = bytearray()
        self._out = bytearray()
        self.phase = Phase.CLIENT_FLAGS
        self.fixed_newstyle = False
        self.no_zeroes = False
        self.structured = False
        self._meta_export: str | None = None
        self._meta_selected: dict[int, str] = {}
        self._skip_remaining = 0
        self._skip_option: int | None = None
        self._out += wire.GREETING.pack(NBDMAGIC, IHAVEOPT, SERVER_HANDSHAKE_FLAGS)

    # -- I/O interface ----------------------------------------------------
    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self.phase is Phase.DONE:
            raise RuntimeError("handshake is over; pass further bytes to transmission")
        if self.phase is Phase.TLS:
            raise RuntimeError("bytes after STARTTLS belong to the TLS handshake")
        if self._skip_remaining and not self._in:
            # Discard an oversized option's payload as it arrives: never buffered.
            n = min(self._skip_remaining, len(data))
            self._skip_remaining -= n
            data = data[n:]
        self._in += data

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def take_denials(self) -> list[str]:
        """Why exports were refused by the TLS policy since the last call (for the logs)."""
        denials, self._denials = self._denials, []
        return denials

    def trailing_data(self) -> bytes:
        """Bytes received after the final option (early transmission requests)."""
        return bytes(self._in)

    def tls_established(self, peer: DistinguishedName | None) -> None:
        """The edge finished the TLS handshake; ``peer`` is the verified client subject."""
        if self.phase is not Phase.TLS:
            raise RuntimeError("no STARTTLS is pending")
        self.phase = Phase.OPTIONS
        self.tls_active = True
        self.peer = peer
        # Spec: nothing negotiated before TLS survives it.
        self.structured = False
        self._meta_export, self._meta_selected = None, {}

    def next_event(self) -> Event | _NeedData:
        if self.phase is Phase.DONE:
            raise RuntimeError("handshake is over")
        if self.phase is Phase.TLS:
            raise RuntimeError("waiting for tls_established()")
        if self.phase is Phase.CLIENT_FLAGS:
            if len(self._in) < wire.CLIENT_FLAGS.size:
                return NEED_DATA
            (flags,) = wire.CLIENT_FLAGS.unpack_from(self._in)
            del self._in[: wire.CLIENT_FLAGS.size]
            if flags & ~int(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES):
                return self._close(f"client sent unknown flags {flags:#x}", hard=True)
            self.fixed_newstyle = bool(flags & ClientFlag.C_FIXED_NEWSTYLE)
            self.no_zeroes = bool(flags & ClientFlag.C_NO_ZEROES)
            self.phase = Phase.OPTIONS
        while True:
            # _skip_remaining > 0 only while _skip_option is set (see below).
            if self._skip_option is not None:
                n = min(self._skip_remaining, len(self._in))
                del self._in[:n]
                self._skip_remaining -= n
                if self._skip_remaining:
                    return NEED_DATA
                option, self._skip_option = self._skip_option, None
                self._reply_error(
                    option,
                    self._tls_gate(option)
                    or OptionError(Rep.ERR_TOO_BIG, f"option longer than {MAX_OPTION_LENGTH} bytes"),
                )
            hsize = wire.OPTION_REQUEST_HEADER.size
            if len(self._in) >= 8 and bytes(self._in[:8]) != _IHAVEOPT_BYTES:
                return self._close("bad option magic", hard=True)
            if len(self._in) < hsize:
                return NEED_DATA
            _, option, length = wire.OPTION_REQUEST_HEADER.unpack_from(self._in)
            if option == Opt.EXPORT_NAME and length > MAX_STRING:
                # No reply is possible for EXPORT_NAME: refuse before reading the name.
                return self._close("NBD_OPT_EXPORT_NAME refused: name too long", hard=True)
            if length > MAX_OPTION_LENGTH:
                if not self.fixed_newstyle:
                    return self._close("oversized option from a non-fixed client", hard=True)
                del self._in[:hsize]
                self._skip_remaining, self._skip_option = length, option
                continue
            if len(self._in) < hsize + length:
                return NEED_DATA
            payload = bytes(self._in[hsize : hsize + length])
            del self._in[: hsize + length]
            event = self._dispatch(option, payload)
            if event is not None:
                return event

    # -- helpers ----------------------------------------------------------
    def _close(self, reason: str, *, hard: bool) -> Closed:
        self.phase = Phase.DONE
        return Closed(reason, hard)

    def _reply(self, option: int, rep: int, payload: bytes = b"") -> None:
        self._out += wire.OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, option, rep, len(payload))
        self._out += payload

    def _reply_error(self, option: int, err: OptionError) -> None:
        self._reply(option, err.rep, wire.utf8_prefix(err.message, MAX_STRING))

    def _tls_gate(self, option: int) -> OptionError | None:
        """FORCEDTLS: the refusal of every option but STARTTLS and ABORT before TLS."""
        if self._tls is None or self.tls_active or self._tls.mode is not TlsMode.REQUIRED:
            return None
        if option in _NOT_TLS_GATED:
            return None
        return OptionError(Rep.ERR_TLS_REQD, f"Option {option:#x} not permitted before TLS")

    def _dispatch(self, option: int, payload: bytes) -> Event | None:
        if not self.fixed_newstyle and option != Opt.EXPORT_NAME:
            return self._close(f"option {option} from a client without fixed newstyle", hard=True)
        gate = self._tls_gate(option)
        if gate is not None:
            if option == Opt.EXPORT_NAME:  # cannot be answered: spec says terminate
                return self._close("NBD_OPT_EXPORT_NAME before TLS", hard=True)
            self._reply_error(option, gate)
            return None
        if option == Opt.EXPORT_NAME:
            return self._export_name(payload)
        handler = self._HANDLERS.get(option)
        try:
            if handler is None:
                raise OptionError(Rep.ERR_UNSUP, f"option {option} not supported")
            return handler(self, option, payload)
        except OptionError as err:
            self._reply_error(option, err)
            return None

    @staticmethod
    def _decode_name(raw: bytes, what: str = "export name") -> str:
        if len(raw) > MAX_STRING:
            raise OptionError(Rep.ERR_INVALID, f"{what} longer than {MAX_STRING} bytes")
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            if what == "export name":  # matches no configured name: an unknown export (nbd.md §3)
                shown = raw.decode("utf-8", "replace")
                raise OptionError(Rep.ERR_UNKNOWN, f"export '{shown}' not present") from None
            raise OptionError(Rep.ERR_INVALID, f"{what} is not valid UTF-8") from None
        if "\0" in name:
            raise OptionError(Rep.ERR_INVALID, f"{what} contains NUL")
        return name

    def _lookup(self, name: str, option: int) -> ExportInfo:
        info = self._directory.lookup(name)
        if info is None:
            raise OptionError(Rep.ERR_UNKNOWN, f"export '{name}' not present")
        policy = self._tls
        if policy is None:
            return info
        if not self.tls_active and policy.needs_tls(info.name):
            # SELECTIVETLS: TLS_REQD is for the options that enter transmission only.
            rep = Rep.ERR_TLS_REQD if option in (Opt.INFO, Opt.GO) else Rep.ERR_POLICY
            self._denials.append(f"export '{info.name}' requires TLS (option {option})")
            raise OptionError(rep, f"export '{info.name}' requires TLS")
        if self.tls_active and not policy.permits(info.name, self.peer):
            who = f"'{self.peer}'" if self.peer is not None else "a client without a certificate"
            message = f"{who} is not allowed to use export '{info.name}'"
            self._denials.append(f"{message} (option {option})")
            raise OptionError(Rep.ERR_POLICY, message)
        return info

    def _visible(self, name: str) -> bool:
        """Whether LIST shows ``name``: not before TLS if it needs TLS, not if denied."""
        policy = self._tls
        if policy is None:
            return True
        if not self.tls_active:
            return not policy.needs_tls(name)
        return policy.permits(name, self.peer)

    @staticmethod
    def _require_empty(payload: bytes, option: int) -> None:
        if payload:
            raise OptionError(Rep.ERR_INVALID, f"option {option} takes no data")

    # -- options ----------------------------------------------------------
    def _export_name(self, payload: bytes) -> Event:
        try:
            info = self._lookup(self._decode_name(payload), Opt.EXPORT_NAME)
        except OptionError as err:
            return self._close(f"NBD_OPT_EXPORT_NAME refused: {err.message}", hard=True)
        flags = transmission_flags(info, self.structured)
        self._out += wire.EXPORT_NAME_REPLY.pack(info.size, flags)
        if not self.no_zeroes:
            self._out += bytes(EXPORT_NAME_PADDING)
        return self._negotiated(info, flags)

    def _negotiated(self, info: ExportInfo, flags: TransmissionFlag) -> Negotiated:
        contexts: dict[int, str] = {}
        if self._meta_export == info.name:
            contexts = {i: c for i, c in self._meta_selected.items() if c in info.contexts}
        self.phase = Phase.DONE
        return Negotiated(info, self.structured, contexts, flags)

    def _abort(self, option: int, payload: bytes) -> Event:
        self._reply(option, Rep.ACK)
        return self._close("client aborted", hard=False)

    def _list(self, option: int, payload: bytes) -> None:
        self._require_empty(payload, option)
        for name, description in self._directory.listing():
            if not self._visible(name):
                continue
            self._reply(option, Rep.SERVER, wire.rep_server.build(
                {"name": name.encode(), "description": description.encode()}
            ))
        self._reply(option, Rep.ACK)

    def _starttls(self, option: int, payload: bytes) -> StartTLS:
        # Without TLS the answer is POLICY whatever the data (protocol/nbd.md).
        if self._tls is None:
            raise OptionError(Rep.ERR_POLICY, "TLS not configured")
        if self.tls_active:
            raise OptionError(Rep.ERR_INVALID, "TLS already enabled")
        if payload:
            raise OptionError(Rep.ERR_INVALID, "option 'starttls' has unexpected length")
        self._reply(option, Rep.ACK)
        self.phase = Phase.TLS
        pending = bytes(self._in)
        self._in.clear()
        return StartTLS(pending)

    def _structured_reply(self, option: int, payload: bytes) -> None:
        self._require_empty(payload, option)
        if self.structured:
            raise OptionError(Rep.ERR_INVALID, "structured reply already negotiated")
        self.structured = True
        self._reply(option, Rep.ACK)

    def _info_or_go(self, option: int, payload: bytes) -> Event | None:
        request = wire.parse_option_payload(wire.go_request, payload)
        info = self._lookup(self._decode_name(request.name), option)
        flags = transmission_flags(info, self.structured)
        self._reply(option, Rep.INFO, wire.INFO_EXPORT.pack(Info.EXPORT, info.size, flags))
        seen: set[int] = set()
        for item in request.info_requests:
            if item in seen:
                continue
            seen.add(item)
            if item == Info.NAME:
                self._reply(option, Rep.INFO, wire.info_name.build({"name": info.name.encode()}))
            elif item == Info.DESCRIPTION and info.description:
                self._reply(option, Rep.INFO, wire.info_description.build(
                    {"description": info.description.encode()}
                ))
            elif item == Info.BLOCK_SIZE:
                self._reply_block_size(option)
        if Info.BLOCK_SIZE not in seen:
            self._reply_block_size(option)
        self._reply(option, Rep.ACK)
        if option == Opt.GO:
            return self._negotiated(info, flags)
        return None

    def _reply_block_size(self, option: int) -> None:
        self._reply(option, Rep.INFO, wire.INFO_BLOCK_SIZE.pack(
            Info.BLOCK_SIZE, MIN_BLOCK_SIZE, PREFERRED_BLOCK_SIZE, MAX_BLOCK_SIZE
        ))

    def _meta_context(self, option: int, payload: bytes) -> None:
        listing = option == Opt.LIST_META_CONTEXT
        if not listing:
            # SET replaces the selection even when it fails, whatever the failure.
            self._meta_export, self._meta_selected = None, {}
        if not self.structured:
            raise OptionError(Rep.ERR_INVALID, "structured replies must be negotiated first")
        request = wire.parse_option_payload(wire.meta_context_request, payload)
        name = self._decode_name(request.name)
        queries = [self._decode_name(q, "context query") for q in request.queries]
        info = self._lookup(name, option)
        chosen = match_contexts(info.contexts, queries, listing=listing)
        selected: dict[int, str] = {}
        for context in chosen:
            context_id = 0 if listing else info.context_id(context) or 0
            selected[context_id] = context
            self._reply(option, Rep.META_CONTEXT, wire.rep_meta_context.build(
                {"context_id": context_id, "name": context.encode()}
            ))
        if not listing:
            self._meta_export, self._meta_selected = info.name, selected
        self._reply(option, Rep.ACK)

    _HANDLERS: ClassVar[dict[int, Callable[[ServerHandshake, int, bytes], Event | None]]] = {
        Opt.ABORT: _abort,
        Opt.LIST: _list,
        Opt.STARTTLS: _starttls,
        Opt.INFO: _info_or_go,
        Opt.GO: _info_or_go,
        Opt.STRUCTURED_REPLY: _structured_reply,
        Opt.LIST_META_CONTEXT: _meta_context,
        Opt.SET_META_CONTEXT: _meta_context,
    }
