"""The sans-I/O NBD client core, fed with bytes only.

The golden exchanges of ``protocol/vectors/exchanges.json`` were computed from
the NBD spec; here they are replayed from the *client* side: every byte the
client core sends must equal a ``c2s`` step, every ``s2c`` step is fed to it
(whole, and one byte at a time) and must decode to what the scenario says.
Scenarios that exercise a misbehaving client (unknown flags, malformed
options, options after GO) have no client-side meaning and are listed in
``SERVER_ONLY``.  Then the error cases: bad magics, truncated and
inconsistent replies, unknown cookies, error replies of every kind.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from nbdfleece import wire
from nbdfleece.client_protocol import (
    NEED_DATA,
    ClientHandshake,
    ClientTransmission,
    Closed,
    ExportDetails,
    ExportList,
    NbdError,
    Negotiated,
    NegotiationError,
    Reply,
    StartTLS,
)
from nbdfleece.constants import (
    IHAVEOPT,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    Errno,
    Info,
    Opt,
    Rep,
    ReplyFlag,
    ReplyType,
    TransmissionFlag,
)
from nbdfleece.errors import ProtocolError

VECTORS = Path(__file__).parents[2] / "protocol" / "vectors"
EXCHANGES = json.loads((VECTORS / "exchanges.json").read_text())
SCENARIOS = {s["name"]: s for s in EXCHANGES["scenarios"]}

# How the client core must be configured to speak each scenario, and, where the
# scenario's server is not fixed newstyle, the greeting flags it gets instead.
CLIENT_SIDE: dict[str, dict[str, Any]] = {
    "a_list_then_abort": {"list_exports": True},
    "b_structured_then_go_with_infos": {"export_name": "live"},
    "c_go_unknown_export": {"export_name": "nosuch", "structured": False, "info_requests": ()},
    "f_export_name_with_zeroes": {"export_name": "ro", "greeting_flags": 0},
    "g_simple_replies": {"export_name": "live", "structured": False, "info_requests": ()},
    "h_structured_replies": {"export_name": "live", "meta_contexts": ["base:allocation"],
                             "info_requests": ()},
    "x4_nonfixed_export_name_default": {"export_name": "", "greeting_flags": 2},
    "x8_read_only_structured": {"export_name": "ro", "info_requests": ()},
    "x9_simple_mode_checks": {"export_name": "ro", "structured": False, "info_requests": (0,)},
    "x10_sparse_reads_and_status": {"export_name": "live", "meta_contexts": ["base:allocation"],
                                    "info_requests": ()},
    "x11_write_read_back": {"export_name": "live", "info_requests": ()},
}
SERVER_ONLY = {
    "d_unknown_option": "the client never sends unknown options",
    "e_list_and_set_meta_context": "the client never sends NBD_OPT_LIST_META_CONTEXT",
    "x1_option_errors_and_info": "malformed options and NBD_OPT_INFO",
    "x2_unknown_client_flag": "the client never sets unknown flags",
    "x3_nonfixed_client_other_option": "the client never mixes non-fixed flags and options",
    "x5_export_name_unknown": "covered by test_export_name_refused_is_eof",
    "x6_option_after_go": "the client never sends options after GO",
    "x7_bad_option_magic": "the client always sends IHAVEOPT",
}

# Read data and extents each scenario's replies must decode to, by cookie.
READS: dict[tuple[str, int], bytes] = {
    ("g_simple_replies", 0x1): bytes(8),
    ("h_structured_replies", 0x11): bytes(8),
    ("x8_read_only_structured", 0x2A): bytes(8),
    ("x10_sparse_reads_and_status", 0x40): bytes(65536),
    ("x11_write_read_back", 0x51): bytes(4) + bytes(range(1, 9)) + bytes(4),
    ("x11_write_read_back", 0x53): bytes(8),
}
EXTENTS: dict[tuple[str, int], dict[str, list[tuple[int, int]]]] = {
    ("h_structured_replies", 0x12): {"base:allocation": [(4096, 3)]},
    ("x10_sparse_reads_and_status", 0x41): {"base:allocation": [(1048576, 3)]},
}


def test_every_scenario_is_classified() -> None:
    assert set(CLIENT_SIDE) | set(SERVER_ONLY) == set(SCENARIOS)
    assert not set(CLIENT_SIDE) & set(SERVER_ONLY)


def s2c_bytes(step: dict[str, Any]) -> bytes:
    """The step's bytes; a free-text message is filled in with a fixed one."""
    if "hex" in step:
        return bytes.fromhex(step["hex"])
    prefix = bytes.fromhex(step["hex_prefix"])
    text = b"message from the vector"
    if "error" in step:  # ERROR chunk: u32 length, u32 error, u16 msglen, text
        return prefix + struct.pack(">IIH", 6 + len(text), step["error"], len(text)) + text
    return prefix + struct.pack(">I", len(text)) + text


