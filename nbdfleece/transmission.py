"""Sans-I/O transmission phase: request validation and reply building.

The I/O layer reads a 28-byte header, asks :func:`parse_request` for the
:class:`Request` (a bad magic is a :class:`ProtocolError`: hard disconnect),
asks :func:`validate` whether it may run (a :class:`RequestError` carries
the errno to answer, after the I/O layer discarded a WRITE's payload), runs
it against the block layer, and sends what the reply builders return.

Reply builders return lists of buffers meant for one ``sendmsg`` call, so a
READ payload is never concatenated with its header (one copy less; see
``perf-baseline.md`` observation 1).

Block-status extents are shaped by ``nbdfleece.extents`` (merge, clip,
REQ_ONE) so that every context obeys the same rules.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from nbdfleece import extents as extent_arrays
from nbdfleece import wire
from nbdfleece.constants import (
    MAX_BLOCK_SIZE,
    MAX_STRING,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    CmdFlag,
    Errno,
    ReplyFlag,
    ReplyType,
)
from nbdfleece.errors import ProtocolError, RequestError
from nbdfleece.extents import ExtentArray

Buffer = bytes | bytearray | memoryview

# Plain ints: ``~`` on an IntFlag complements only the defined bits.
_ALLOWED_FLAGS: dict[int, int] = {
    Cmd.READ: CmdFlag.FUA | CmdFlag.DF,
    Cmd.WRITE: CmdFlag.FUA,
    Cmd.DISC: CmdFlag.FUA,
    Cmd.FLUSH: CmdFlag.FUA,
    Cmd.TRIM: CmdFlag.FUA,
    Cmd.CACHE: CmdFlag.FUA,
    Cmd.WRITE_ZEROES: CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO,
    Cmd.BLOCK_STATUS: CmdFlag.FUA | CmdFlag.REQ_ONE,
}
_REQUEST_MAGIC_BYTES = REQUEST_MAGIC.to_bytes(4, "big")
_MODIFYING = frozenset({Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES})


@dataclass(frozen=True, slots=True)
class Request:
    """One decoded request header."""

    flags: int
    type: int
    cookie: int
    offset: int
    length: int

    @property
    def payload_length(self) -> int:
        """Bytes that follow the header on the wire."""
        return self.length if self.type == Cmd.WRITE else 0


@dataclass(frozen=True, slots=True)
class ExportState:
    """What validation needs to know about the negotiated export."""

    size: int
    read_only: bool
    structured: bool
    contexts: dict[int, str]


def check_magic(prefix: Buffer) -> None:
    """Refuse a request whose first four bytes are not the request magic."""
    if bytes(prefix[:4]) != _REQUEST_MAGIC_BYTES:
        raise ProtocolError(f"bad request magic {bytes(prefix[:4]).hex()}")


def parse_request(header: Buffer) -> Request:
    """Decode a 28-byte request header; a wrong magic ends the connection."""
    magic, flags, type_, cookie, offset, length = wire.REQUEST_HEADER.unpack(header)
    if magic != REQUEST_MAGIC:
        raise ProtocolError(f"bad request magic {magic:#010x}")
    return Request(flags, type_, cookie, offset, length)


def validate(state: ExportState, req: Request) -> None:
    """Raise :class:`RequestError` with the spec's errno if ``req`` may not run."""
    allowed = _ALLOWED_FLAGS.get(req.type)
    if allowed is None:
        raise RequestError(Errno.EINVAL, f"unknown command {req.type}")
    if not state.structured:
        allowed = int(allowed) & ~int(CmdFlag.DF)
    if req.flags & ~int(allowed):
        raise RequestError(
            Errno.EINVAL, f"flags {req.flags:#x} not valid for {Cmd(req.type).name}"
        )
    if req.type in _MODIFYING and state.read_only:
        raise RequestError(Errno.EPERM, "export is read-only")
    if req.type in (Cmd.READ, Cmd.WRITE) and req.length > MAX_BLOCK_SIZE:
        raise RequestError(
            Errno.EINVAL, f"length {req.length} exceeds the maximum block size {MAX_BLOCK_SIZE}"
        )
    if req.type in (Cmd.FLUSH, Cmd.DISC):
        if req.offset or req.length:
            raise RequestError(Errno.EINVAL, "offset and length must be 0")
        return
    if req.offset + req.length > state.size:
        errno = Errno.ENOSPC if req.type in (Cmd.WRITE, Cmd.WRITE_ZEROES) else Errno.EINVAL
        raise RequestError(
            errno, f"request {req.offset}+{req.length} beyond the export size {state.size}"
        )
    if req.type == Cmd.BLOCK_STATUS:
        if not state.structured:
            raise RequestError(Errno.EINVAL, "block status needs structured replies")
        if not state.contexts:
            raise RequestError(Errno.EINVAL, "no meta context was negotiated")


