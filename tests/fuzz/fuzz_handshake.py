#!/usr/bin/env python3
"""Coverage-guided fuzzing of the sans-I/O NBD handshake (atheris).

Input layout: byte 0 chooses the TLS policy (bits 6-7: none, selective,
required, required with allow-lists) and seeds how the rest is cut into
pieces (bits 0-5, 0: one piece); bytes 1.. are everything the client sends
(client flags, options, and any early transmission bytes).  After an
acknowledged STARTTLS the rest of the stream plays the plaintext inside TLS:
the harness calls ``tls_established`` with a fixed client certificate subject.
The server side is driven as ``Connection._handshake`` drives it, then the
whole exchange is checked against an independent reading of the client's
byte stream:

* no exception escapes the core (refusals are replies or ``Closed``);
* the server's bytes parse back with ``wire.py``: the greeting, then for each
  option the client completed, in order, one group of replies for that option
  ending in ACK or an error (EXPORT_NAME: its fixed reply instead);
* reply payloads are well formed (INFO/SERVER/META_CONTEXT parse, errors are
  UTF-8 of at most 4096 bytes) and describe the right export;
* ``Negotiated`` comes only from GO with ACK or a good EXPORT_NAME, never after
  an ABORT; ``Closed(hard=False)`` only from ABORT; early transmission bytes
  come back intact from ``trailing_data``;
* TLS: no export name, size or context leaves before TLS when the export needs
  TLS (with FORCEDTLS every option but STARTTLS and ABORT gets TLS_REQD), nor
  after TLS to a client the export's allow-list refuses; nothing negotiated
  before STARTTLS survives it;
* an oversized option is never buffered.

Run: ``.venv/bin/python tests/fuzz/fuzz_handshake.py tests/fuzz/corpus/handshake``
(any libFuzzer flag works, e.g. ``-max_total_time=60``); see tools/fuzz.sh.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from fuzz_harness import fuzz, instrumented, pieces  # the module beside this script

with instrumented(__name__):
    from nbdfleece import wire
    from nbdfleece.constants import (
        EXPORT_NAME_PADDING,
        IHAVEOPT,
        MAX_OPTION_LENGTH,
        MAX_STRING,
        NBDMAGIC,
        OPTION_REPLY_MAGIC,
        REP_ERROR_BIT,
        HandshakeFlag,
        Info,
        Opt,
        Rep,
    )
    from nbdfleece.exports import ExportInfo
    from nbdfleece.handshake import (
        NEED_DATA,
        Closed,
        Negotiated,
        Phase,
        ServerHandshake,
        StartTLS,
        transmission_flags,
    )
    from nbdfleece.tls import DistinguishedName, TlsMode, TlsPolicy

EXPORTS = (
    ExportInfo("live", 64 << 20, False, "live disk",
               ("base:allocation", "qemu:dirty-bitmap:bm0", "qemu:allocation-depth")),
    ExportInfo("ro", 1 << 20, True),
    ExportInfo("dïsk-ü", 512, False, "ünïcode " * 8),
)


class Directory:
    """A fixed catalogue; the empty name is the first (default) export."""

    def lookup(self, name: str) -> ExportInfo | None:
        if name == "":
            return EXPORTS[0]
        return next((e for e in EXPORTS if e.name == name), None)

    def listing(self) -> list[tuple[str, str]]:
        return [(e.name, e.description) for e in EXPORTS]


DIRECTORY = Directory()
ME, OTHER = DistinguishedName.parse("CN=fuzz,O=nbdfleece"), DistinguishedName.parse("CN=other")


@dataclass(frozen=True)
class TlsCase:
    """A TLS configuration, the client's certificate, and what the spec then allows
    (written out by hand, not derived from the policy object)."""

    policy: TlsPolicy | None
    peer: DistinguishedName | None
    needs_tls: frozenset[str] = frozenset()
    """Exports whose data must not leave before TLS."""
    denied: frozenset[str] = frozenset()
    """Exports this client may not use even with TLS."""

    @property
    def forced(self) -> bool:
        return self.policy is not None and self.policy.mode is TlsMode.REQUIRED

    def may_see(self, name: str, tls_active: bool) -> bool:
        if not tls_active and name in self.needs_tls:
            return False
        return not (tls_active and name in self.denied)


ALL = frozenset(e.name for e in EXPORTS)
TLS_CASES = (
    TlsCase(None, None),
    TlsCase(TlsPolicy(TlsMode.OPTIONAL, frozenset({"ro"}), {"dïsk-ü": (OTHER,)}), ME,
            needs_tls=frozenset({"ro", "dïsk-ü"}), denied=frozenset({"dïsk-ü"})),
    TlsCase(TlsPolicy(TlsMode.REQUIRED), None, needs_tls=ALL),
    TlsCase(TlsPolicy(TlsMode.REQUIRED, frozenset(), {"live": (ME,), "ro": (OTHER,)}), ME,
            needs_tls=ALL, denied=frozenset({"ro"})),
)
_IHAVEOPT = IHAVEOPT.to_bytes(8, "big")
_HARD = "hard"  # the model knows the core must hang up at this point


@dataclass(frozen=True)
class ClientOption:
    """One option as the spec reads the client's stream (independent of the core)."""

    option: int
    payload: bytes
    end: int
    """Offset in the client stream just after this option."""
    too_big: bool = False