def feed(target: ClientHandshake | ClientTransmission, data: bytes, trickle: bool) -> None:
    for i in range(len(data)) if trickle else [None]:
        target.receive_data(data if i is None else data[i : i + 1])


def handshake_for(name: str) -> tuple[ClientHandshake, int | None]:
    config = dict(CLIENT_SIDE[name])
    greeting_flags = config.pop("greeting_flags", None)
    return ClientHandshake(**config), greeting_flags


@pytest.mark.parametrize("trickle", [False, True], ids=["whole", "trickle"])
@pytest.mark.parametrize("name", sorted(CLIENT_SIDE))
def test_client_replays_exchange(name: str, trickle: bool) -> None:
    scenario = SCENARIOS[name]
    hs, greeting_flags = handshake_for(name)
    steps = list(scenario["steps"])
    if greeting_flags is not None:
        # A server without fixed newstyle: same greeting bytes but the flags,
        # and the client flags follow from them.
        steps[0] = {"dir": "s2c", "hex": wire.GREETING.pack(NBDMAGIC, IHAVEOPT, greeting_flags).hex()}
        steps[1] = {"dir": "c2s", "hex": f"{greeting_flags & 2:08x}"}
    core: ClientTransmission | None = None
    failed: NegotiationError | None = None
    event: object = NEED_DATA
    replies: dict[int, Reply] = {}
    buffers: dict[int, bytearray] = {}
    out = b""  # what the client sent and the scenario has not matched yet
    for step in steps:
        if step["dir"] == "c2s":
            want = bytes.fromhex(step["hex"])
            if core is None:
                out += hs.data_to_send()
                assert out[: len(want)] == want, step["note"]
                out = out[len(want) :]
                continue
            # Transmission: the request the vector shows, built by the core.
            _, flags, cmd, cookie, offset, length = wire.REQUEST_HEADER.unpack_from(want)
            buf = None
            if cmd == Cmd.READ:
                buffers[cookie] = bytearray(b"\xaa" * length)
                buf = memoryview(buffers[cookie])
            _, header = core.request(cmd, offset, length, flags, buf=buf, cookie=cookie)
            assert header == want[: wire.REQUEST_HEADER.size], step["note"]
            assert len(want) == wire.REQUEST_HEADER.size + (length if cmd == Cmd.WRITE else 0)
            continue
        data = s2c_bytes(step)
        if core is None:
            if failed is not None or isinstance(event, ExportList):
                # After a refusal or a listing the client sent ABORT: its ACK ends it.
                if isinstance(event, ExportList):
                    feed(hs, data, trickle)
                    event = hs.next_event()
                    assert isinstance(event, Closed)
                continue
            feed(hs, data, trickle)
            try:
                event = hs.next_event()
            except NegotiationError as exc:
                failed = exc
                continue
            if isinstance(event, Negotiated):
                assert hs.trailing_data() == b""
                core = ClientTransmission(event.export)
            continue
        feed(core, data, trickle)
        got = core.next_event()
        assert isinstance(got, Reply), step["note"]
        assert core.next_event() is NEED_DATA
        replies[got.cookie] = got
        check_reply(name, step, data, got, buffers.get(got.cookie))
    assert out + hs.data_to_send() == b"", "the client sent bytes the scenario does not show"
    if name == "c_go_unknown_export":
        assert failed is not None and "nosuch" in str(failed) and "not present" in str(failed)
    elif name == "a_list_then_abort":
        assert isinstance(event, Closed)
    else:
        assert core is not None and core.in_flight == 0 and core.closed
    for (scenario_name, cookie) in READS:
        if scenario_name == name:
            assert cookie in replies