# -- replies ---------------------------------------------------------------


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return wire.SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def chunk_header(cookie: int, type_: int, length: int, done: bool) -> bytes:
    flags = ReplyFlag.DONE if done else 0
    return wire.STRUCTURED_REPLY_HEADER.pack(STRUCTURED_REPLY_MAGIC, flags, type_, cookie, length)


def done_reply(structured: bool, cookie: int) -> bytes:
    """Success of a command without payload."""
    if structured:
        return chunk_header(cookie, ReplyType.NONE, 0, True)
    return simple_reply(cookie)


def error_reply(structured: bool, cookie: int, errno: int, message: str) -> bytes:
    """Failure of any command: a simple reply, or an ERROR chunk with text."""
    if not structured:
        return simple_reply(cookie, errno)
    text = wire.utf8_prefix(message, min(MAX_STRING, 0xFFFF))
    payload: bytes = wire.error_payload.build({"error": errno, "message": text})
    return chunk_header(cookie, ReplyType.ERROR, len(payload), True) + payload


def read_reply(
    structured: bool,
    cookie: int,
    offset: int,
    data: memoryview,
    segments: Iterable[tuple[int, int, bool]] | None = None,
    *,
    headers_only: bool = False,
) -> list[Buffer]:
    """Buffers answering a successful READ of ``data`` at ``offset``.

    ``segments`` (start, length, zero) relative to ``offset`` allow
    OFFSET_HOLE chunks for zero ranges; without them, one OFFSET_DATA chunk.
    With ``headers_only`` the result is one header per segment and the caller
    sends each data segment itself (``sendfile``).
    """
    if not structured:
        return [simple_reply(cookie), data]
    pieces = list(segments) if segments is not None else [(0, len(data), False)]
    if not pieces or not sum(p[1] for p in pieces):
        return [chunk_header(cookie, ReplyType.NONE, 0, True)]
    parts: list[Buffer] = []
    last = len(pieces) - 1
    for i, (start, length, zero) in enumerate(pieces):
        done = i == last
        if zero:
            parts.append(
                chunk_header(cookie, ReplyType.OFFSET_HOLE, wire.OFFSET_HOLE.size, done)
                + wire.OFFSET_HOLE.pack(offset + start, length)
            )
        else:
            parts.append(
                wire.STRUCTURED_DATA_HEADER.pack(
                    STRUCTURED_REPLY_MAGIC,
                    ReplyFlag.DONE if done else 0,
                    ReplyType.OFFSET_DATA,
                    cookie,
                    length + wire.OFFSET_DATA_PREFIX.size,
                    offset + start,
                )
            )
            if not headers_only:
                parts.append(data[start : start + length])
    return parts


def shape_extents(
    extents: Iterable[tuple[int, int]], length: int, *, req_one: bool
) -> list[tuple[int, int]]:
    """List form of :func:`nbdfleece.extents.shape` (tests, small inputs)."""
    shaped = extent_arrays.shape(extent_arrays.as_extents(extents), length, req_one=req_one)
    return [(int(n), int(f)) for n, f in shaped]


def block_status_reply(
    cookie: int, context_id: int, extents: Sequence[tuple[int, int]] | ExtentArray, done: bool
) -> bytes:
    """One BLOCK_STATUS chunk for one context."""
    array = extents if isinstance(extents, np.ndarray) else extent_arrays.as_extents(extents)
    payload = extent_arrays.pack(context_id, array)
    return chunk_header(cookie, ReplyType.BLOCK_STATUS, len(payload), done) + payload
