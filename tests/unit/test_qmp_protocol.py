"""QMP without sockets: the stream decoder, the session, the schema checks, and
commands run in-process against a real daemon (transaction rollback)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from qemu.qmp.models import Greeting

from nbdfleece.daemon import Daemon
from nbdfleece.errors import ConfigError
from nbdfleece.exports import ExportRegistry
from nbdfleece.qmp import commands
from nbdfleece.qmp.events import EventBroadcaster, make_event
from nbdfleece.qmp.protocol import (
    NEED_DATA,
    NO_ID,
    Closed,
    DecodeError,
    Execute,
    Message,
    MessageDecoder,
    QmpSession,
    parse_json,
)
from nbdfleece.qmp.schema import (
    BOOL,
    STR,
    UINT32,
    Alternate,
    Enum,
    List,
    QmpError,
    Struct,
    Union,
    check_arguments,
)
from nbdfleece.qmp.server import OUTBOUND_QUEUE, open_qmp_listener, serve_qmp
from nbdfleece.server import Server

# -- the decoder -------------------------------------------------------------------------


def drain(decoder: MessageDecoder) -> list[Message | DecodeError]:
    items: list[Message | DecodeError] = []
    while (item := decoder.next_item()) is not None:
        items.append(item)
    return items


def values(items: list[Message | DecodeError]) -> list[Any]:
    return [i.value if isinstance(i, Message) else i for i in items]


def test_several_objects_in_one_chunk_with_any_whitespace() -> None:
    d = MessageDecoder()
    d.feed(b'{"a": 1}{"b": [2, {"c": "}"}]}  \r\n\t{"d": "x\\"}"}\n[1]  "s" 42 true\n')
    assert values(drain(d)) == [{"a": 1}, {"b": [2, {"c": "}"}]}, {"d": 'x"}'}, [1], "s", 42, True]
    assert d.buffered == 0


def test_fragments_byte_by_byte() -> None:
    stream = (
        b'{"execute": "block-dirty-bitmap-add", "arguments": {"node": "n{", "name": "\\u00e9\\\\\\""}}\n'
        + '{"id": "\u00e9[", "execute": "x"}'.encode()
    )
    d = MessageDecoder()
    got: list[Any] = []
    for i in range(len(stream)):
        d.feed(stream[i:i + 1])
        got += values(drain(d))
    assert got == [
        {"execute": "block-dirty-bitmap-add", "arguments": {"node": "n{", "name": 'é\\"'}},
        {"id": "é[", "execute": "x"},
    ]


def test_top_level_scalar_waits_for_its_end() -> None:
    d = MessageDecoder()
    d.feed(b"12")
    assert drain(d) == []
    d.feed(b"34 ")
    assert values(drain(d)) == [1234]


def test_malformed_then_valid() -> None:
    d = MessageDecoder()
    d.feed(b'{"execute": }\n{"execute": "x"}\n}\nnonsense\n{"a": NaN}\n{"b": 1}\n')
    items = drain(d)
    assert [i.desc for i in items if isinstance(i, DecodeError)] == [
        "JSON parse error, expecting value",
        "JSON parse error, expecting value",
        "JSON parse error, expecting value",
        "JSON parse error, invalid keyword 'NaN'",
    ]
    assert [i.value for i in items if isinstance(i, Message)] == [{"execute": "x"}, {"b": 1}]


def test_invalid_utf8_is_a_parse_error() -> None:
    d = MessageDecoder()
    d.feed(b'{"a": "\xff"}{"b": 2}')
    assert values(drain(d)) == [DecodeError("JSON parse error, invalid UTF-8 sequence"), {"b": 2}]


def test_oversized_message_is_refused_and_the_decoder_resyncs_at_the_next_newline() -> None:
    d = MessageDecoder(max_size=1000)
    d.feed(b'{"execute": "x", "arguments": {"pad": "' + b"a" * 600)
    assert drain(d) == []
    d.feed(b"a" * 600)
    assert drain(d) == [DecodeError("JSON message too large")]
    assert d.buffered == 0  # nothing of it is kept
    d.feed(b"a" * 5000 + b'"}} {"not": "this"}')
    assert drain(d) == []
    assert d.buffered == 0
    d.feed(b'\n{"execute": "after"}\n')
    assert values(drain(d)) == [{"execute": "after"}]


def test_oversized_message_received_whole() -> None:
    d = MessageDecoder(max_size=100)
    d.feed(b'{"pad": "' + b"b" * 200 + b'"}\n{"ok": 1}\n')
    assert values(drain(d)) == [DecodeError("JSON message too large"), {"ok": 1}]


def test_endless_message_without_newline_is_fatal() -> None:
    d = MessageDecoder(max_size=100, max_skip=1000)
    d.feed(b'"' + b"c" * 200)
    assert drain(d) == [DecodeError("JSON message too large")]
    d.feed(b"c" * 2000)
    assert drain(d) == [DecodeError("JSON message too large", fatal=True)]


def test_nesting_limit() -> None:
    d = MessageDecoder(max_depth=10)
    d.feed(b"[" * 11 + b"]" * 11 + b"\n[[1]]\n")
    assert values(drain(d)) == [DecodeError("JSON nesting depth limit exceeded"), [[1]]]


def nesting_depth(value: Any) -> int:
    """Nesting depth of objects and arrays: the QMP fuzz target's own counter."""
    from tests.fuzz.test_corpus_replay import load_target

    return int(load_target("qmp").depth(value))