def check_reply(name: str, step: dict[str, Any], data: bytes, reply: Reply, buf: bytearray | None) -> None:
    """The decoded reply matches the vector: errno, read data, extents."""
    magic = int.from_bytes(data[:4], "big")
    if magic == SIMPLE_REPLY_MAGIC:
        error = int.from_bytes(data[4:8], "big")
    else:
        kind = int.from_bytes(data[6:8], "big")
        error = int.from_bytes(data[20:24], "big") if kind & 0x8000 else 0
    if error:
        assert reply.error is not None and reply.error.errno == error, step["note"]
        assert reply.error.message
        return
    assert reply.error is None, (step["note"], reply.error)
    if (name, reply.cookie) in READS:
        assert buf is not None and bytes(buf) == READS[name, reply.cookie]
    if (name, reply.cookie) in EXTENTS:
        assert reply.extents == EXTENTS[name, reply.cookie]


def test_negotiated_details_from_go() -> None:
    """Scenario b: EXPORT, NAME and BLOCK_SIZE infos end up in the details."""
    hs, _ = handshake_for("b_structured_then_go_with_infos")
    for step in SCENARIOS["b_structured_then_go_with_infos"]["steps"]:
        if step["dir"] == "s2c":
            hs.receive_data(s2c_bytes(step))
    event = hs.next_event()
    assert isinstance(event, Negotiated)
    details = event.export
    assert (details.name, details.size, details.structured) == ("live", 64 << 20, True)
    assert details.flags == 0x0DED and details.flags & TransmissionFlag.CAN_MULTI_CONN
    assert details.block_size == (1, 4096, 32 << 20)


def test_list_exports_pairs() -> None:
    hs = ClientHandshake(list_exports=True)
    for step in SCENARIOS["a_list_then_abort"]["steps"][:6]:
        if step["dir"] == "s2c":
            hs.receive_data(s2c_bytes(step))
    event = hs.next_event()
    assert isinstance(event, ExportList)
    assert event.exports == [("live", "live disk"), ("ro", "")]


# ==========================================================================
# Handshake error cases
# ==========================================================================

GREETING = wire.GREETING.pack(NBDMAGIC, IHAVEOPT, 3)


def option_reply(option: int, rep: int, payload: bytes = b"") -> bytes:
    return wire.OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, option, rep, len(payload)) + payload


def info_export(size: int = 1 << 20, flags: int = 0x0DED) -> bytes:
    return option_reply(Opt.GO, Rep.INFO, wire.INFO_EXPORT.pack(Info.EXPORT, size, flags))


def sent_options(data: bytes) -> list[int]:
    """Option numbers in a client byte stream (after the 4 client-flag bytes)."""
    out = []
    pos = 0
    while pos < len(data):
        _, option, length = wire.OPTION_REQUEST_HEADER.unpack_from(data, pos)
        out.append(option)
        pos += wire.OPTION_REQUEST_HEADER.size + length
    return out


def started(hs: ClientHandshake) -> list[int]:
    hs.receive_data(GREETING)
    assert hs.next_event() is NEED_DATA
    return sent_options(hs.data_to_send()[4:])


def test_bad_greeting_magic() -> None:
    hs = ClientHandshake("x")
    hs.receive_data(b"HTTP/1.1 400 Bad Request\r\n")
    with pytest.raises(ProtocolError, match="not an NBD server"):
        hs.next_event()
    with pytest.raises(RuntimeError):
        hs.next_event()  # sticky


def test_oldstyle_server_refused() -> None:
    hs = ClientHandshake("x")
    hs.receive_data(NBDMAGIC.to_bytes(8, "big") + (0x00420281861253).to_bytes(8, "big"))
    with pytest.raises(NegotiationError, match="oldstyle"):
        hs.next_event()


def test_bad_option_reply_magic() -> None:
    hs = ClientHandshake("x", structured=False)
    started(hs)
    hs.receive_data(b"\x00" * 20)
    with pytest.raises(ProtocolError, match="magic"):
        hs.next_event()


def test_unknown_export_message_and_abort() -> None:
    hs = ClientHandshake("nosuch", structured=False)
    assert started(hs) == [Opt.GO]
    hs.receive_data(option_reply(Opt.GO, Rep.ERR_UNKNOWN, b"export 'nosuch' not present"))
    with pytest.raises(NegotiationError, match="has no export 'nosuch': export 'nosuch' not present"):
        hs.next_event()
    assert sent_options(hs.data_to_send()) == [Opt.ABORT]


