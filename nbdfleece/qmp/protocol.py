"""The QEMU Machine Protocol, sans I/O: bytes in, requests out, replies as bytes.

Theory of operation
-------------------
A connection starts with the server's greeting and is in *capabilities
negotiation* mode, where only ``qmp_capabilities`` is accepted; after it,
in *command* mode, every request is handed to the caller::

    server                              client
    {"QMP": {"version": ..., "capabilities": []}}
                                        {"execute": "qmp_capabilities"}
    {"return": {}}
                                        {"execute": "query-version", "id": 7}
    {"return": {...}, "id": 7}
    {"event": "BLOCK_EXPORT_DELETED", "data": {"id": "e"}, "timestamp": {...}}

Input is a stream of JSON objects with any whitespace between them (clients
send one per line).  :class:`MessageDecoder` finds where each value ends by
tracking strings and bracket depth, with a regex jump to the next byte that
matters, so a megabyte-long string costs a few ``re.search`` calls, not a
Python loop per byte.  Each value is bounded (``max_size``, default 1 MiB,
and 1024 levels of nesting): a longer one gets ``JSON message too large``
and the decoder skips to the next newline, where the next message is
expected to start; a client that sends far more without any newline is
disconnected.  Malformed JSON gets ``JSON parse error, ...`` and the session
goes on with the next value.

:class:`QmpSession` is used h11 style::

    session.receive_data(data)
    while (event := session.next_event()) is not NEED_DATA:
        ...                                  # Execute: run it, then
        session.send_return(event, result)   # or send_error(event, cls, desc)
    transport.write(session.data_to_send())

Protocol-level errors (bad JSON, a non-object, a missing ``execute``,
commands before negotiation) are answered by the session itself, in input
order, before the next :class:`Execute` is returned.
"""

from __future__ import annotations

import contextlib
import enum
import json
import re
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from nbdfleece.qmp.schema import JSON, Enum, List, QmpError, Struct, check_arguments

MAX_MESSAGE = 1 << 20
"""Largest JSON value accepted from a client, in bytes."""
MAX_NESTING = 1024
"""Deepest nesting of objects and arrays accepted (QEMU's MAX_NESTING)."""
_SHALLOW = 256
"""Values with at most this many ``[`` and ``{`` parse within the default recursion limit."""
_RECURSION_HEADROOM = MAX_NESTING + 64
"""Extra recursion allowed around ``json``: its C scanner and encoder spend one level per
nesting level, and the default limit (1000) counts the caller's frames as well."""
_RECURSION_LOCK = threading.Lock()
MAX_SKIP = 64 << 20
"""After an oversized message, bytes skipped looking for a newline before giving up."""

QEMU_VERSION = (7, 2, 0)
"""The QEMU version we speak the protocol (and error texts) of."""

CAPABILITIES_ARGS = Struct("qmp_capabilities", {"*enable": List(Enum("QMPCapability", ("oob",)))})
OFFERED_CAPABILITIES: tuple[str, ...] = ()
"""We offer no capability: out-of-band execution makes no sense for our commands."""

_WHITESPACE = b" \t\r\n"
_NOT_WHITESPACE = re.compile(rb"[^ \t\r\n]")
_STRUCTURE = re.compile(rb'[{}\[\]"]')
_IN_STRING = re.compile(rb'["\\]')
_SCALAR_END = re.compile(rb"[^A-Za-z0-9+\-.]")


# -- decoding -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Message:
    """One complete JSON value from the client."""

    value: JSON


@dataclass(frozen=True, slots=True)
class DecodeError:
    """Input that is not a usable JSON value; ``fatal`` ones end the session."""

    desc: str
    fatal: bool = False


class _Mode(enum.Enum):
    BETWEEN = enum.auto()  # skipping whitespace before the next value
    STRUCTURE = enum.auto()  # inside an object or array
    STRING = enum.auto()  # a top-level string
    SCALAR = enum.auto()  # a top-level number or keyword
    SKIP = enum.auto()  # dropping an oversized value up to the next newline


def _reject_constant(name: str) -> JSON:
    raise ValueError(f"invalid keyword '{name}'")