def nested_request(depth: int) -> bytes:
    """A request whose objects and arrays nest ``depth`` levels (QEMU counts both)."""
    if depth == 1:
        return b'{"execute": "deep"}\n'
    inner = b"[" * (depth - 2) + b"]" * (depth - 2)
    return b'{"execute": "deep", "arguments": {"a": ' + inner + b"}}\n"


@pytest.mark.parametrize("depth", [1, 1000, 1024])
def test_nesting_up_to_qemus_limit_reaches_the_dispatcher(depth: int) -> None:
    """QEMU 7.2 (json-streamer.c MAX_NESTING) accepts 1024 levels; json's own
    recursion limit used to refuse from about 990."""
    session = QmpSession("p")
    feed(session, {"execute": "qmp_capabilities"})
    session.data_to_send()
    session.receive_data(nested_request(depth))
    event = session.next_event()
    assert isinstance(event, Execute) and event.command == "deep"
    assert nesting_depth({"execute": "deep", "arguments": event.arguments} if depth > 1 else {}) == depth
    assert replies(session) == []


def test_an_id_nested_to_the_limit_is_echoed() -> None:
    """The reply echoes the id, so encoding must reach MAX_NESTING levels as well."""
    session = QmpSession("p")
    session.data_to_send()
    deep_id = b"[" * 1023 + b"7" + b"]" * 1023
    session.receive_data(b'{"execute": "qmp_capabilities", "id": ' + deep_id + b"}\n")
    assert session.next_event() is NEED_DATA
    (reply,) = session.data_to_send().splitlines()
    assert reply == b'{"return": {}, "id": ' + deep_id + b"}"


@pytest.mark.parametrize("depth", [1025, 100000])
def test_nesting_beyond_qemus_limit_is_refused_and_the_session_goes_on(depth: int) -> None:
    limit = sys.getrecursionlimit()
    session = QmpSession("p")
    feed(session, {"execute": "qmp_capabilities"})
    session.data_to_send()
    session.receive_data(nested_request(depth) + b'{"execute": "after", "id": 2}\n')
    event = session.next_event()
    assert isinstance(event, Execute) and (event.command, event.id) == ("after", 2)
    assert replies(session) == [
        {"error": {"class": "GenericError", "desc": "JSON nesting depth limit exceeded"}},
    ]
    assert sys.getrecursionlimit() == limit


@pytest.mark.parametrize("depth", [1024, 100000])
def test_parse_json_alone_never_overflows(depth: int) -> None:
    """parse_json called without the decoder's depth check still ends in an error
    (a bounded recursion allowance), and leaves the recursion limit as it was."""
    limit = sys.getrecursionlimit()
    result = parse_json(b"[" * depth + b"]" * depth)
    if depth <= 1024:
        assert isinstance(result, Message) and nesting_depth(result.value) == depth
    else:
        assert result == DecodeError("JSON nesting depth limit exceeded")
    assert sys.getrecursionlimit() == limit


# -- the session -------------------------------------------------------------------------


def replies(session: QmpSession) -> list[Any]:
    return [json.loads(line) for line in session.data_to_send().splitlines()]