PIECE_SIZES = (1, 3, 16, 64, 4096)
"""The longest pieces the stream is cut into (see fuzz_harness.pieces)."""


def read_client(stream: bytes) -> tuple[int | None, list[ClientOption], str | None]:
    """Client flags, the complete options, and whether the stream forces a hang-up."""
    if len(stream) < 4:
        return None, [], None
    (flags,) = struct.unpack_from(">I", stream)
    if flags & ~3:
        return flags, [], _HARD
    fixed = bool(flags & 1)
    options: list[ClientOption] = []
    pos = 4
    while True:
        if len(stream) - pos >= 8 and stream[pos : pos + 8] != _IHAVEOPT:
            return flags, options, _HARD
        if len(stream) - pos < 16:
            return flags, options, None
        option, length = struct.unpack_from(">II", stream, pos + 8)
        if option == Opt.EXPORT_NAME and length > MAX_STRING:
            return flags, options, _HARD
        if length > MAX_OPTION_LENGTH and not fixed:
            return flags, options, _HARD
        if len(stream) - pos - 16 < length:
            return flags, options, None
        too_big = length > MAX_OPTION_LENGTH
        payload = b"" if too_big else stream[pos + 16 : pos + 16 + length]
        pos += 16 + length
        options.append(ClientOption(option, payload, pos, too_big))