@pytest.mark.parametrize(("rep", "text"), [
    (Rep.ERR_TLS_REQD, "requires TLS"),
    (Rep.ERR_POLICY, "by policy"),
    (Rep.ERR_SHUTDOWN, "shutting down"),
    (Rep.ERR_BLOCK_SIZE_REQD, "block size"),
    (Rep.ERR_INVALID, "NBD_REP_ERR_INVALID"),
    (Rep.ERR_UNSUP | 0x70, "reply type 0x80000071"),
])
def test_go_refusals_are_clear(rep: int, text: str) -> None:
    hs = ClientHandshake("disk", structured=False)
    started(hs)
    hs.receive_data(option_reply(Opt.GO, rep))
    with pytest.raises(NegotiationError, match=text):
        hs.next_event()


def test_tls_required_on_first_option() -> None:
    """FORCEDTLS servers answer every option with TLS_REQD."""
    hs = ClientHandshake("disk")
    assert started(hs) == [Opt.STRUCTURED_REPLY]
    hs.receive_data(option_reply(Opt.STRUCTURED_REPLY, Rep.ERR_TLS_REQD, b"TLS required"))
    with pytest.raises(NegotiationError, match=r"requires TLS.*TLS required"):
        hs.next_event()


def test_go_unsupported_falls_back_to_export_name() -> None:
    hs = ClientHandshake("disk", structured=False)
    started(hs)
    hs.receive_data(option_reply(Opt.GO, Rep.ERR_UNSUP))
    assert hs.next_event() is NEED_DATA
    out = hs.data_to_send()
    assert sent_options(out) == [Opt.EXPORT_NAME] and out.endswith(b"disk")
    hs.receive_data(wire.EXPORT_NAME_REPLY.pack(4096, 0x0003))  # NO_ZEROES was negotiated
    event = hs.next_event()
    assert isinstance(event, Negotiated)
    assert event.export.size == 4096 and event.export.flags & TransmissionFlag.READ_ONLY


def test_export_name_refused_is_eof() -> None:
    """A non-fixed server can only close: the EOF message names the export."""
    hs = ClientHandshake("nosuch")
    hs.receive_data(wire.GREETING.pack(NBDMAGIC, IHAVEOPT, 0))
    assert hs.next_event() is NEED_DATA
    assert hs.data_to_send()[:4] == bytes(4)
    assert "'nosuch' does not exist" in hs.eof_message()


def test_structured_refused_goes_on_without() -> None:
    hs = ClientHandshake("disk", meta_contexts=["base:allocation"])
    started(hs)
    hs.receive_data(option_reply(Opt.STRUCTURED_REPLY, Rep.ERR_UNSUP))
    assert hs.next_event() is NEED_DATA
    assert sent_options(hs.data_to_send()) == [Opt.GO]  # no SET_META_CONTEXT without structured
    hs.receive_data(info_export() + option_reply(Opt.GO, Rep.ACK))
    event = hs.next_event()
    assert isinstance(event, Negotiated)
    assert not event.export.structured and event.export.contexts == {}


def test_meta_context_selection() -> None:
    hs = ClientHandshake("disk", meta_contexts=["base:allocation", "qemu:dirty-bitmap:b0", "x:nope"])
    started(hs)
    hs.receive_data(option_reply(Opt.STRUCTURED_REPLY, Rep.ACK))
    assert hs.next_event() is NEED_DATA
    out = hs.data_to_send()
    assert sent_options(out) == [Opt.SET_META_CONTEXT]
    request = wire.meta_context_request.parse(out[wire.OPTION_REQUEST_HEADER.size :])
    assert request.name == b"disk" and list(request.queries) == [
        b"base:allocation", b"qemu:dirty-bitmap:b0", b"x:nope"]
    for cid, name in ((7, b"base:allocation"), (9, b"qemu:dirty-bitmap:b0")):
        hs.receive_data(option_reply(Opt.SET_META_CONTEXT, Rep.META_CONTEXT,
                                     wire.rep_meta_context.build({"context_id": cid, "name": name})))
    hs.receive_data(option_reply(Opt.SET_META_CONTEXT, Rep.ACK))
    assert hs.next_event() is NEED_DATA
    assert sent_options(hs.data_to_send()) == [Opt.GO]
    hs.receive_data(info_export() + option_reply(Opt.GO, Rep.ACK))
    event = hs.next_event()
    assert isinstance(event, Negotiated)
    assert event.export.contexts == {"base:allocation": 7, "qemu:dirty-bitmap:b0": 9}


