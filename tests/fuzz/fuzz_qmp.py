#!/usr/bin/env python3
"""Coverage-guided fuzzing of the sans-I/O QMP protocol (atheris).

Input layout: byte 0 seeds how the stream is cut into pieces (0: one piece),
byte 1 sets the largest message (64 << (byte & 7) bytes, so the size limit is
reached by small inputs), bytes 2.. are the client's stream; a final newline is
appended (it ends a trailing number).  The session is driven exactly as
``QmpServer._read_loop`` drives it; each ``Execute`` gets its arguments checked
against the command's schema (``commands.COMMANDS``), as ``execute`` does
before it runs anything, and is answered with the result of that check.

Checked:

* no exception escapes the decoder, the session or the schema checks
  (``QmpError`` is the schema's only refusal);
* the output is the greeting, then one line of JSON per input value (never
  NaN; ``Infinity`` is let through: a number beyond a double, ``1e999``, in
  an ``id`` is echoed as it came, as QEMU does), each ``{"return": ...}`` or ``{"error": {"class", "desc"}}``
  with the request's ``id`` echoed when it had one;
* no ``Execute`` before ``qmp_capabilities`` succeeded;
* a client's partial message is buffered up to the size limit only;
* when the stream is valid JSON text within the limits, the session sees
  exactly the values ``json`` sees (count, order, commands, arguments, ids).

Run: ``.venv/bin/python tests/fuzz/fuzz_qmp.py -max_len=65536 tests/fuzz/corpus/qmp``;
see tools/fuzz.sh.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from fuzz_harness import fuzz, instrumented, pieces  # the module beside this script

with instrumented(__name__):
    from nbdfleece.qmp.commands import COMMANDS, PACKAGE
    from nbdfleece.qmp.protocol import (
        MAX_NESTING,
        NEED_DATA,
        NO_ID,
        Closed,
        Execute,
        Phase,
        QmpSession,
        version_info,
    )
    from nbdfleece.qmp.schema import QmpError, check_arguments

WHITESPACE = " \t\r\n"
SCALAR_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+-.")


PIECE_SIZES = (1, 5, 64, 1024, 8192)
"""The longest pieces the stream is cut into (see fuzz_harness.pieces)."""


def _reject(name: str) -> Any:
    raise ValueError(f"not JSON: {name}")


def _infinity_only(name: str) -> Any:
    # A number too large for a double (1e999) is infinity, and an id is echoed
    # as it came: QEMU 7.2 prints it as "inf" (printf %.17g), we as Infinity.
    # NaN can never come out.
    if name == "NaN":
        raise ValueError("NaN in the output")
    return float(name)


def strict_json(line: bytes) -> Any:
    return json.loads(line, parse_constant=_infinity_only)


def depth(value: Any) -> int:
    """Nesting depth of objects and arrays, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, level)
            stack.extend((v, level + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def reference_values(stream: bytes, max_size: int) -> list[Any] | None:
    """The JSON values of ``stream`` per the json module, or None unless it is clean
    (valid UTF-8 JSON text, every value within the limits and self-delimiting)."""
    try:
        text = stream.decode("utf-8")
    except UnicodeDecodeError:
        return None
    decoder = json.JSONDecoder(parse_constant=_reject)
    values: list[Any] = []
    pos = 0
    while True:
        while pos < len(text) and text[pos] in WHITESPACE:
            pos += 1
        if pos == len(text):
            return values
        try:
            value, end = decoder.raw_decode(text, pos)
        except (ValueError, RecursionError):
            return None
        if len(text[pos:end].encode("utf-8", "surrogatepass")) > max_size:
            return None
        if depth(value) > min(MAX_NESTING, sys.getrecursionlimit() - 200):
            return None  # json's own recursion limit may cut in first, deeper in the stack
        # "12" "3" or "truefalse": a scalar must not run into the next one.
        if text[pos] not in '{["' and end < len(text) and text[end] in SCALAR_CHARS:
            return None
        values.append(value)
        pos = end


def run(seed: int, max_message: int, stream: bytes) -> tuple[bytes, list[tuple[int, Execute]], object]:
    """Drive a session; the output, each Execute with the index of its reply line,
    and the last event."""
    session = QmpSession(PACKAGE, max_message=max_message)
    out = bytearray(session.data_to_send())
    executes: list[tuple[int, Execute]] = []
    event: object = NEED_DATA
    for piece in pieces(seed, stream, PIECE_SIZES):
        session.receive_data(piece)
        while True:
            event = session.next_event()
            out += session.data_to_send()
            if event is NEED_DATA:
                assert session._decoder.buffered <= max_message + 1, "partial message over the limit"
                break
            if isinstance(event, Closed):
                return bytes(out), executes, event
            assert isinstance(event, Execute), event
            assert session.phase is Phase.COMMAND, "command before qmp_capabilities"
            assert isinstance(event.command, str) and isinstance(event.arguments, dict)
            executes.append((out.count(b"\n") - 1, event))
            command = COMMANDS.get(event.command)
            try:
                if command is None:
                    raise QmpError(f"The command {event.command} has not been found", "CommandNotFound")
                check_arguments(command.arguments, event.arguments)
            except QmpError as exc:
                assert isinstance(exc.desc, str) and isinstance(exc.error_class, str)
                session.send_error(event, exc.error_class, exc.desc)
            else:
                session.send_return(event, {"checked": event.command})
            out += session.data_to_send()
            emitted = session.encode_event({"event": "FUZZ", "data": {}})
            assert emitted is not None and strict_json(emitted) == {"event": "FUZZ", "data": {}}
    return bytes(out), executes, event


def check(data: bytes) -> None:
    if len(data) < 2:
        return
    seed, max_message, stream = data[0], 64 << (data[1] & 7), data[2:] + b"\n"
    out, executes, event = run(seed, max_message, stream)
    if isinstance(event, Closed):
        assert "too large" in event.reason
    lines = out.split(b"\n")
    assert lines.pop() == b"", "output does not end with a newline"
    greeting = strict_json(lines.pop(0))
    assert greeting == {"QMP": {"version": version_info(PACKAGE), "capabilities": []}}
    replies = [strict_json(line) for line in lines]
    negotiated = False
    for reply in replies:
        assert isinstance(reply, dict) and set(reply) - {"id"} in ({"return"}, {"error"}), reply
        if "error" in reply:
            error = reply["error"]
            assert set(error) == {"class", "desc"}, error
            assert isinstance(error["class"], str) and isinstance(error["desc"], str)
        elif reply["return"] == {}:
            negotiated = True
    if executes:
        assert negotiated
    for index, ex in executes:
        reply = replies[index]
        if ex.id is NO_ID:
            assert "id" not in reply
        else:
            assert reply.get("id") == ex.id
    values = reference_values(stream, max_message)
    if values is None:
        return
    assert len(replies) == len(values), (len(replies), len(values))
    for value, reply in zip(values, replies, strict=True):
        if isinstance(value, dict) and "id" in value:
            assert reply.get("id") == value["id"]
        else:
            assert "id" not in reply
    for index, ex in executes:
        value = values[index]
        assert value["execute"] == ex.command
        assert value.get("arguments", {}) == ex.arguments


MAX_LEN = 65536  # deep nesting and long strings
"""libFuzzer's -max_len unless given."""


def TestOneInput(data: bytes) -> None:
    check(data)


def main() -> None:
    fuzz(TestOneInput, MAX_LEN)


if __name__ == "__main__":
    main()
