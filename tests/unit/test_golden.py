"""Golden byte vectors from protocol/vectors, replayed through wire.py and the core.

The vectors were computed from the NBD specification, not from this code, so
they check the construct declarations, the derived fast codecs and the
handshake core independently.  The whole exchanges (transmission included)
are also replayed against the real server in tests/interop/test_golden_exchanges.py.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from nbdfleece import wire
from nbdfleece.exports import ExportInfo
from nbdfleece.handshake import NEED_DATA, Closed, Negotiated, ServerHandshake

VECTORS = Path(__file__).parents[2] / "protocol" / "vectors"
STRUCTURES = json.loads((VECTORS / "structures.json").read_text())["vectors"]
EXCHANGES = json.loads((VECTORS / "exchanges.json").read_text())

# Vector field names -> wire.py field names; *_length/n_* are wire counts.
ALIASES = {
    "client_flags": "flags",
    "reply_type": "type",
    "hole_size": "length",
    "export_name": "name",
    "requests": "info_requests",
}
COUNTS = {"name_length": "name", "n_requests": "requests", "n_queries": "queries",
          "message_length": "message"}
FAST_CODECS = {
    "greeting": wire.GREETING,
    "client_flags": wire.CLIENT_FLAGS,
    "option_request_header": wire.OPTION_REQUEST_HEADER,
    "option_reply_header": wire.OPTION_REPLY_HEADER,
    "request_header": wire.REQUEST_HEADER,
    "simple_reply": wire.SIMPLE_REPLY,
    "structured_reply_header": wire.STRUCTURED_REPLY_HEADER,
    "offset_data_prefix": wire.OFFSET_DATA_PREFIX,
    "offset_hole": wire.OFFSET_HOLE,
    "info_export": wire.INFO_EXPORT,
    "info_block_size": wire.INFO_BLOCK_SIZE,
}


def expected_fields(vector: dict[str, Any]) -> dict[str, Any]:
    """Vector fields in wire.py's vocabulary (strings as bytes, counts checked)."""
    fields: dict[str, Any] = dict(vector["fields"])
    for count, target in COUNTS.items():
        if count in fields:
            n = fields.pop(count)
            value = fields[target] if target in fields else fields["export_name"]
            assert n == (len(value.encode()) if isinstance(value, str) else len(value))
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if key in ("info_type", "zeroes"):
            continue
        name = ALIASES.get(key, key)
        if name == "queries":
            value = [q.encode() for q in value]
        elif isinstance(value, str):
            value = value.encode()
        elif name == "extents":
            value = [{"length": n, "flags": f} for n, f in value]
        out[name] = value
    return out


def plain(obj: Any) -> Any:
    """construct Containers/ListContainers -> dicts/lists without metadata."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items() if not k.startswith("_")}
    if isinstance(obj, list):
        return [plain(v) for v in obj]
    return obj


@pytest.mark.parametrize("vector", STRUCTURES, ids=[v["name"] for v in STRUCTURES])
def test_structure_vector(vector: dict[str, Any]) -> None:
    data = bytes.fromhex(vector["hex"])
    name = vector["structure"]
    fmt = getattr(wire, name)
    if name == "export_name_reply":
        zeroes = vector["fields"]["zeroes"]
        assert len(data) == 10 + (124 if zeroes else 0)
        assert data[10:] == bytes(124 if zeroes else 0)
        data = data[:10]
    parsed = plain(fmt.parse(data))
    want = expected_fields(vector)
    for key, value in want.items():
        if key == "magic" and key not in parsed:
            continue
        assert parsed.get(key, parsed.get("nbdmagic" if key == "magic" else key)) == value, key
    assert fmt.build(parsed) == data
    codec = FAST_CODECS.get(name)
    if codec is not None:
        assert codec.size == len(data)
        assert codec.pack(*codec.unpack(data)) == data


def test_every_structure_has_vectors() -> None:
    names = {v["structure"] for v in STRUCTURES}
    for name in names:
        assert hasattr(wire, name), name
    assert len(names) >= 21


def directory() -> Any:
    exports = {
        e["name"]: ExportInfo(e["name"], e["size"], not e["writable"], e["description"] or "")
        for e in EXCHANGES["exports"]
    }

    class Directory:
        def lookup(self, name: str) -> ExportInfo | None:
            return exports.get(name or EXCHANGES["default_export"])

        def listing(self) -> list[tuple[str, str]]:
            return [(e.name, e.description) for e in exports.values()]

    return Directory()


def check_s2c(step: dict[str, Any], got: bytes) -> int:
    """Assert ``got`` starts with the step; return how many bytes it used."""
    if "hex" in step:
        want = bytes.fromhex(step["hex"])
        assert got[: len(want)] == want, step["note"]
        return len(want)
    prefix = bytes.fromhex(step["hex_prefix"])
    assert got[: len(prefix)] == prefix, step["note"]
    length: int
    (length,) = struct.unpack_from(">I", got, len(prefix))
    text = got[len(prefix) + 4 : len(prefix) + 4 + length]
    if "error" in step:  # structured ERROR chunk: error, msglen, message
        error, msglen = struct.unpack_from(">IH", text)
        assert error == step["error"]
        assert msglen == length - 6 and 1 <= msglen <= 4096
        text = text[6:]
    assert len(text) >= 1
    text.decode("utf-8")
    return len(prefix) + 4 + length


def feed_c2s(hs: ServerHandshake, step: dict[str, Any], trickle: bool) -> tuple[object, bytes]:
    """Feed a client step to the handshake, whole or one byte at a time, until it has an
    event: ``(that event or NEED_DATA, the bytes it sent meanwhile)``."""
    data = bytes.fromhex(step["hex"])
    event: object = NEED_DATA
    sent = b""
    for chunk in [data[i : i + 1] for i in range(len(data))] if trickle else [data]:
        hs.receive_data(chunk)
        event = hs.next_event()
        sent += hs.data_to_send()
        if event is not NEED_DATA:
            break
    return event, sent


SCENARIOS = EXCHANGES["scenarios"]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s["name"] for s in SCENARIOS])
@pytest.mark.parametrize("trickle", [False, True], ids=["whole", "trickle"])
def test_handshake_replays_exchange(scenario: dict[str, Any], trickle: bool) -> None:
    """Feed the client steps to the pure handshake until negotiation ends."""
    hs = ServerHandshake(directory())
    pending = hs.data_to_send()
    event: object = NEED_DATA
    for step in scenario["steps"]:
        if step["dir"] == "c2s":
            if event is not NEED_DATA:
                break  # transmission phase: the interop replay covers it
            event, sent = feed_c2s(hs, step, trickle)
            pending += sent
        else:
            if event is not NEED_DATA and not pending:
                break  # transmission replies
            used = check_s2c(step, pending)
            pending = pending[used:]
    assert pending == b"", "the handshake sent bytes the scenario does not expect"
    if isinstance(event, Closed):
        assert scenario["end"] == "server_closes"
    else:
        assert event is NEED_DATA or isinstance(event, Negotiated)