def test_meta_context_not_asked_for_is_a_violation() -> None:
    hs = ClientHandshake("disk", meta_contexts=["base:allocation"])
    started(hs)
    hs.receive_data(option_reply(Opt.STRUCTURED_REPLY, Rep.ACK))
    hs.next_event()
    hs.receive_data(option_reply(Opt.SET_META_CONTEXT, Rep.META_CONTEXT,
                                 wire.rep_meta_context.build({"context_id": 1, "name": b"evil:ctx"})))
    with pytest.raises(ProtocolError, match="not asked for"):
        hs.next_event()


def test_go_without_info_export_is_a_violation() -> None:
    hs = ClientHandshake("disk", structured=False)
    started(hs)
    hs.receive_data(option_reply(Opt.GO, Rep.ACK))
    with pytest.raises(ProtocolError, match="NBD_INFO_EXPORT"):
        hs.next_event()


def test_reply_to_another_option_is_a_violation() -> None:
    hs = ClientHandshake("disk", structured=False)
    started(hs)
    hs.receive_data(option_reply(Opt.LIST, Rep.ACK))
    with pytest.raises(ProtocolError, match="waiting for GO"):
        hs.next_event()


def test_unknown_info_ignored_and_bad_block_size_refused() -> None:
    hs = ClientHandshake("disk", structured=False)
    started(hs)
    hs.receive_data(info_export() + option_reply(Opt.GO, Rep.INFO, b"\x77\x77junk"))
    assert hs.next_event() is NEED_DATA
    hs.receive_data(option_reply(Opt.GO, Rep.INFO, wire.INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, 3, 4096, 1)))
    with pytest.raises(ProtocolError, match="block sizes"):
        hs.next_event()


def test_starttls_then_renegotiate() -> None:
    hs = ClientHandshake("disk", tls=True)
    assert started(hs) == [Opt.STARTTLS]
    hs.receive_data(option_reply(Opt.STARTTLS, Rep.ACK))
    assert isinstance(hs.next_event(), StartTLS)
    with pytest.raises(RuntimeError):
        hs.next_event()
    hs.tls_established()
    assert sent_options(hs.data_to_send()) == [Opt.STRUCTURED_REPLY]


def test_starttls_refused() -> None:
    hs = ClientHandshake("disk", tls=True)
    started(hs)
    hs.receive_data(option_reply(Opt.STARTTLS, Rep.ERR_POLICY, b"TLS not configured"))
    with pytest.raises(NegotiationError, match=r"does not do TLS.*TLS not configured"):
        hs.next_event()


def test_tls_needs_fixed_newstyle() -> None:
    hs = ClientHandshake("disk", tls=True)
    hs.receive_data(wire.GREETING.pack(NBDMAGIC, IHAVEOPT, 0))
    with pytest.raises(NegotiationError, match="STARTTLS"):
        hs.next_event()


# ==========================================================================
# Transmission error cases
# ==========================================================================

STRUCTURED = ExportDetails("disk", 1 << 20, TransmissionFlag(0x0DED), True,
                           contexts={"base:allocation": 1, "qemu:dirty-bitmap:b": 2})
SIMPLE = ExportDetails("disk", 1 << 20, TransmissionFlag(0x0D6D), False)


def simple(cookie: int, error: int = 0) -> bytes:
    return wire.SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def chunk(cookie: int, kind: int, payload: bytes = b"", done: bool = True) -> bytes:
    flags = ReplyFlag.DONE if done else 0
    header = wire.STRUCTURED_REPLY_HEADER.pack(STRUCTURED_REPLY_MAGIC, flags, kind, cookie, len(payload))
    return header + payload


def data_chunk(cookie: int, offset: int, data: bytes, done: bool = True) -> bytes:
    return chunk(cookie, ReplyType.OFFSET_DATA, offset.to_bytes(8, "big") + data, done)


def hole_chunk(cookie: int, offset: int, length: int, done: bool = True) -> bytes:
    return chunk(cookie, ReplyType.OFFSET_HOLE, wire.OFFSET_HOLE.pack(offset, length), done)


def error_chunk(cookie: int, error: int, message: bytes = b"bad", kind: int = ReplyType.ERROR,
                offset: int | None = None, done: bool = True) -> bytes:
    payload = wire.ERROR_PREFIX.pack(error, len(message)) + message
    if offset is not None:
        payload += offset.to_bytes(8, "big")
    return chunk(cookie, kind, payload, done)