def test_greeting_shape_satisfies_qemu_qmp() -> None:
    session = QmpSession("nbdfleece test")
    (greeting,) = replies(session)
    assert greeting == {"QMP": {
        "version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "nbdfleece test"},
        "capabilities": [],
    }}
    Greeting(greeting)  # raises if the library would refuse it


def feed(session: QmpSession, *messages: Any) -> list[Execute]:
    session.receive_data(b"".join(json.dumps(m).encode() + b"\n" for m in messages))
    executed = []
    while (event := session.next_event()) is not NEED_DATA:
        assert isinstance(event, Execute)
        executed.append(event)
    return executed


def test_negotiation_then_commands_with_ids() -> None:
    session = QmpSession("p")
    session.data_to_send()
    assert feed(session, {"execute": "query-version", "id": 1}) == []
    assert replies(session) == [{"error": {
        "class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'",
    }, "id": 1}]
    assert feed(session, {"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}) == []
    assert replies(session) == [{"error": {"class": "GenericError", "desc": "Capability oob not available"}}]
    assert session.encode_event(make_event("X")) is None  # no events before negotiation
    executed = feed(
        session,
        {"execute": "qmp_capabilities", "id": None},
        {"execute": "query-version", "id": {"any": ["json"]}},
        {"execute": "query-commands"},
    )
    assert replies(session) == [{"return": {}, "id": None}]
    assert [(e.command, e.id) for e in executed] == [
        ("query-version", {"any": ["json"]}), ("query-commands", NO_ID),
    ]
    session.send_return(executed[0], {"v": 1})
    session.send_error(executed[1], "GenericError", "nope")
    assert replies(session) == [
        {"return": {"v": 1}, "id": {"any": ["json"]}},
        {"error": {"class": "GenericError", "desc": "nope"}},
    ]
    event = session.encode_event(make_event("BLOCK_EXPORT_DELETED", {"id": "e"}, now=12.5))
    assert event is not None and json.loads(event) == {
        "event": "BLOCK_EXPORT_DELETED", "data": {"id": "e"},
        "timestamp": {"seconds": 12, "microseconds": 500000},
    }


@pytest.mark.parametrize(("request_", "desc"), [
    ([1, 2], "QMP input must be a JSON object"),
    ("execute", "QMP input must be a JSON object"),
    ({"arguments": {}}, "QMP input lacks member 'execute'"),
    ({"execute": "x", "xyz": 1}, "QMP input member 'xyz' is unexpected"),
    ({"execute": 5}, "QMP input member 'execute' must be a string"),
    ({"execute": "x", "arguments": []}, "QMP input member 'arguments' must be an object"),
    ({"execute": "x", "exec-oob": "y"}, "QMP input member 'exec-oob' is unexpected"),
])
def test_envelope_errors(request_: Any, desc: str) -> None:
    session = QmpSession("p")
    feed(session, {"execute": "qmp_capabilities"})
    session.data_to_send()
    assert feed(session, request_) == []
    expected: dict[str, Any] = {"error": {"class": "GenericError", "desc": desc}}
    assert replies(session) == [expected]
    if isinstance(request_, dict):  # the id is echoed even for a malformed request
        assert feed(session, {**request_, "id": "i"}) == []
        assert replies(session) == [{**expected, "id": "i"}]


def test_protocol_errors_are_answered_in_input_order() -> None:
    session = QmpSession("p")
    session.data_to_send()
    session.receive_data(b'{"execute": "qmp_capabilities"} {"execute": "a"} [] {"execute": "b"} {bad}')
    first = session.next_event()
    assert isinstance(first, Execute) and first.command == "a"
    assert replies(session) == [{"return": {}}]
    session.send_return(first, None)
    second = session.next_event()
    assert isinstance(second, Execute) and second.command == "b"
    assert [next(iter(r)) for r in replies(session)] == ["return", "error"]
    session.send_return(second, [])
    assert session.next_event() is NEED_DATA
    assert replies(session) == [
        {"return": []},
        {"error": {"class": "GenericError",
                   "desc": "JSON parse error, expecting property name enclosed in double quotes"}},
    ]


def test_endless_input_closes_the_session() -> None:
    session = QmpSession("p")
    session._decoder = MessageDecoder(max_size=64, max_skip=1000)
    session.data_to_send()
    session.receive_data(b'{"execute": "' + b"x" * 100)
    assert session.next_event() is NEED_DATA
    assert replies(session) == [{"error": {"class": "GenericError", "desc": "JSON message too large"}}]
    session.receive_data(b"x" * 2000)
    assert isinstance(session.next_event(), Closed)
    assert isinstance(session.next_event(), Closed)


# -- the schema checks ---------------------------------------------------------------------

ADD = Struct("add", {"node": STR, "name": STR, "*granularity": UINT32, "*persistent": BOOL})


@pytest.mark.parametrize(("arguments", "desc"), [
    ({"node": "n"}, "Parameter 'name' is missing"),
    ({"name": "b"}, "Parameter 'node' is missing"),
    ({"node": "n", "name": 3}, "Invalid parameter type for 'name', expected: string"),
    ({"node": "n", "name": "b", "persistent": "yes"},
     "Invalid parameter type for 'persistent', expected: boolean"),
    ({"node": "n", "name": "b", "granularity": "x"}, "Parameter 'granularity' expects uint64"),
    ({"node": "n", "name": "b", "granularity": 1.5}, "Parameter 'granularity' expects uint64"),
    ({"node": "n", "name": "b", "granularity": True}, "Parameter 'granularity' expects uint64"),
    ({"node": "n", "name": "b", "granularity": 1 << 32}, "Parameter 'granularity' expects uint32_t"),
    ({"node": "n", "name": "b", "granularity": -1}, "Parameter 'granularity' expects uint32_t"),
    ({"node": "n", "name": "b", "xyz": 1}, "Parameter 'xyz' is unexpected"),
])
def test_struct_errors(arguments: dict[str, Any], desc: str) -> None:
    with pytest.raises(QmpError) as info:
        check_arguments(ADD, arguments)
    assert (info.value.error_class, info.value.desc) == ("GenericError", desc)


def test_struct_accepts_and_normalises() -> None:
    assert check_arguments(ADD, {"node": "n", "name": "b", "granularity": 1 << 31}) == {
        "node": "n", "name": "b", "granularity": 1 << 31,
    }
    with pytest.raises(QmpError, match="expected: object"):
        check_arguments(ADD, [])


OR_STR = Alternate("BlockDirtyBitmapOrStr", string=STR, obj=Struct("b", {"node": STR, "name": STR}))
ACTION = Union("Action", "type", branches={
    "clear": Struct("w", {"data": Struct("d", {"node": STR, "name": STR})}),
    "merge": Struct("m", {"data": Struct("d", {"bitmaps": List(OR_STR)})}),
})
TRANSACTION = Struct("t", {"actions": List(ACTION), "*mode": Enum("Mode", ("safe", "hard"))})


@pytest.mark.parametrize(("arguments", "desc"), [
    ({}, "Parameter 'actions' is missing"),
    ({"actions": {}}, "Invalid parameter type for 'actions', expected: array"),
    ({"actions": [5]}, "Invalid parameter type for 'actions[0]', expected: object"),
    ({"actions": [{"data": {}}]}, "Parameter 'actions[0].type' is missing"),
    ({"actions": [{"type": "nosuch"}]}, "Parameter 'type' does not accept value 'nosuch'"),
    ({"actions": [{"type": "clear"}]}, "Parameter 'actions[0].data' is missing"),
    ({"actions": [{"type": "clear", "data": {"node": "n"}}]}, "Parameter 'actions[0].data.name' is missing"),
    ({"actions": [{"type": "clear", "data": {"node": "n", "name": "b"}, "x": 1}]},
     "Parameter 'actions[0].x' is unexpected"),
    ({"actions": [{"type": "merge", "data": {"bitmaps": ["a", 5]}}]},
     "Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr"),
    ({"actions": [{"type": "merge", "data": {"bitmaps": [{"node": "n"}]}}]},
     "Parameter 'actions[0].data.bitmaps[0].name' is missing"),
    ({"actions": [], "mode": "soft"}, "Parameter 'mode' does not accept value 'soft'"),
    ({"actions": [], "mode": 1}, "Invalid parameter type for 'mode', expected: string"),
])
def test_nested_errors_name_the_full_path_as_qemu(arguments: dict[str, Any], desc: str) -> None:
    with pytest.raises(QmpError) as info:
        check_arguments(TRANSACTION, arguments)
    assert info.value.desc == desc


def test_every_command_is_in_the_table_with_a_schema() -> None:
    wanted = {
        "qmp_capabilities", "query-version", "query-commands", "block-dirty-bitmap-add",
        "block-dirty-bitmap-remove", "block-dirty-bitmap-clear", "block-dirty-bitmap-enable",
        "block-dirty-bitmap-disable", "block-dirty-bitmap-merge", "x-debug-block-dirty-bitmap-sha256",
        "query-named-block-nodes", "transaction", "blockdev-add", "blockdev-del", "block-export-add",
        "block-export-del", "query-block-exports", "nbd-server-start", "nbd-server-stop",
    }
    assert wanted <= set(commands.COMMANDS)
    assert "abort" not in commands.COMMANDS and "abort" in commands.ACTIONS


def test_sha256_is_qemus() -> None:
    # From the QEMU 7.2 transcript: 64 MiB, granularity 64 KiB, granules 0 and 32 dirty.
    packed = bytearray(128)
    packed[0] = packed[4] = 1
    assert commands.bitmap_digest(bytes(packed)) == (
        "baaf36d22dc28f002964f8e92f2d6e2e19c1bfb4681be7b5822e553bb336352d"
    )
    # QEMU hashes whole 64-bit words: a 3-byte bitmap is hashed as 8 bytes.
    assert commands.bitmap_digest(b"\x01\x00\x00") == hashlib.sha256(b"\x01" + bytes(7)).hexdigest()


def test_broadcaster_survives_a_failing_subscriber() -> None:
    events = EventBroadcaster()
    got: list[dict[str, Any]] = []

    def broken(event: dict[str, Any]) -> None:
        raise RuntimeError("boom")

    events.subscribe(broken)
    unsubscribe = events.subscribe(got.append)
    events.emit_event("E", {"k": 1})
    unsubscribe()
    events.emit_event("F")
    assert [(e["event"], e.get("data")) for e in got] == [("E", {"k": 1})]


# -- commands in-process ---------------------------------------------------------------------


@pytest.fixture
def daemon(tmp_path: Path) -> Daemon:
    image = tmp_path / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(4 << 20)
    d = Daemon(Server(ExportRegistry()))
    d.graph.add_file("live", str(image))
    return d


async def run(daemon: Daemon, command: str, /, **arguments: Any) -> Any:
    return await commands.execute(daemon, command, arguments)


async def run_error(daemon: Daemon, command: str, /, **arguments: Any) -> str:
    with pytest.raises(QmpError) as info:
        await commands.execute(daemon, command, arguments)
    return info.value.desc


def mark(daemon: Daemon, node: str, offset: int, length: int) -> None:
    daemon.graph.node(node).top.mark(offset, length)


async def test_transaction_rolls_back_every_applied_action(daemon: Daemon) -> None:
    await run(daemon, "block-dirty-bitmap-add", node="live", name="b1")
    await run(daemon, "block-dirty-bitmap-add", node="live", name="b2", disabled=True)
    mark(daemon, "live", 0, 1)
    before = {b["name"]: b for b in daemon.graph.bitmap_info(daemon.graph.node("live"))}
    assert before["b1"]["count"] == 65536 and before["b2"]["count"] == 0
    actions = [
        {"type": "block-dirty-bitmap-merge", "data": {"node": "live", "target": "b2", "bitmaps": ["b1"]}},
        {"type": "block-dirty-bitmap-clear", "data": {"node": "live", "name": "b1"}},
        {"type": "block-dirty-bitmap-add", "data": {"node": "live", "name": "new"}},
        {"type": "block-dirty-bitmap-enable", "data": {"node": "live", "name": "b2"}},
        {"type": "block-dirty-bitmap-remove", "data": {"node": "live", "name": "b1"}},
        {"type": "block-dirty-bitmap-remove", "data": {"node": "live", "name": "nosuch"}},
    ]
    assert await run_error(daemon, "transaction", actions=actions) == "Dirty bitmap 'nosuch' not found"
    after = {b["name"]: b for b in daemon.graph.bitmap_info(daemon.graph.node("live"))}
    assert after == before

    assert await run_error(daemon, "transaction", actions=[
        {"type": "block-dirty-bitmap-disable", "data": {"node": "live", "name": "b1"}},
        {"type": "abort", "data": {}},
    ]) == "Transaction aborted using Abort action"
    assert daemon.graph.bitmap("live", "b1").recording

    assert await run(daemon, "transaction", actions=actions[:3]) is None
    after = {b["name"]: b for b in daemon.graph.bitmap_info(daemon.graph.node("live"))}
    assert (after["b1"]["count"], after["b2"]["count"], "new" in after) == (0, 65536, True)


async def test_transaction_grouped_completion_mode_is_refused_for_bitmap_actions(daemon: Daemon) -> None:
    assert await run_error(daemon, "transaction", actions=[
        {"type": "block-dirty-bitmap-add", "data": {"node": "live", "name": "g"}},
    ], properties={"completion-mode": "grouped"}) == (
        "Action 'block-dirty-bitmap-add' does not support Transaction property completion-mode = grouped"
    )
    assert "g" not in daemon.graph.node("live").bitmaps


async def test_unknown_command_and_capabilities_again(daemon: Daemon) -> None:
    with pytest.raises(QmpError) as info:
        await commands.execute(daemon, "nosuch", {})
    assert (info.value.error_class, info.value.desc) == (
        "CommandNotFound", "The command nosuch has not been found",
    )
    with pytest.raises(QmpError) as info:
        await commands.execute(daemon, "qmp_capabilities", {})
    assert info.value.error_class == "CommandNotFound"


async def test_blockdev_add_inline_child_and_del(daemon: Daemon, tmp_path: Path) -> None:
    image = tmp_path / "other.raw"
    image.write_bytes(bytes(1 << 20))
    await run(daemon, "blockdev-add", driver="raw", **{"node-name": "fmt"},
              file={"driver": "file", "filename": str(image)})
    child = daemon.graph.node("fmt").children[0]
    assert child.name.startswith("#block") and child.implicit
    assert await run_error(daemon, "blockdev-del", **{"node-name": child.name}) == (
        f"Node {child.name} is not owned by the monitor"
    )
    assert await run_error(daemon, "blockdev-add", driver="file", filename=str(image)) == (
        "'node-name' must be specified for the root node"
    )
    assert await run_error(daemon, "blockdev-add", driver="file", filename=str(image),
                           **{"node-name": "1bad"}) == "Invalid node-name: '1bad'"
    assert await run_error(daemon, "blockdev-add", driver="file", filename=str(image),
                           **{"node-name": "live"}) == "Duplicate nodes with node-name='live'"
    assert await run_error(daemon, "blockdev-add", driver="vmdk", **{"node-name": "q"}) == (
        "Parameter 'driver' does not accept value 'vmdk'"
    )
    # A failed inline child creation leaves nothing behind.
    assert await run_error(daemon, "blockdev-add", driver="raw", **{"node-name": "r2"},
                           file={"driver": "file", "filename": str(tmp_path / "missing")}) == (
        f"Could not open '{tmp_path / 'missing'}': No such file or directory"
    )
    assert set(daemon.graph.nodes) == {"live", "fmt", child.name}
    await run(daemon, "blockdev-del", **{"node-name": "fmt"})
    assert set(daemon.graph.nodes) == {"live"}
    await daemon.close()


async def test_read_only_raw_over_writable_file(daemon: Daemon) -> None:
    await run(daemon, "blockdev-add", driver="raw", file="live", **{"node-name": "ro", "read-only": True})
    assert daemon.graph.node("ro").top.read_only and not daemon.graph.node("live").top.read_only
    assert await run_error(daemon, "blockdev-del", **{"node-name": "live"}) == "Block device live is in use"
    await run(daemon, "blockdev-del", **{"node-name": "ro"})
    await daemon.close()


# -- the listener and the trio edge, in-process -----------------------------------------------


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="qmpu", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_unix_listener_mode_stale_and_in_use(sock_dir: Path) -> None:
    path = sock_dir / "q.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays: a crash leftover
    listener = open_qmp_listener(f"unix:{path}")
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with pytest.raises(ConfigError, match="is in use by another process"):
            open_qmp_listener(f"unix:{path}")
    finally:
        listener.close()
    regular = sock_dir / "file"
    regular.write_bytes(b"keep me")
    with pytest.raises(ConfigError, match="not a socket"):
        open_qmp_listener(f"unix:{regular}")
    assert regular.read_bytes() == b"keep me"


@pytest.mark.parametrize("address", ["192.0.2.1:4444", "0.0.0.0:4444", "[::]:4444", "nonsense"])
def test_tcp_listener_refuses_non_loopback(address: str) -> None:
    with pytest.raises(ConfigError):
        open_qmp_listener(address)


async def test_tcp_listener_on_loopback() -> None:
    for address in ("127.0.0.1:0", "localhost:0"):
        open_qmp_listener(address).close()


async def read_line(stream: trio.SocketStream, buf: bytearray) -> bytes | None:
    while b"\n" not in buf:
        data = await stream.receive_some(65536)
        if not data:
            return None
        buf += data
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return line


async def test_a_client_that_does_not_read_its_events_is_dropped(daemon: Daemon, sock_dir: Path) -> None:
    path = sock_dir / "q.sock"
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_qmp, daemon, f"unix:{path}")
            slow = await trio.open_unix_socket(str(path))
            good = await trio.open_unix_socket(str(path))
            buffers = {id(slow): bytearray(), id(good): bytearray()}
            for stream in (slow, good):
                await stream.send_all(b'{"execute": "qmp_capabilities"}\n')
                assert (await read_line(stream, buffers[id(stream)])) is not None  # greeting
                assert await read_line(stream, buffers[id(stream)]) == b'{"return": {}}'
            # The good client keeps reading while bursts of events are emitted.
            received = 0

            async def reader() -> None:
                nonlocal received
                while (line := await read_line(good, buffers[id(good)])) is not None:
                    if b"BURST" not in line:
                        buffers[id(good)][:0] = line + b"\n"  # a reply: leave it for the test
                        return
                    received += 1

            nursery.start_soon(reader)
            emitted = 0
            pad = {"pad": "x" * 1000}  # fills the kernel's socket buffer sooner
            while len(daemon.events) == 2:  # until the slow client is dropped
                assert emitted < 50 * OUTBOUND_QUEUE
                for _ in range(OUTBOUND_QUEUE // 2):
                    daemon.events.emit_event("BURST", pad)
                emitted += OUTBOUND_QUEUE // 2
                while received < emitted:  # the good client's writer drains in between
                    await trio.sleep(0.001)
            # The slow one was disconnected: its stream ends after what was sent.
            while await read_line(slow, buffers[id(slow)]) is not None:
                pass
            await good.send_all(b'{"execute": "query-block-exports"}\n')
            while not buffers[id(good)]:
                await trio.sleep(0.001)
            assert await read_line(good, buffers[id(good)]) == b'{"return": []}'
            assert len(daemon.events) == 1
            nursery.cancel_scope.cancel()
    assert not path.exists()


@pytest.mark.parametrize(("addr", "spec"), [
    ({"type": "inet", "data": {"host": "127.0.0.1", "port": "10809"}}, "127.0.0.1:10809"),
    ({"type": "inet", "host": "::1", "port": "0"}, "[::1]:0"),
    ({"type": "unix", "data": {"path": "/run/n.sock"}}, "unix:/run/n.sock"),
    ({"type": "unix", "path": "/run/n.sock"}, "unix:/run/n.sock"),
])
def test_nbd_server_address_legacy_and_flat(addr: dict[str, Any], spec: str) -> None:
    args = check_arguments(commands.COMMANDS["nbd-server-start"].arguments, {"addr": addr})
    assert commands.listen_spec(args["addr"]) == spec


@pytest.mark.parametrize(("addr", "desc"), [
    ({"type": "inet", "data": {"host": "h"}}, "Parameter 'addr.data.port' is missing"),
    ({"type": "inet", "host": "h", "port": 10809},
     "Invalid parameter type for 'addr.port', expected: string"),
    ({"type": "fd", "str": "3"}, "Parameter 'type' does not accept value 'fd'"),
    ({"type": "unix", "data": {"path": "p"}, "x": 1}, "Parameter 'addr.x' is unexpected"),
])
def test_nbd_server_address_errors(addr: dict[str, Any], desc: str) -> None:
    with pytest.raises(QmpError) as info:
        check_arguments(commands.COMMANDS["nbd-server-start"].arguments, {"addr": addr})
    assert info.value.desc == desc
