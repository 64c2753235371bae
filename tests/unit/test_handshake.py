"""The sans-I/O handshake, driven by bytes only (no sockets, no trio)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdfleece import wire
from nbdfleece.constants import (
    IHAVEOPT,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    Info,
    Opt,
    Rep,
    TransmissionFlag,
)
from nbdfleece.exports import ExportInfo
from nbdfleece.handshake import (
    NEED_DATA,
    Closed,
    Negotiated,
    Phase,
    ServerHandshake,
    match_contexts,
    transmission_flags,
)

LIVE = ExportInfo("live", 64 << 20, False, "live disk")
RO = ExportInfo("ro", 1 << 20, True)


class Directory:
    def __init__(self, *exports: ExportInfo) -> None:
        self.exports = {e.name: e for e in exports}

    def lookup(self, name: str) -> ExportInfo | None:
        if name == "":
            return next(iter(self.exports.values()), None)
        return self.exports.get(name)

    def listing(self) -> list[tuple[str, str]]:
        return [(e.name, e.description) for e in self.exports.values()]


def option(opt: int, payload: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, opt, len(payload)) + payload


def go_payload(name: str | bytes, *infos: int) -> bytes:
    raw = name.encode() if isinstance(name, str) else name
    return struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(infos)) + b"".join(
        struct.pack(">H", i) for i in infos
    )


def meta_payload(name: str, *queries: str) -> bytes:
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q)) + q.encode()
    return out


def replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """Split option replies into (option, type, payload)."""
    out = []
    while data:
        magic, opt, rep, length = wire.OPTION_REPLY_HEADER.unpack_from(data)
        assert magic == OPTION_REPLY_MAGIC
        hsize = wire.OPTION_REPLY_HEADER.size
        out.append((opt, rep, data[hsize : hsize + length]))
        data = data[hsize + length :]
    return out


def started(client_flags: int = 3) -> ServerHandshake:
    hs = ServerHandshake(Directory(LIVE, RO))
    greeting = hs.data_to_send()
    assert greeting == struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3)
    hs.receive_data(struct.pack(">I", client_flags))
    return hs


def feed(hs: ServerHandshake, data: bytes) -> tuple[object, bytes]:
    hs.receive_data(data)
    event = hs.next_event()
    return event, hs.data_to_send()


def test_greeting_then_need_data() -> None:
    hs = ServerHandshake(Directory(LIVE))
    assert hs.data_to_send() == bytes.fromhex("4e42444d41474943" "49484156454f5054" "0003")
    assert hs.next_event() is NEED_DATA
    hs.receive_data(b"\x00\x00")
    assert hs.next_event() is NEED_DATA
    hs.receive_data(b"\x00\x03")
    assert hs.next_event() is NEED_DATA
    assert hs.phase is Phase.OPTIONS


def test_unknown_client_flags_close_hard() -> None:
    hs = ServerHandshake(Directory(LIVE))
    hs.receive_data(struct.pack(">I", 4))
    event = hs.next_event()
    assert isinstance(event, Closed) and event.hard


def test_list_then_abort() -> None:
    hs = started()
    event, out = feed(hs, option(Opt.LIST))
    assert event is NEED_DATA
    got = replies(out)
    assert [r[1] for r in got] == [Rep.SERVER, Rep.SERVER, Rep.ACK]
    assert got[0][2] == struct.pack(">I", 4) + b"live" + b"live disk"
    assert got[1][2] == struct.pack(">I", 2) + b"ro"
    event, out = feed(hs, option(Opt.ABORT))
    assert isinstance(event, Closed) and not event.hard
    assert replies(out) == [(Opt.ABORT, Rep.ACK, b"")]


def test_go_with_structured_replies() -> None:
    hs = started()
    event, out = feed(hs, option(Opt.STRUCTURED_REPLY))
    assert replies(out) == [(Opt.STRUCTURED_REPLY, Rep.ACK, b"")]
    event, out = feed(hs, option(Opt.GO, go_payload("live", Info.NAME, Info.DESCRIPTION)))
    assert isinstance(event, Negotiated)
    assert event.structured and event.flags == 0x0DED
    got = replies(out)
    assert [r[1] for r in got] == [Rep.INFO] * 4 + [Rep.ACK]
    assert got[0][2] == struct.pack(">HQH", Info.EXPORT, 64 << 20, 0x0DED)
    assert got[1][2] == struct.pack(">H", Info.NAME) + b"live"
    assert got[2][2] == struct.pack(">H", Info.DESCRIPTION) + b"live disk"
    assert got[3][2] == struct.pack(">HIII", Info.BLOCK_SIZE, 1, 4096, 32 << 20)
    assert hs.phase is Phase.DONE


def test_info_stays_in_negotiation_and_matches_go() -> None:
    hs = started()
    event, info_out = feed(hs, option(Opt.INFO, go_payload("ro")))
    assert event is NEED_DATA
    event, go_out = feed(hs, option(Opt.GO, go_payload("ro")))
    assert isinstance(event, Negotiated)
    assert [r[1:] for r in replies(info_out)] == [r[1:] for r in replies(go_out)]
    assert event.flags == 0x050F  # no structured replies: no DF


def test_go_unknown_export_and_bad_lengths() -> None:
    hs = started()
    _, out = feed(hs, option(Opt.GO, go_payload("nosuch")))
    assert replies(out) == [(Opt.GO, Rep.ERR_UNKNOWN, b"export 'nosuch' not present")]
    _, out = feed(hs, option(Opt.GO, go_payload("live") + b"x"))
    assert replies(out)[0][1] == Rep.ERR_INVALID
    _, out = feed(hs, option(Opt.GO, struct.pack(">I", 100) + b"live"))
    assert replies(out)[0][1] == Rep.ERR_INVALID
    _, out = feed(hs, option(Opt.GO, go_payload("x" * 4097)))
    assert replies(out)[0][1] == Rep.ERR_INVALID
    _, out = feed(hs, option(Opt.GO, go_payload(b"\xff\xfe")))  # matches nothing: unknown (nbd.md §3)
    assert replies(out) == [(Opt.GO, Rep.ERR_UNKNOWN, "export '\ufffd\ufffd' not present".encode())]
    _, out = feed(hs, option(Opt.GO, go_payload(b"li\0ve")))
    assert replies(out)[0][1] == Rep.ERR_INVALID
    event, _ = feed(hs, option(Opt.GO, go_payload("")))
    assert isinstance(event, Negotiated) and event.export.name == "live"


def test_export_name_padding_and_no_zeroes() -> None:
    hs = started(client_flags=1)
    event, out = feed(hs, option(Opt.EXPORT_NAME, b"ro"))
    assert isinstance(event, Negotiated)
    assert out == struct.pack(">QH", 1 << 20, 0x050F) + bytes(124)
    hs = started(client_flags=3)
    event, out = feed(hs, option(Opt.EXPORT_NAME, b"live"))
    assert out == struct.pack(">QH", 64 << 20, 0x0D6D)


def test_export_name_unknown_is_a_hard_close() -> None:
    hs = started()
    event, out = feed(hs, option(Opt.EXPORT_NAME, b"nosuch"))
    assert isinstance(event, Closed) and event.hard and out == b""


def test_unknown_option_and_policy_answers() -> None:
    hs = started()
    _, out = feed(hs, option(0x1234, b"abc"))
    assert replies(out) == [(0x1234, Rep.ERR_UNSUP, b"option 4660 not supported")]
    for opt, payload, rep in [
        (Opt.STARTTLS, b"", Rep.ERR_POLICY),
        (Opt.LIST, b"x", Rep.ERR_INVALID),
        (Opt.PEEK_EXPORT, b"", Rep.ERR_UNSUP),
        (Opt.EXTENDED_HEADERS, b"", Rep.ERR_UNSUP),
        (Opt.STRUCTURED_REPLY, b"x", Rep.ERR_INVALID),
        (Opt.LIST_META_CONTEXT, meta_payload("live"), Rep.ERR_INVALID),  # before structured
    ]:
        _, out = feed(hs, option(opt, payload))
        assert replies(out)[0][:2] == (opt, rep), opt
    feed(hs, option(Opt.STRUCTURED_REPLY))
    _, out = feed(hs, option(Opt.STRUCTURED_REPLY))
    assert replies(out)[0][1] == Rep.ERR_INVALID


def test_oversized_option_is_skipped_unbuffered() -> None:
    hs = started()
    hs.receive_data(struct.pack(">QII", IHAVEOPT, Opt.GO, 1 << 20))
    assert hs.next_event() is NEED_DATA
    for _ in range(16):
        hs.receive_data(bytes(65536))
        assert len(hs._in) == 0  # discarded as it arrives
        hs.next_event()
    got = replies(hs.data_to_send())
    assert got[0][:2] == (Opt.GO, Rep.ERR_TOO_BIG)
    event, _ = feed(hs, option(Opt.GO, go_payload("live")))
    assert isinstance(event, Negotiated)


def test_bad_option_magic_closes() -> None:
    hs = started()
    event, _ = feed(hs, struct.pack(">QII", 0x1234, Opt.LIST, 0))
    assert isinstance(event, Closed) and event.hard


def test_non_fixed_client_may_only_send_export_name() -> None:
    hs = started(client_flags=0)
    event, _ = feed(hs, option(Opt.LIST))
    assert isinstance(event, Closed) and event.hard
    hs = started(client_flags=0)
    event, out = feed(hs, option(Opt.EXPORT_NAME, b"live"))
    assert isinstance(event, Negotiated) and len(out) == 10 + 124


def test_meta_context_list_and_set() -> None:
    hs = started()
    feed(hs, option(Opt.STRUCTURED_REPLY))
    _, out = feed(hs, option(Opt.LIST_META_CONTEXT, meta_payload("live")))
    assert replies(out) == [
        (Opt.LIST_META_CONTEXT, Rep.META_CONTEXT, struct.pack(">I", 0) + b"base:allocation"),
        (Opt.LIST_META_CONTEXT, Rep.ACK, b""),
    ]
    _, out = feed(hs, option(
        Opt.SET_META_CONTEXT, meta_payload("live", "base:allocation", "qemu:dirty-bitmap:x")
    ))
    assert replies(out) == [
        (Opt.SET_META_CONTEXT, Rep.META_CONTEXT, struct.pack(">I", 1) + b"base:allocation"),
        (Opt.SET_META_CONTEXT, Rep.ACK, b""),
    ]
    event, _ = feed(hs, option(Opt.GO, go_payload("live")))
    assert isinstance(event, Negotiated) and event.contexts == {1: "base:allocation"}


def test_meta_context_selection_needs_the_same_export() -> None:
    hs = started()
    feed(hs, option(Opt.STRUCTURED_REPLY))
    feed(hs, option(Opt.SET_META_CONTEXT, meta_payload("ro", "base:allocation")))
    event, _ = feed(hs, option(Opt.GO, go_payload("live")))
    assert isinstance(event, Negotiated) and event.contexts == {}


@pytest.mark.parametrize("payload", [
    struct.pack(">I", 10) + b"live",                                       # name overruns
    struct.pack(">I", 4) + b"live" + struct.pack(">I", 5),                 # too many queries
    struct.pack(">I", 4) + b"live" + struct.pack(">II", 1, 40) + b"base",  # query overruns
    meta_payload("live", "base:allocation") + b"\0",                       # trailing bytes
    struct.pack(">I", 4) + b"li",                                          # truncated
    struct.pack(">I", 4) + b"live" + struct.pack(">II", 1, 1) + b"\xff",   # query not UTF-8
])
def test_set_meta_context_bad_lengths(payload: bytes) -> None:
    """A failed SET, whatever fails, leaves nothing selected (not the earlier selection)."""
    hs = started()
    feed(hs, option(Opt.STRUCTURED_REPLY))
    feed(hs, option(Opt.SET_META_CONTEXT, meta_payload("live", "base:allocation")))
    _, out = feed(hs, option(Opt.SET_META_CONTEXT, payload))
    assert replies(out)[0][1] == Rep.ERR_INVALID
    event, _ = feed(hs, option(Opt.GO, go_payload("live")))
    assert isinstance(event, Negotiated) and event.contexts == {}


def test_trickle_one_byte_at_a_time() -> None:
    """A whole negotiation delivered byte by byte gives the same bytes out."""
    script = (
        struct.pack(">I", 3)
        + option(Opt.STRUCTURED_REPLY)
        + option(Opt.LIST)
        + option(Opt.SET_META_CONTEXT, meta_payload("live", "base:allocation"))
        + option(Opt.GO, go_payload("live", Info.NAME))
        + b"early transmission bytes"
    )
    whole = ServerHandshake(Directory(LIVE, RO))
    whole.receive_data(script)
    while not isinstance(event := whole.next_event(), Negotiated):
        assert event is not NEED_DATA
    trickle = ServerHandshake(Directory(LIVE, RO))
    result = None
    for i in range(len(script)):
        trickle.receive_data(script[i : i + 1])
        result = trickle.next_event()
        if isinstance(result, Negotiated):
            break
        assert result is NEED_DATA
    assert isinstance(result, Negotiated)
    assert result == event
    assert trickle.data_to_send() == whole.data_to_send()
    assert whole.trailing_data() == b"early transmission bytes"


def test_match_contexts_rules() -> None:
    offered = ("base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b0")
    assert match_contexts(offered, [], listing=True) == list(offered)
    assert match_contexts(offered, [], listing=False) == []
    assert match_contexts(offered, ["qemu:"], listing=True) == list(offered[1:])
    assert match_contexts(offered, ["qemu:dirty-bitmap:"], listing=True) == [offered[2]]
    assert match_contexts(offered, ["base:"], listing=True) == [offered[0]]
    assert match_contexts(offered, ["base:"], listing=False) == []
    assert match_contexts(offered, ["qemu:"], listing=False) == []
    assert match_contexts(offered, ["x-unknown:"], listing=True) == []
    assert match_contexts(offered, ["nocolon"], listing=True) == []
    assert match_contexts(offered, ["qemu:dirty-bitmap:b0", "base:allocation"] * 2,
                          listing=False) == [offered[0], offered[2]]


def test_transmission_flag_words_match_qemu() -> None:
    assert transmission_flags(LIVE, True) == 0x0DED
    assert transmission_flags(RO, True) == 0x058F
    assert transmission_flags(LIVE, False) & TransmissionFlag.SEND_DF == 0


OPTIONS = st.sampled_from([*Opt, 0, 12, 0x1234, 0x7FFFFFFF, 0xFFFFFFFF])


@settings(max_examples=300, deadline=None)
@given(
    steps=st.lists(st.tuples(OPTIONS, st.binary(max_size=64)), max_size=8),
    flags=st.sampled_from([0, 1, 2, 3, 4, 0xFFFFFFFF]),
)
def test_every_option_in_every_state_is_answered_or_ends(
    steps: list[tuple[int, bytes]], flags: int
) -> None:
    """Any option sequence: each option gets replies or ends negotiation; never raises."""
    hs = ServerHandshake(Directory(LIVE, RO))
    hs.data_to_send()
    hs.receive_data(struct.pack(">I", flags))
    event = hs.next_event()
    for opt, payload in steps:
        if hs.phase is Phase.DONE:
            break
        hs.receive_data(option(opt, payload))
        event = hs.next_event()
        out = hs.data_to_send()
        if event is NEED_DATA:
            got = replies(out)
            assert got, f"option {opt} got no reply"
            assert all(r[0] == opt for r in got)
            assert got[-1][1] == Rep.ACK or got[-1][1] & (1 << 31)
        else:
            assert isinstance(event, Negotiated | Closed)
            phase: Phase = hs.phase  # widen: mypy keeps the loop-top narrowing
            assert phase is Phase.DONE


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_never_raise(data: bytes) -> None:
    hs = ServerHandshake(Directory(LIVE, RO))
    hs.receive_data(data)
    event = hs.next_event()
    assert event is NEED_DATA or isinstance(event, Negotiated | Closed)