def status_chunk(cookie: int, context_id: int, extents: list[tuple[int, int]], done: bool = True) -> bytes:
    payload = wire.BLOCK_STATUS_PREFIX.pack(context_id) + b"".join(
        wire.BLOCK_DESCRIPTOR.pack(n, f) for n, f in extents)
    return chunk(cookie, ReplyType.BLOCK_STATUS, payload, done)


def read(core: ClientTransmission, offset: int, length: int) -> tuple[int, bytearray]:
    buf = bytearray(b"\xaa" * length)
    cookie, _ = core.request(Cmd.READ, offset, length, buf=memoryview(buf))
    return cookie, buf


def one_reply(core: ClientTransmission) -> Reply:
    event = core.next_event()
    assert isinstance(event, Reply)
    assert core.next_event() is NEED_DATA
    return event


@pytest.mark.parametrize("trickle", [False, True], ids=["whole", "trickle"])
def test_read_assembled_from_chunks_in_any_order(trickle: bool) -> None:
    core = ClientTransmission(STRUCTURED)
    cookie, buf = read(core, 4096, 12288)
    feed(core, data_chunk(cookie, 4096 + 8192, b"c" * 4096, done=False)
         + hole_chunk(cookie, 4096 + 4096, 4096, done=False)
         + data_chunk(cookie, 4096, b"a" * 4096, done=False)
         + chunk(cookie, ReplyType.NONE), trickle)
    reply = one_reply(core)
    assert reply.error is None and reply.cookie == cookie
    assert bytes(buf) == b"a" * 4096 + bytes(4096) + b"c" * 4096
    assert core.in_flight == 0 and not core.mid_reply()


def test_interleaved_replies_out_of_order() -> None:
    core = ClientTransmission(STRUCTURED)
    c1, b1 = read(core, 0, 4)
    c2, b2 = read(core, 100, 4)
    c3, _ = core.request(Cmd.FLUSH)
    core.receive_data(data_chunk(c2, 100, b"2222", done=False) + chunk(c3, ReplyType.NONE)
                      + data_chunk(c1, 0, b"1111") + chunk(c2, ReplyType.NONE))
    done = []
    while (event := core.next_event()) is not NEED_DATA:
        assert isinstance(event, Reply) and event.error is None
        done.append(event.cookie)
    assert done == [c3, c1, c2]
    assert (bytes(b1), bytes(b2)) == (b"1111", b"2222")


def test_simple_read_reply_data_lands_in_buffer() -> None:
    core = ClientTransmission(SIMPLE)
    cookie, buf = read(core, 0, 5)
    core.receive_data(simple(cookie) + b"hello")
    assert one_reply(core).error is None and bytes(buf) == b"hello"


def test_error_replies_keep_the_stream_in_sync() -> None:
    core = ClientTransmission(STRUCTURED)
    c1, _ = read(core, 0, 8)
    c2, _ = core.request(Cmd.WRITE, 0, 3)
    c3, _ = read(core, 0, 8)
    c4, _ = core.request(Cmd.TRIM, 0, 4096)
    c5, buf5 = read(core, 0, 4)
    core.receive_data(error_chunk(c1, Errno.EINVAL, b"beyond the end")
                      + simple(c2, Errno.EPERM)
                      + data_chunk(c3, 0, b"x" * 8, done=False)
                      + error_chunk(c3, Errno.EIO, b"media", kind=ReplyType.ERROR_OFFSET, offset=4)
                      + error_chunk(c4, 999, b"")
                      + data_chunk(c5, 0, b"fine"))
    errors: dict[int, NbdError | None] = {}
    while (event := core.next_event()) is not NEED_DATA:
        assert isinstance(event, Reply)
        errors[event.cookie] = event.error
    assert errors[c5] is None and bytes(buf5) == b"fine"
    e1, e2, e3, e4 = (errors[c] for c in (c1, c2, c3, c4))
    assert e1 is not None and (e1.errno, e1.message, e1.offset) == (Errno.EINVAL, "beyond the end", None)
    assert e2 is not None and e2.errno == Errno.EPERM and e2.message
    assert e3 is not None and (e3.errno, e3.offset) == (Errno.EIO, 4)
    assert e4 is not None and e4.errno == Errno.EINVAL  # unknown value: EINVAL