class Replies:
    """The server's option replies, read back one at a time with wire.py."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def next(self) -> tuple[int, int, bytes]:
        hsize = wire.OPTION_REPLY_HEADER.size
        assert len(self.data) - self.pos >= hsize, "option reply missing"
        header = wire.option_reply_header.parse(self.data[self.pos : self.pos + hsize])
        assert header.magic == OPTION_REPLY_MAGIC
        start = self.pos + hsize
        payload = self.data[start : start + header.length]
        assert len(payload) == header.length, "option reply truncated"
        self.pos = start + header.length
        return header.option, header.type, payload

    def rest(self) -> bytes:
        return self.data[self.pos :]


def check_error(rep: int, payload: bytes) -> None:
    assert rep in {int(r) for r in Rep}, f"unknown error reply {rep:#x}"
    assert len(payload) <= MAX_STRING, "error message longer than 4096 bytes"
    payload.decode("utf-8")  # the spec: a UTF-8 message


def decode_name(raw: bytes) -> str | None:
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return None if "\0" in name or len(raw) > MAX_STRING else name


def check_group(replies: Replies, opt: ClientOption, structured: bool, tls: TlsCase,
                tls_active: bool) -> tuple[int, bytes]:
    """Read one option's replies; returns the final reply type and its payload."""
    gated = tls.forced and not tls_active and opt.option not in (Opt.STARTTLS, Opt.ABORT)
    infos: list[int] = []
    export: ExportInfo | None = None
    listed: list[str] = []
    requested: list[int] = []
    while True:
        option, rep, payload = replies.next()
        assert option == opt.option, f"reply for option {option}, expected {opt.option}"
        if rep & REP_ERROR_BIT:
            check_error(rep, payload)
            if gated:
                assert rep == Rep.ERR_TLS_REQD, f"option {opt.option} before TLS: {rep:#x}"
            elif opt.too_big:
                assert rep == Rep.ERR_TOO_BIG
            if opt.option == Opt.STARTTLS:
                assert rep == (Rep.ERR_POLICY if tls.policy is None else Rep.ERR_INVALID)
            return rep, payload
        assert not gated, f"option {opt.option} answered before TLS"
        assert not opt.too_big, "an oversized option was answered with success"
        if rep == Rep.ACK:
            assert payload == b""
            if opt.option == Opt.LIST:
                assert listed == [e.name for e in EXPORTS if tls.may_see(e.name, tls_active)]
            if opt.option == Opt.STARTTLS:
                assert tls.policy is not None and not tls_active and not opt.payload
            if opt.option in (Opt.INFO, Opt.GO):
                assert infos and infos[0] == Info.EXPORT and Info.BLOCK_SIZE in infos
            return rep, payload
        if rep == Rep.SERVER:
            assert opt.option == Opt.LIST
            listed.append(wire.rep_server.parse(payload).name.decode())
        elif rep == Rep.INFO:
            assert opt.option in (Opt.INFO, Opt.GO)
            (kind,) = struct.unpack_from(">H", payload)
            infos.append(kind)
            if kind == Info.EXPORT:
                assert len(infos) == 1, "INFO_EXPORT must come first"
                info = wire.info_export.parse(payload)
                request = wire.go_request.parse(opt.payload)
                requested = list(request.info_requests)
                export = DIRECTORY.lookup(request.name.decode())
                assert export is not None
                assert tls.may_see(export.name, tls_active), f"'{export.name}' leaked (TLS)"
                assert info.size == export.size
                assert info.flags == transmission_flags(export, structured)
            elif kind == Info.NAME:
                assert export is not None and kind in requested
                assert wire.info_name.parse(payload).name.decode() == export.name
            elif kind == Info.DESCRIPTION:
                assert export is not None and kind in requested
                text = wire.info_description.parse(payload).description.decode()
                assert text == export.description
            elif kind == Info.BLOCK_SIZE:
                sizes = wire.info_block_size.parse(payload)
                assert 1 <= sizes.minimum <= sizes.preferred <= sizes.maximum
            else:
                raise AssertionError(f"unrequested info type {kind}")
        elif rep == Rep.META_CONTEXT:
            assert opt.option in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT)
            assert structured
            meta = wire.rep_meta_context.parse(payload)
            request = wire.meta_context_request.parse(opt.payload)
            export = DIRECTORY.lookup(request.name.decode())
            assert export is not None
            assert tls.may_see(export.name, tls_active), f"'{export.name}' leaked (TLS)"
            name = meta.name.decode()
            assert name in export.contexts
            if opt.option == Opt.LIST_META_CONTEXT:
                assert meta.context_id == 0
            else:
                assert meta.context_id == export.context_id(name)
        else:
            raise AssertionError(f"unexpected reply type {rep:#x}")


def check_negotiated(event: Negotiated, structured: bool) -> None:
    export = DIRECTORY.lookup(event.export.name)
    assert export == event.export
    assert event.structured == structured
    assert event.flags == transmission_flags(export, structured)
    if not structured:
        assert not event.contexts
    for context_id, name in event.contexts.items():
        assert export.context_id(name) == context_id


