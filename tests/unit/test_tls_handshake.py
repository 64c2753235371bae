"""STARTTLS in the sans-I/O handshake, and the pure half of nbdfleece.tls.

The handshake never sees TLS records: it acknowledges STARTTLS with a
:class:`StartTLS` event and is told the outcome with ``tls_established``.
These tests drive exactly that, byte by byte where it matters, and replay
``protocol/vectors/tls_exchanges.json`` (computed from the spec numbers).
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdfleece.constants import Info, Opt, Rep
from nbdfleece.errors import ConfigError
from nbdfleece.exports import ExportInfo
from nbdfleece.handshake import NEED_DATA, Closed, Negotiated, Phase, ServerHandshake, StartTLS
from nbdfleece.tls import (
    DistinguishedName,
    TlsMode,
    TlsPolicy,
    TlsSettings,
    load_server_tls,
    psk_supported,
    read_psk_file,
)
from tests.unit.test_golden import check_s2c, feed_c2s
from tests.unit.test_handshake import LIVE, RO, Directory, go_payload, meta_payload, option, replies

AGENT = DistinguishedName.parse("CN=backup-agent,O=nbdfleece test")
REQUIRED = TlsPolicy(TlsMode.REQUIRED)
OPTIONAL = TlsPolicy(TlsMode.OPTIONAL)


def started(policy: TlsPolicy | None, client_flags: int = 3) -> ServerHandshake:
    hs = ServerHandshake(Directory(LIVE, RO), policy)
    hs.data_to_send()
    hs.receive_data(struct.pack(">I", client_flags))
    assert hs.next_event() is NEED_DATA
    return hs


def feed(hs: ServerHandshake, data: bytes) -> tuple[object, bytes]:
    hs.receive_data(data)
    event = hs.next_event()
    return event, hs.data_to_send()


def start_tls(hs: ServerHandshake, peer: DistinguishedName | None = AGENT) -> None:
    event, out = feed(hs, option(Opt.STARTTLS))
    assert event == StartTLS(b"")
    assert replies(out) == [(Opt.STARTTLS, Rep.ACK, b"")]
    assert hs.phase is Phase.TLS
    hs.tls_established(peer)
    phase: Phase = hs.phase  # widen: mypy keeps the narrowing from before the call
    assert phase is Phase.OPTIONS and hs.tls_active and hs.peer == peer


# -- NOTLS -----------------------------------------------------------------------------


@pytest.mark.parametrize("policy", [None, TlsPolicy(TlsMode.OFF)])
@pytest.mark.parametrize("payload", [b"", b"x"])
def test_off_refuses_starttls_by_policy(policy: TlsPolicy | None, payload: bytes) -> None:
    hs = started(policy)
    event, out = feed(hs, option(Opt.STARTTLS, payload))
    assert event is NEED_DATA
    assert replies(out) == [(Opt.STARTTLS, Rep.ERR_POLICY, b"TLS not configured")]
    event, out = feed(hs, option(Opt.GO, go_payload("live")))
    assert isinstance(event, Negotiated)


# -- FORCEDTLS -------------------------------------------------------------------------

GATED = [
    (Opt.LIST, b""), (Opt.INFO, go_payload("live")), (Opt.GO, go_payload("live")),
    (Opt.STRUCTURED_REPLY, b""), (Opt.LIST_META_CONTEXT, meta_payload("live")),
    (Opt.SET_META_CONTEXT, meta_payload("live", "base:allocation")), (Opt.PEEK_EXPORT, b""),
    (Opt.EXTENDED_HEADERS, b""), (0x1234, b"abc"), (0, b""),
]


@pytest.mark.parametrize(("opt", "payload"), GATED, ids=[str(g[0]) for g in GATED])
def test_required_refuses_everything_but_starttls_and_abort(opt: int, payload: bytes) -> None:
    hs = started(REQUIRED)
    event, out = feed(hs, option(opt, payload))
    assert event is NEED_DATA
    got = replies(out)
    assert len(got) == 1 and got[0][:2] == (opt, Rep.ERR_TLS_REQD)
    assert got[0][2] == f"Option {opt:#x} not permitted before TLS".encode()
    assert b"live" not in out  # nothing about any export before TLS


def test_required_export_name_before_tls_closes_silently() -> None:
    hs = started(REQUIRED)
    event, out = feed(hs, option(Opt.EXPORT_NAME, b"live"))
    assert isinstance(event, Closed) and event.hard and out == b""


def test_required_abort_is_acknowledged() -> None:
    hs = started(REQUIRED)
    event, out = feed(hs, option(Opt.ABORT))
    assert isinstance(event, Closed) and not event.hard
    assert replies(out) == [(Opt.ABORT, Rep.ACK, b"")]


def test_required_non_fixed_client_cannot_do_tls() -> None:
    hs = started(REQUIRED, client_flags=0)
    event, out = feed(hs, option(Opt.EXPORT_NAME, b"live"))
    assert isinstance(event, Closed) and event.hard and out == b""


def test_required_oversized_option_is_tls_reqd() -> None:
    hs = started(REQUIRED)
    hs.receive_data(struct.pack(">QII", 0x49484156454F5054, Opt.LIST, 70000))
    assert hs.next_event() is NEED_DATA
    hs.receive_data(bytes(70000))
    assert hs.next_event() is NEED_DATA
    assert replies(hs.data_to_send())[0][:2] == (Opt.LIST, Rep.ERR_TLS_REQD)


def test_starttls_with_data_is_invalid_and_negotiation_goes_on() -> None:
    hs = started(REQUIRED)
    event, out = feed(hs, option(Opt.STARTTLS, b"\0"))
    assert event is NEED_DATA
    assert replies(out)[0][:2] == (Opt.STARTTLS, Rep.ERR_INVALID)
    start_tls(hs)


def test_after_tls_everything_is_served_and_starttls_is_invalid() -> None:
    hs = started(REQUIRED)
    start_tls(hs)
    for payload in (b"", b"x"):
        _, out = feed(hs, option(Opt.STARTTLS, payload))
        assert replies(out) == [(Opt.STARTTLS, Rep.ERR_INVALID, b"TLS already enabled")]
    _, out = feed(hs, option(Opt.LIST))
    assert [r[1] for r in replies(out)] == [Rep.SERVER, Rep.SERVER, Rep.ACK]
    feed(hs, option(Opt.STRUCTURED_REPLY))
    event, out = feed(hs, option(Opt.GO, go_payload("live", Info.NAME)))
    assert isinstance(event, Negotiated) and event.structured and event.flags == 0x0DED


def test_bytes_after_starttls_go_to_tls_not_to_options() -> None:
    """A client that does not wait for the ACK: its next bytes are TLS, never options."""
    hs = started(REQUIRED)
    hello = b"\x16\x03\x01\x00\x05hello" + option(Opt.LIST)
    event, out = feed(hs, option(Opt.STARTTLS) + hello)
    assert event == StartTLS(hello)
    assert replies(out) == [(Opt.STARTTLS, Rep.ACK, b"")]
    with pytest.raises(RuntimeError):
        hs.receive_data(b"more")
    with pytest.raises(RuntimeError):
        hs.next_event()
    hs.tls_established(None)
    assert hs.next_event() is NEED_DATA  # the LIST inside ``hello`` was not parsed
    assert hs.data_to_send() == b""


def test_tls_established_without_starttls_is_a_bug() -> None:
    with pytest.raises(RuntimeError):
        started(REQUIRED).tls_established(None)


# -- SELECTIVETLS ----------------------------------------------------------------------


def test_optional_forgets_plaintext_negotiation() -> None:
    hs = started(OPTIONAL)
    feed(hs, option(Opt.STRUCTURED_REPLY))
    _, out = feed(hs, option(Opt.SET_META_CONTEXT, meta_payload("live", "base:allocation")))
    assert replies(out)[0][1] == Rep.META_CONTEXT
    start_tls(hs)
    event, _ = feed(hs, option(Opt.GO, go_payload("live")))
    assert isinstance(event, Negotiated)
    assert not event.structured and event.contexts == {} and event.flags == 0x0D6D


def test_optional_serves_plaintext_clients() -> None:
    hs = started(OPTIONAL)
    _, out = feed(hs, option(Opt.LIST))
    assert [r[1] for r in replies(out)] == [Rep.SERVER, Rep.SERVER, Rep.ACK]
    event, _ = feed(hs, option(Opt.EXPORT_NAME, b"ro"))
    assert isinstance(event, Negotiated) and event.export.name == "ro"


def test_optional_tls_only_export() -> None:
    policy = TlsPolicy(TlsMode.OPTIONAL, tls_only=frozenset({"ro"}))
    hs = started(policy)
    _, out = feed(hs, option(Opt.LIST))
    assert [r[2][4:] for r in replies(out) if r[1] == Rep.SERVER] == [b"livelive disk"]
    for opt in (Opt.INFO, Opt.GO):
        _, out = feed(hs, option(opt, go_payload("ro")))
        assert replies(out) == [(opt, Rep.ERR_TLS_REQD, b"export 'ro' requires TLS")]
    feed(hs, option(Opt.STRUCTURED_REPLY))
    for opt in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
        _, out = feed(hs, option(opt, meta_payload("ro")))
        assert replies(out)[0][:2] == (opt, Rep.ERR_POLICY)  # TLS_REQD is for INFO/GO only
    _, out = feed(hs, option(Opt.INFO, go_payload("live")))
    assert replies(out)[-1][1] == Rep.ACK
    start_tls(hs, None)
    _, out = feed(hs, option(Opt.LIST))
    assert len([r for r in replies(out) if r[1] == Rep.SERVER]) == 2
    event, _ = feed(hs, option(Opt.GO, go_payload("ro")))
    assert isinstance(event, Negotiated) and event.export.name == "ro"


def test_optional_tls_only_export_name_before_tls_closes() -> None:
    hs = started(TlsPolicy(TlsMode.OPTIONAL, tls_only=frozenset({"live"})))
    event, out = feed(hs, option(Opt.EXPORT_NAME, b""))  # the default export is 'live'
    assert isinstance(event, Closed) and event.hard and out == b""


# -- allow-lists -----------------------------------------------------------------------


def allow(**lists: list[str]) -> TlsPolicy:
    return TlsPolicy(TlsMode.REQUIRED, allow={
        name: tuple(DistinguishedName.parse(p) for p in patterns) for name, patterns in lists.items()
    })


def test_allow_list_admits_a_matching_subject() -> None:
    hs = started(allow(live=["CN=someone-else", "CN=backup-agent"]))
    start_tls(hs)
    _, out = feed(hs, option(Opt.LIST))
    assert len([r for r in replies(out) if r[1] == Rep.SERVER]) == 2
    event, _ = feed(hs, option(Opt.EXPORT_NAME, b"live"))
    assert isinstance(event, Negotiated)


@pytest.mark.parametrize("peer", [DistinguishedName.parse("CN=intruder,O=nbdfleece test"), None])
def test_allow_list_refuses_other_subjects(peer: DistinguishedName | None) -> None:
    hs = started(allow(live=["CN=backup-agent", "/O=other/CN=x"]))
    start_tls(hs, peer)
    _, out = feed(hs, option(Opt.LIST))
    assert [r[2] for r in replies(out) if r[1] == Rep.SERVER] == [struct.pack(">I", 2) + b"ro"]
    for opt, payload in [(Opt.INFO, go_payload("live")), (Opt.GO, go_payload("")),
                         (Opt.LIST_META_CONTEXT, meta_payload("live"))]:
        if opt == Opt.LIST_META_CONTEXT:
            feed(hs, option(Opt.STRUCTURED_REPLY))
        _, out = feed(hs, option(opt, payload))
        got = replies(out)
        assert len(got) == 1 and got[0][:2] == (opt, Rep.ERR_POLICY), got
        assert b"not allowed to use export 'live'" in got[0][2]
    event, _ = feed(hs, option(Opt.GO, go_payload("ro")))
    assert isinstance(event, Negotiated) and event.export.name == "ro"


def test_allow_list_export_name_closes() -> None:
    hs = started(allow(live=["CN=nobody"]))
    start_tls(hs)
    event, out = feed(hs, option(Opt.EXPORT_NAME, b"live"))
    assert isinstance(event, Closed) and event.hard and out == b""


def test_allow_listed_export_is_tls_only_in_optional_mode() -> None:
    policy = TlsPolicy(TlsMode.OPTIONAL, allow={"live": (AGENT,)})
    hs = started(policy)
    _, out = feed(hs, option(Opt.GO, go_payload("live")))
    assert replies(out)[0][:2] == (Opt.GO, Rep.ERR_TLS_REQD)


# -- properties ------------------------------------------------------------------------

OPTIONS = st.sampled_from([*Opt, 0, 12, 0x1234, 0xFFFFFFFF])
STEP = st.one_of(st.tuples(OPTIONS, st.binary(max_size=32)), st.just("tls"))


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(STEP, max_size=10), mode=st.sampled_from([TlsMode.OPTIONAL, TlsMode.REQUIRED]),
       tls_only=st.sets(st.sampled_from(["live", "ro"])), allowed=st.booleans())
def test_no_export_facts_leak_before_tls(
    steps: list[tuple[int, bytes] | str], mode: TlsMode, tls_only: set[str], allowed: bool
) -> None:
    """Any sequence: before TLS nothing about a TLS-only export (all, when required) leaves;
    every option is answered or ends negotiation; STARTTLS always works before TLS."""
    policy = TlsPolicy(mode, frozenset(tls_only),
                       {"ro": (AGENT if allowed else DistinguishedName.parse("CN=x"),)})
    hs = started(policy)
    secret = {"live", "ro"} if mode is TlsMode.REQUIRED else tls_only | {"ro"}
    for step in steps:
        if hs.phase is Phase.DONE:
            break
        if isinstance(step, str):
            event, out = feed(hs, option(Opt.STARTTLS))
            if hs.tls_active:
                assert replies(out)[0][:2] == (Opt.STARTTLS, Rep.ERR_INVALID)
                continue
            assert isinstance(event, StartTLS)
            hs.tls_established(AGENT)
            continue
        opt, payload = step
        event, out = feed(hs, option(opt, payload))
        if isinstance(event, StartTLS):
            assert (opt, payload, replies(out)) == (Opt.STARTTLS, b"", [(opt, Rep.ACK, b"")])
            hs.tls_established(AGENT)
            continue
        if not hs.tls_active:
            for name in secret:
                assert struct.pack(">I", len(name)) + name.encode() not in out, (name, out)
            if mode is TlsMode.REQUIRED and opt not in (Opt.STARTTLS, Opt.ABORT):
                assert event is NEED_DATA or (opt == Opt.EXPORT_NAME and isinstance(event, Closed))
                assert all(r[1] == Rep.ERR_TLS_REQD for r in replies(out))
            if isinstance(event, Negotiated):
                assert event.export.name not in secret
        if isinstance(event, Negotiated) and hs.tls_active:
            assert event.export.name != "ro" or allowed
        if event is NEED_DATA:
            got = replies(out)
            assert got and (got[-1][1] == Rep.ACK or got[-1][1] & (1 << 31))
        else:
            assert isinstance(event, Negotiated | Closed)


@settings(max_examples=100, deadline=None)
@given(cut=st.integers(min_value=0, max_value=200))
def test_starttls_split_anywhere(cut: int) -> None:
    """STARTTLS followed by TLS bytes, delivered in two pieces cut anywhere."""
    script = struct.pack(">I", 3) + option(Opt.STARTTLS) + b"\x16\x03\x01TLS-bytes"
    hs = ServerHandshake(Directory(LIVE, RO), REQUIRED)
    hs.data_to_send()
    cut = min(cut, len(script))
    pending = b""
    for piece in (script[:cut], script[cut:]):
        if hs.phase is Phase.TLS:
            pending += piece
            continue
        hs.receive_data(piece)
        event = hs.next_event()
        if isinstance(event, StartTLS):
            pending += event.pending
    assert hs.phase is Phase.TLS
    assert pending == b"\x16\x03\x01TLS-bytes"


# -- golden vectors --------------------------------------------------------------------

VECTORS = Path(__file__).parents[2] / "protocol" / "vectors" / "tls_exchanges.json"
TLS_EXCHANGES: dict[str, Any] = json.loads(VECTORS.read_text())
TLS_SCENARIOS: list[dict[str, Any]] = TLS_EXCHANGES["scenarios"]


def scenario_policy(scenario: dict[str, Any]) -> TlsPolicy:
    tls = scenario["tls"]
    return TlsPolicy(
        TlsMode(tls["mode"]), frozenset(tls.get("tls_only", [])),
        {name: tuple(DistinguishedName.parse(p) for p in patterns)
         for name, patterns in tls.get("allow", {}).items()},
    )


def vector_directory() -> Directory:
    exports = [ExportInfo(e["name"], e["size"], not e["writable"], e["description"] or "")
               for e in TLS_EXCHANGES["exports"]]
    assert exports[0].name == TLS_EXCHANGES["default_export"]
    return Directory(*exports)


@pytest.mark.parametrize("scenario", TLS_SCENARIOS, ids=[s["name"] for s in TLS_SCENARIOS])
@pytest.mark.parametrize("trickle", [False, True], ids=["whole", "trickle"])
def test_handshake_replays_tls_exchange(scenario: dict[str, Any], trickle: bool) -> None:
    hs = ServerHandshake(vector_directory(), scenario_policy(scenario))
    pending = hs.data_to_send()
    event: object = NEED_DATA
    subject = DistinguishedName.parse(TLS_EXCHANGES["client_subject"])
    for step in scenario["steps"]:
        if step["dir"] == "tls":
            assert isinstance(event, StartTLS) and event.pending == b"" and pending == b""
            hs.tls_established(subject)
            event = NEED_DATA
        elif step["dir"] == "c2s":
            if event is not NEED_DATA:
                break  # transmission: the interop replay covers it
            event, sent = feed_c2s(hs, step, trickle)
            pending += sent
        else:
            if isinstance(event, Negotiated | Closed) and not pending:
                break
            pending = pending[check_s2c(step, pending):]
    assert pending == b""
    if isinstance(event, Closed):
        assert scenario["end"] == "server_closes"


def test_vectors_cover_the_tls_rules() -> None:
    names = {s["name"] for s in TLS_SCENARIOS}
    assert {"t1_required_refuses_before_tls", "t3_required_starttls_then_negotiate",
            "t4_optional_tls_only_export", "t5_allow_list_refuses_other_subjects"} <= names
    assert all(s["tls"]["mode"] in ("optional", "required") for s in TLS_SCENARIOS)


# -- distinguished names, policy, settings ----------------------------------------------


@pytest.mark.parametrize(("text", "pairs"), [
    ("CN=backup-agent", (("CN", "backup-agent"),)),
    ("cn = agent , o=Example", (("CN", "agent"), ("O", "Example"))),
    ("/O=Example/CN=agent", (("CN", "agent"), ("O", "Example"))),
    ("CN=a\\,b+OU=x", (("CN", "a,b"), ("OU", "x"))),
    ("commonName=x,emailAddress=a@b", (("CN", "x"), ("EMAIL", "a@b"))),
    ("CN=caf\\C3\\A9", (("CN", "café"),)),
])
def test_distinguished_name_parse(text: str, pairs: tuple[tuple[str, str], ...]) -> None:
    dn = DistinguishedName.parse(text)
    assert dn.pairs == pairs
    assert DistinguishedName.parse(str(dn)) == dn


@pytest.mark.parametrize("text", ["", "CN", "=x", "CN=x,", "CN=", "CN=x\\"])
def test_distinguished_name_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        DistinguishedName.parse(text)


def test_subject_from_peercert_and_matching() -> None:
    cert = {"subject": ((("countryName", "GB"),), (("organizationName", "nbdfleece test"),),
                        (("commonName", "backup-agent"),))}
    peer = DistinguishedName.from_peercert(cert)
    assert peer is not None and str(peer) == "CN=backup-agent,O=nbdfleece test,C=GB"
    assert peer.matches(DistinguishedName.parse("CN=backup-agent"))
    assert peer.matches(DistinguishedName.parse("/O=nbdfleece test/CN=backup-agent"))
    assert not peer.matches(DistinguishedName.parse("CN=backup-agent,O=other"))
    assert not peer.matches(DistinguishedName.parse("CN=backup"))
    assert DistinguishedName.from_peercert(None) is None
    assert DistinguishedName.from_peercert({}) is None


def test_policy_rules() -> None:
    policy = TlsPolicy(TlsMode.OPTIONAL, frozenset({"a"}), {"b": (AGENT,)})
    assert policy.needs_tls("a") and policy.needs_tls("b") and not policy.needs_tls("c")
    assert policy.permits("a", None) and policy.permits("b", AGENT)
    assert not policy.permits("b", None)
    assert TlsPolicy(TlsMode.REQUIRED).needs_tls("c")


@pytest.mark.parametrize(("settings_", "kwargs", "message"), [
    (TlsSettings(mode=TlsMode.OFF, cert="c.pem"), {}, "--tls is off"),
    (TlsSettings(), {"tls_only": ["live"]}, "need --tls optional or required"),
    (TlsSettings(mode=TlsMode.REQUIRED), {}, "needs a certificate"),
    (TlsSettings(cert="c.pem", key="k.pem"), {"allow": {"live": ["CN=x"]}}, "client certificate"),
    (TlsSettings(psk="keys.psk", cert="c.pem"), {}, "cannot be combined"),
    (TlsSettings(cert="c.pem", key="k.pem", ca="ca.pem"), {"allow": {"live": ["CN"]}}, "tls-allow"),
])
def test_settings_inconsistencies_are_config_errors(
    settings_: TlsSettings, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_server_tls(settings_, **kwargs)


def test_settings_modes_and_merge() -> None:
    assert TlsSettings().effective_mode() is TlsMode.OFF
    assert TlsSettings(creds_dir="d").effective_mode() is TlsMode.REQUIRED
    assert TlsSettings(mode=TlsMode.OPTIONAL, psk="p").effective_mode() is TlsMode.OPTIONAL
    merged = TlsSettings(mode=TlsMode.OPTIONAL, cert="a").merged(TlsSettings(cert="b", key="k"))
    assert merged == TlsSettings(mode=TlsMode.OPTIONAL, cert="b", key="k")
    assert load_server_tls(TlsSettings()) is None


def test_missing_certificate_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot load TLS certificate"):
        load_server_tls(TlsSettings(cert=str(tmp_path / "c.pem"), key=str(tmp_path / "k.pem")))
    with pytest.raises(ConfigError, match=r"server-cert\.pem: No such file"):
        load_server_tls(TlsSettings(creds_dir=str(tmp_path)))


def test_psk_file_format(tmp_path: Path) -> None:
    path = tmp_path / "keys.psk"
    path.write_text("# comment\nagent:0011aabb\n\nother:ff\n")
    assert read_psk_file(str(path)) == {"agent": bytes.fromhex("0011aabb"), "other": b"\xff"}
    path.write_text("agent:nothex\n")
    with pytest.raises(ConfigError, match="IDENTITY:HEXKEY"):
        read_psk_file(str(path))


@pytest.mark.skipif(sys.version_info >= (3, 13), reason="Python 3.13+ has a PSK API")
def test_psk_needs_python_313(tmp_path: Path) -> None:
    path = tmp_path / "keys.psk"
    path.write_text("agent:0011aabb\n")
    assert psk_supported() is not None
    with pytest.raises(ConfigError, match=r"TLS-PSK needs Python 3\.13"):
        load_server_tls(TlsSettings(psk=str(path)))


def test_policy_refusals_are_reported_for_the_logs() -> None:
    hs = started(TlsPolicy(TlsMode.OPTIONAL, tls_only=frozenset({"ro"}), allow={"live": (AGENT,)}))
    feed(hs, option(Opt.INFO, go_payload("ro")))
    feed(hs, option(Opt.INFO, go_payload("nosuch")))  # unknown: not a policy refusal
    assert hs.take_denials() == ["export 'ro' requires TLS (option 6)"]
    assert hs.take_denials() == []
    start_tls(hs, DistinguishedName.parse("CN=other"))
    feed(hs, option(Opt.GO, go_payload("live")))
    assert hs.take_denials() == ["'CN=other' is not allowed to use export 'live' (option 7)"]


# -- the edge's refusal of plaintext on the network ------------------------------------


def listener(family: int, address: str) -> Any:
    import socket

    import trio

    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((address, 0))
    return trio.socket.from_stdlib_socket(sock)


async def test_plaintext_is_refused_on_non_loopback_addresses() -> None:
    import socket
    import ssl

    from nbdfleece.exports import ExportRegistry
    from nbdfleece.server import Server
    from nbdfleece.tls import ServerTls

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    required = ServerTls(context, REQUIRED, False, "test")
    optional = ServerTls(context, OPTIONAL, False, "test")
    loop, anywhere = listener(socket.AF_INET, "127.0.0.1"), listener(socket.AF_INET, "0.0.0.0")
    try:
        strict, lax = Server(ExportRegistry()), Server(ExportRegistry(), allow_plaintext_network=True)
        assert strict.check_listener(loop) is None
        with pytest.raises(ValueError, match=r"refusing to serve NBD without TLS on 0\.0\.0\.0:"):
            strict.check_listener(anywhere)
        assert "--allow-plaintext-network" in (lax.check_listener(anywhere) or "")
        assert strict.check_listener(anywhere, required) is None
        assert "tls-only" in (strict.check_listener(anywhere, optional) or "")
        assert Server(ExportRegistry(), tls=required).check_listener(anywhere) is None
    finally:
        loop.close()
        anywhere.close()