def test_unknown_error_chunk_type_is_an_error_reply() -> None:
    core = ClientTransmission(STRUCTURED)
    cookie, _ = core.request(Cmd.FLUSH)
    core.receive_data(error_chunk(cookie, Errno.ENOSPC, b"full", kind=0x8123))
    reply = one_reply(core)
    assert reply.error is not None and reply.error.errno == Errno.ENOSPC and reply.error.message == "full"


def test_block_status_per_context() -> None:
    core = ClientTransmission(STRUCTURED)
    cookie, _ = core.request(Cmd.BLOCK_STATUS, 0, 1 << 20)
    core.receive_data(status_chunk(cookie, 2, [(65536, 1), (983040, 0)], done=False)
                      + status_chunk(cookie, 1, [(4096, 0), (1 << 20, 3)]))
    reply = one_reply(core)
    assert reply.extents == {"qemu:dirty-bitmap:b": [(65536, 1), (983040, 0)],
                             "base:allocation": [(4096, 0), (1 << 20, 3)]}


def test_block_status_missing_context_fails_the_request() -> None:
    core = ClientTransmission(STRUCTURED)
    cookie, _ = core.request(Cmd.BLOCK_STATUS, 0, 4096)
    core.receive_data(status_chunk(cookie, 1, [(4096, 3)]))
    reply = one_reply(core)
    assert reply.error is not None and "qemu:dirty-bitmap:b" in reply.error.message


def test_read_not_fully_covered_fails_the_request() -> None:
    core = ClientTransmission(STRUCTURED)
    cookie, _ = read(core, 0, 8)
    core.receive_data(data_chunk(cookie, 0, b"half", done=False) + chunk(cookie, ReplyType.NONE))
    reply = one_reply(core)
    assert reply.error is not None and reply.error.errno == Errno.EIO


def test_abandoned_read_does_not_touch_the_callers_buffer() -> None:
    core = ClientTransmission(STRUCTURED)
    cookie, buf = read(core, 0, 8)
    reply = data_chunk(cookie, 0, b"12345678")
    core.receive_data(reply[:-5])  # 3 data bytes arrived
    core.abandon(cookie)
    core.receive_data(reply[-5:])
    assert one_reply(core).error is None
    assert bytes(buf) == b"123" + b"\xaa" * 5


@pytest.mark.parametrize(("details", "make", "match"), [
    (STRUCTURED, lambda c: b"\xde\xad\xbe\xef" + bytes(12), "bad reply magic"),
    (STRUCTURED, lambda c: simple(c + 1000), "unknown cookie"),
    (STRUCTURED, lambda c: chunk(c + 1000, ReplyType.NONE), "unknown cookie"),
    (SIMPLE, lambda c: chunk(c, ReplyType.NONE), "not negotiated"),
    (STRUCTURED, lambda c: chunk(c, ReplyType.NONE, done=False), "without the DONE flag"),
    (STRUCTURED, lambda c: chunk(c, ReplyType.NONE, b"xx"), "NONE chunk with 2"),
    (STRUCTURED, lambda c: data_chunk(c, 4, b"123456789"), "outside the read"),
    (STRUCTURED, lambda c: data_chunk(c, 0, b""), "OFFSET_DATA chunk of 8"),
    (STRUCTURED, lambda c: hole_chunk(c, 0, 0), "OFFSET_HOLE 0\\+0"),
    (STRUCTURED, lambda c: hole_chunk(c, 0, 16), "outside the read"),
    (STRUCTURED, lambda c: chunk(c, ReplyType.OFFSET_HOLE, bytes(8)), "OFFSET_HOLE chunk of 8"),
    (STRUCTURED, lambda c: status_chunk(c, 1, [(8, 0)]), "BLOCK_STATUS chunk in the reply"),
    (STRUCTURED, lambda c: chunk(c, 3, b"abc"), "unknown chunk type 3"),
    (STRUCTURED, lambda c: error_chunk(c, 0), "error 0"),
    (STRUCTURED, lambda c: chunk(c, ReplyType.ERROR, b"\x00\x00\x00\x05\x00\x09ab"), "runs past"),
    (STRUCTURED, lambda c: error_chunk(c, 5, kind=ReplyType.ERROR_OFFSET, offset=4096),
     "outside its request"),
    (STRUCTURED, lambda c: data_chunk(c, 0, b"x" * 8, done=False) + simple(c), "middle of its chunks"),
])
def test_protocol_violations_are_sticky(details: ExportDetails, make: Any, match: str) -> None:
    core = ClientTransmission(details)
    cookie, _ = read(core, 0, 8)
    with pytest.raises(ProtocolError, match=match):
        core.receive_data(make(cookie))
    with pytest.raises(ProtocolError):
        core.want()
    with pytest.raises(ProtocolError):
        core.request(Cmd.FLUSH)