def parse_json(raw: bytes) -> Message | DecodeError:
    """Parse one complete JSON value, with QEMU-style error texts."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return DecodeError("JSON parse error, invalid UTF-8 sequence")
    try:
        return Message(_loads(text, raw.count(b"[") + raw.count(b"{")))
    except json.JSONDecodeError as exc:
        return DecodeError(f"JSON parse error, {exc.msg[:1].lower()}{exc.msg[1:]}")
    except ValueError as exc:
        return DecodeError(f"JSON parse error, {exc}")
    except RecursionError:
        return DecodeError("JSON nesting depth limit exceeded")


@contextlib.contextmanager
def nesting_allowance() -> Iterator[None]:
    """Let ``json`` parse and encode MAX_NESTING levels, which the default
    recursion limit (1000, less the caller's frames) does not allow.

    The limit is raised by a bounded amount only for the duration, so deeper
    data still ends in RecursionError (a few thousand C frames of the scanner,
    far within the thread's stack), never in a crash; the lock keeps two
    threads from restoring each other's raised limit.
    """
    with _RECURSION_LOCK:
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(limit + _RECURSION_HEADROOM)
        try:
            yield
        finally:
            sys.setrecursionlimit(limit)


def _loads(text: str, brackets: int) -> JSON:
    """``json.loads``; ``brackets`` bounds the depth, so shallow values (nearly all)
    skip the recursion allowance."""
    if brackets <= _SHALLOW:
        return json.loads(text, parse_constant=_reject_constant)
    with nesting_allowance():
        return json.loads(text, parse_constant=_reject_constant)


class MessageDecoder:
    """Splits a byte stream into JSON values; see the module docstring."""

    def __init__(self, max_size: int = MAX_MESSAGE, max_depth: int = MAX_NESTING,
                 max_skip: int = MAX_SKIP) -> None:
        self.max_size = max_size
        self.max_depth = max_depth
        self.max_skip = max_skip
        self._buf = bytearray()
        self._mode = _Mode.BETWEEN
        self._pos = 0  # next byte to scan
        self._depth = 0
        self._in_string = False
        self._skipped = 0
        self.broken = False
        """Set after the fatal error: all later input is ignored."""

    def feed(self, data: bytes) -> None:
        if not self.broken:
            self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes held (a partial value); bounded by about ``max_size`` + one feed."""
        return len(self._buf)

    def next_item(self) -> Message | DecodeError | None:
        """The next complete value or error; None when more input is needed."""
        while not self.broken:
            if self._mode is _Mode.SKIP and not self._skip():
                if self._skipped > self.max_skip:
                    self.broken = True
                    return DecodeError("JSON message too large", fatal=True)
                return None
            if self._mode is _Mode.BETWEEN and not self._begin():
                return None
            end = self._scan()
            if isinstance(end, DecodeError):
                return end
            if end is None:
                if len(self._buf) > self.max_size:
                    return self._start_skip()
                return None
            raw = bytes(self._buf[:end])
            del self._buf[:end]
            self._reset()
            if len(raw) > self.max_size:
                return DecodeError("JSON message too large")
            return parse_json(raw)
        return None

    # -- scanning ----------------------------------------------------------------
    def _reset(self) -> None:
        self._mode = _Mode.BETWEEN
        self._pos = 0
        self._depth = 0
        self._in_string = False

    def _begin(self) -> bool:
        """Find the first byte of the next value; False if there is none yet."""
        m = _NOT_WHITESPACE.search(self._buf)
        if m is None:
            self._buf.clear()
            return False
        del self._buf[:m.start()]
        first = self._buf[0]
        self._pos = 1
        if first in b"{[":
            self._mode, self._depth = _Mode.STRUCTURE, 1
        elif first == ord('"'):
            self._mode, self._in_string = _Mode.STRING, True
        else:
            self._mode, self._pos = _Mode.SCALAR, 0
        return True

    def _scan(self) -> int | DecodeError | None:
        """End offset of the current value, None if incomplete."""
        buf = self._buf
        if self._mode is _Mode.SCALAR:
            m = _SCALAR_END.search(buf, self._pos)
            if m is None:
                self._pos = len(buf)
                return None
            # A stray byte (":", "}", ...) is a one-byte value that fails to parse.
            return max(m.start(), 1)
        while True:
            if self._in_string:
                m = _IN_STRING.search(buf, self._pos)
                if m is None:
                    self._pos = len(buf)
                    return None
                i = m.start()
                if buf[i] == ord("\\"):
                    if i + 1 >= len(buf):
                        self._pos = i  # look at the escape again with the next byte
                        return None
                    self._pos = i + 2
                    continue
                self._in_string = False
                self._pos = i + 1
                if self._mode is _Mode.STRING:
                    return self._pos
                continue
            m = _STRUCTURE.search(buf, self._pos)
            if m is None:
                self._pos = len(buf)
                return None
            i = m.start()
            self._pos = i + 1
            c = buf[i]
            if c == ord('"'):
                self._in_string = True
            elif c in b"{[":
                self._depth += 1
                if self._depth > self.max_depth:
                    self._start_skip()
                    return DecodeError("JSON nesting depth limit exceeded")
            else:
                self._depth -= 1
                if self._depth == 0:
                    return self._pos

    def _start_skip(self) -> DecodeError:
        """Drop the value scanned so far; look for the newline in what follows."""
        self._skipped = self._pos
        del self._buf[:self._pos]
        self._mode = _Mode.SKIP
        return DecodeError("JSON message too large")

    def _skip(self) -> bool:
        """Drop input up to the next newline; True once resynchronised."""
        i = self._buf.find(b"\n")
        if i < 0:
            self._skipped += len(self._buf)
            self._buf.clear()
            return False
        del self._buf[:i + 1]
        self._skipped = 0
        self._reset()
        return True


# -- the session ----------------------------------------------------------------------


class _NoId:
    def __repr__(self) -> str:
        return "NO_ID"


NO_ID: Any = _NoId()
"""The ``id`` of a request that had none (``None`` is a valid JSON id)."""


class NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()


@dataclass(frozen=True, slots=True)
class Execute:
    """A command to run, already past the protocol checks."""

    command: str
    arguments: dict[str, JSON]
    id: JSON = NO_ID


@dataclass(frozen=True, slots=True)
class Closed:
    """The session cannot go on (the client sent an endless message)."""

    reason: str


class Phase(enum.Enum):
    NEGOTIATION = enum.auto()
    COMMAND = enum.auto()
    CLOSED = enum.auto()


def version_info(package: str) -> dict[str, JSON]:
    """``VersionInfo``, as in the greeting and ``query-version``."""
    major, minor, micro = QEMU_VERSION
    return {"qemu": {"micro": micro, "minor": minor, "major": major}, "package": package}


def encode(obj: JSON) -> bytes:
    """One line of QMP output; a reply may echo an ``id`` nested up to MAX_NESTING."""
    try:
        return json.dumps(obj).encode() + b"\n"
    except RecursionError:
        pass
    with nesting_allowance():
        return json.dumps(obj).encode() + b"\n"


def error_object(error_class: str, desc: str) -> dict[str, JSON]:
    return {"class": error_class, "desc": desc}


def check_envelope(request: JSON) -> tuple[str, dict[str, JSON]]:
    """Command name and arguments of a request, or QEMU's error for its shape."""
    if not isinstance(request, dict):
        raise QmpError("QMP input must be a JSON object")
    for key, value in request.items():
        if key == "execute":
            if not isinstance(value, str):
                raise QmpError("QMP input member 'execute' must be a string")
        elif key == "arguments":
            if not isinstance(value, dict):
                raise QmpError("QMP input member 'arguments' must be an object")
        elif key != "id":
            raise QmpError(f"QMP input member '{key}' is unexpected")
    if "execute" not in request:
        raise QmpError("QMP input lacks member 'execute'")
    return request["execute"], request.get("arguments", {})


class QmpSession:
    """One client's protocol state; see the module docstring."""

    def __init__(self, package: str, *, max_message: int = MAX_MESSAGE) -> None:
        self.package = package
        self.phase = Phase.NEGOTIATION
        self._decoder = MessageDecoder(max_message)
        self._out = bytearray(encode({"QMP": {
            "version": version_info(package), "capabilities": list(OFFERED_CAPABILITIES),
        }}))
        self.capabilities: tuple[str, ...] = ()

    # -- input ------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        self._decoder.feed(data)

    def next_event(self) -> Execute | NeedData | Closed:
        """The next request to execute; protocol errors are answered on the way."""
        while self.phase is not Phase.CLOSED:
            item = self._decoder.next_item()
            if item is None:
                return NEED_DATA
            if isinstance(item, DecodeError):
                if item.fatal:
                    self.phase = Phase.CLOSED
                    return Closed(item.desc)
                self._queue({"error": error_object("GenericError", item.desc)})
                continue
            request = item.value
            request_id = request.get("id", NO_ID) if isinstance(request, dict) else NO_ID
            try:
                command, arguments = check_envelope(request)
                if self.phase is Phase.NEGOTIATION:
                    self._negotiate(command, arguments)
                    self._queue({"return": {}}, request_id)
                    continue
            except QmpError as exc:
                self._queue({"error": error_object(exc.error_class, exc.desc)}, request_id)
                continue
            return Execute(command, arguments, request_id)
        return Closed("session closed")

    def _negotiate(self, command: str, arguments: dict[str, JSON]) -> None:
        if command != "qmp_capabilities":
            raise QmpError("Expecting capabilities negotiation with 'qmp_capabilities'", "CommandNotFound")
        args = check_arguments(CAPABILITIES_ARGS, arguments)
        wanted = args.get("enable", [])
        unavailable = [c for c in wanted if c not in OFFERED_CAPABILITIES]
        if unavailable:
            raise QmpError(f"Capability {', '.join(unavailable)} not available")
        self.capabilities = tuple(wanted)
        self.phase = Phase.COMMAND

    # -- output -------------------------------------------------------------------
    def _queue(self, reply: dict[str, JSON], request_id: JSON = NO_ID) -> None:
        if request_id is not NO_ID:
            reply["id"] = request_id
        self._out += encode(reply)

    def send_return(self, request: Execute, value: JSON) -> None:
        self._queue({"return": {} if value is None else value}, request.id)

    def send_error(self, request: Execute, error_class: str, desc: str) -> None:
        self._queue({"error": error_object(error_class, desc)}, request.id)

    def encode_event(self, event: dict[str, JSON]) -> bytes | None:
        """The bytes of an event for this client; None until negotiation is over."""
        if self.phase is not Phase.COMMAND:
            return None
        return encode(event)

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def close(self) -> None:
        self.phase = Phase.CLOSED