def exchange(seed: int, stream: bytes, tls: TlsCase) -> tuple[ServerHandshake, object, bytes, bytes]:
    """Drive the core as the server does; (core, final event, server bytes, unfed bytes)."""
    hs = ServerHandshake(DIRECTORY, tls.policy)
    out = bytearray(hs.data_to_send())
    parts = pieces(seed, stream, PIECE_SIZES)
    event: object = NEED_DATA
    while True:
        event = hs.next_event()
        out += hs.data_to_send()
        if isinstance(event, StartTLS):
            # The edge would run TLS now; here the rest of the stream is its plaintext.
            assert tls.policy is not None and hs.phase is Phase.TLS
            hs.tls_established(tls.peer)
            if event.pending:
                hs.receive_data(event.pending)
            continue
        if event is not NEED_DATA:
            break
        # Waiting for more, the core holds one incomplete option at most.
        assert len(hs._in) < 16 + MAX_OPTION_LENGTH, "oversized option buffered"
        if not parts:
            break
        hs.receive_data(parts.pop(0))
    return hs, event, bytes(out), b"".join(parts)


def check(data: bytes) -> None:
    if not data:
        return
    seed, tls, stream = data[0] & 0x3F, TLS_CASES[data[0] >> 6], data[1:]
    hs, event, out, unfed = exchange(seed, stream, tls)
    flags, options, hangup = read_client(stream)

    greeting = wire.greeting.parse(out[: wire.GREETING.size])
    assert greeting.nbdmagic == NBDMAGIC and greeting.ihaveopt == IHAVEOPT
    assert greeting.handshake_flags == HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
    replies = Replies(out[wire.GREETING.size :])
    fixed = flags is not None and bool(flags & 1)
    no_zeroes = flags is not None and bool(flags & 2)
    structured = False
    tls_active = False

    for opt in options:
        if not fixed and opt.option != Opt.EXPORT_NAME:
            assert isinstance(event, Closed) and event.hard, event
            assert replies.rest() == b""
            return
        if opt.option == Opt.EXPORT_NAME:
            name = decode_name(opt.payload)
            export = DIRECTORY.lookup(name) if name is not None else None
            if export is not None and tls.forced and not tls_active:
                export = None  # FORCEDTLS: EXPORT_NAME before TLS can only be refused
            if export is None or not tls.may_see(export.name, tls_active):
                assert isinstance(event, Closed) and event.hard, event
                assert replies.rest() == b""
                return
            assert isinstance(event, Negotiated), event
            check_negotiated(event, structured)
            expected = wire.EXPORT_NAME_REPLY.pack(export.size, event.flags)
            if not no_zeroes:
                expected += bytes(EXPORT_NAME_PADDING)
            assert replies.rest() == expected
            assert hs.trailing_data() + unfed == stream[opt.end :]
            return
        final, _ = check_group(replies, opt, structured, tls, tls_active)
        if opt.option == Opt.STRUCTURED_REPLY and final == Rep.ACK:
            assert not structured
            structured = True
        if opt.option == Opt.STARTTLS and final == Rep.ACK:
            tls_active, structured = True, False  # nothing from before TLS survives it
        if opt.option == Opt.ABORT:
            assert final == Rep.ACK
            assert isinstance(event, Closed) and not event.hard, event
            assert replies.rest() == b""
            return
        if opt.option == Opt.GO and final == Rep.ACK:
            assert isinstance(event, Negotiated), event
            assert tls.may_see(event.export.name, tls_active)
            assert hs.tls_active == tls_active
            check_negotiated(event, structured)
            assert replies.rest() == b""
            assert hs.trailing_data() + unfed == stream[opt.end :]
            return
    assert replies.rest() == b"", "replies to options the client never completed"
    if hangup == _HARD:
        assert isinstance(event, Closed) and event.hard, event
    else:
        assert event is NEED_DATA, event
        assert not unfed


MAX_LEN = 70000  # the oversized-option seed (64 KiB + 1) must fit
"""libFuzzer's -max_len unless given."""


def TestOneInput(data: bytes) -> None:
    check(data)


def main() -> None:
    fuzz(TestOneInput, MAX_LEN)


if __name__ == "__main__":
    main()