@pytest.mark.parametrize(("make", "match"), [
    (lambda c: status_chunk(c, 3, [(4096, 0)]), "unknown context id 3"),
    (lambda c: status_chunk(c, 1, [(4096, 0), (0, 0)]), "zero-length extent"),
    (lambda c: status_chunk(c, 1, [(1, 0)], done=False) + status_chunk(c, 1, [(1, 0)]), "two BLOCK_STATUS"),
    (lambda c: chunk(c, ReplyType.BLOCK_STATUS, bytes(10)), "BLOCK_STATUS chunk of 10"),
    (lambda c: data_chunk(c, 0, b"x"), "OFFSET_DATA in the reply to command 7"),
])
def test_block_status_violations(make: Any, match: str) -> None:
    core = ClientTransmission(STRUCTURED)
    cookie, _ = core.request(Cmd.BLOCK_STATUS, 0, 4096)
    with pytest.raises(ProtocolError, match=match):
        core.receive_data(make(cookie))


def test_truncated_reply_is_visible() -> None:
    """The core cannot see EOF; the I/O layer asks whether a reply was cut short."""
    core = ClientTransmission(STRUCTURED)
    cookie, _ = read(core, 0, 8)
    assert not core.mid_reply()
    whole = data_chunk(cookie, 0, b"12345678")
    for cut in (1, 10, 20, 27, len(whole) - 1):
        partial = ClientTransmission(STRUCTURED)
        c, _ = read(partial, 0, 8)
        assert c == cookie
        partial.receive_data(whole[:cut])
        assert partial.next_event() is NEED_DATA and partial.mid_reply(), cut
        assert partial.in_flight == 1


def test_want_and_advance_fill_the_callers_buffer_in_place() -> None:
    """The zero-copy path: after the header, want() *is* the caller's buffer."""
    core = ClientTransmission(STRUCTURED)
    cookie, buf = read(core, 0, 4096)
    core.receive_data(data_chunk(cookie, 0, b"")[:28] .replace(
        (8).to_bytes(4, "big"), (8 + 4096).to_bytes(4, "big"), 1))
    want = core.want()
    assert len(want) == 4096 and want.obj is memoryview(buf).obj
    want[:4096] = b"z" * 4096
    core.advance(4096)
    assert one_reply(core).error is None and bytes(buf) == b"z" * 4096


def test_request_building_rules() -> None:
    core = ClientTransmission(STRUCTURED)
    with pytest.raises(ValueError, match="buffer"):
        core.request(Cmd.READ, 0, 8)
    cookie, header = core.request(Cmd.WRITE, 512, 3, 1)
    assert header == wire.REQUEST_HEADER.pack(0x25609513, 1, Cmd.WRITE, cookie, 512, 3)
    with pytest.raises(ValueError, match="already in flight"):
        core.request(Cmd.FLUSH, cookie=cookie)
    with pytest.raises(ValueError, match="out of range"):
        core.request(Cmd.TRIM, 0, 1 << 32)
    other, _ = core.request(Cmd.FLUSH)
    assert other != cookie and other != 0
    core.request(Cmd.DISC)
    with pytest.raises(RuntimeError, match="DISC"):
        core.request(Cmd.FLUSH)


def test_first_error_chunk_is_the_one_reported() -> None:
    core = ClientTransmission(STRUCTURED)
    cookie, _ = read(core, 0, 8192)
    core.receive_data(error_chunk(cookie, Errno.EIO, b"first", kind=ReplyType.ERROR_OFFSET, offset=0,
                                  done=False)
                      + error_chunk(cookie, Errno.ENOMEM, b"second", kind=ReplyType.ERROR_OFFSET,
                                    offset=4096))
    reply = one_reply(core)
    assert reply.error is not None
    assert (reply.error.errno, reply.error.message, reply.error.offset) == (Errno.EIO, "first", 0)
