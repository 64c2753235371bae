#!/usr/bin/env python3
"""Coverage-guided fuzzing of the sans-I/O transmission core (atheris).

Input layout (short inputs are padded with zero bytes)::

    byte  0      export state: bit 0 read-only, bit 1 structured replies,
                 bit 2 meta contexts negotiated, bit 4 sendfile-style READ headers
    bytes 1-8    export size (u64, big-endian)
    bytes 9-36   the 28-byte request header, exactly as the reader gets it
    bytes 37..   the rest drives the reply builders: an error message, READ
                 segments and data, raw block-status extents

The request goes through what ``Connection._read_loop`` calls (``check_magic``
on every prefix, ``parse_request``, ``validate``) and, when it may run, through
the reply builders the request task would use.  Checked:

* only the documented errors: ``ProtocolError`` exactly when the magic is
  wrong, ``RequestError`` with an errno the spec allows for that request,
  exactly when an independent reading of the spec says the request is bad;
* the fast ``struct`` codec and the construct declaration agree;
* every reply parses back with ``wire.py``: right magic, cookie, DONE only on
  the last chunk, READ chunks cover the data exactly once and in order, hole
  chunks only over zeros, block-status extents non-empty, merged, clipped to
  the request, one with REQ_ONE; error messages are UTF-8 of at most 4096 bytes.

Run: ``.venv/bin/python tests/fuzz/fuzz_framer.py tests/fuzz/corpus/framer``; see tools/fuzz.sh.
"""

from __future__ import annotations

import itertools
import struct

from fuzz_harness import fuzz, instrumented  # the module beside this script

with instrumented(__name__):
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
    from nbdfleece.transmission import (
        ExportState,
        Request,
        block_status_reply,
        check_magic,
        done_reply,
        error_reply,
        parse_request,
        read_reply,
        shape_extents,
        validate,
    )

CONTEXTS = {1: "base:allocation", 2: "qemu:dirty-bitmap:bm0"}
HEADER_START, HEADER_END = 9, 37
MAX_READ_DATA = 1 << 16
"""The READ data handed to the builders (the request's length only sets offsets)."""

# The spec's flags per command (QEMU 7.2 accepts FUA on every command).
_F = CmdFlag
SPEC_FLAGS = {
    Cmd.READ: _F.FUA | _F.DF,
    Cmd.WRITE: _F.FUA,
    Cmd.DISC: _F.FUA,
    Cmd.FLUSH: _F.FUA,
    Cmd.TRIM: _F.FUA,
    Cmd.CACHE: _F.FUA,
    Cmd.WRITE_ZEROES: _F.FUA | _F.NO_HOLE | _F.FAST_ZERO,
    Cmd.BLOCK_STATUS: _F.FUA | _F.REQ_ONE,
}


class Params:
    """Draws small numbers and strings from the tail of the input."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def u32(self) -> int:
        return int.from_bytes(bytes(self.byte() for _ in range(4)), "big")

    def take(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += len(out)
        return out


def spec_errors(state: ExportState, req: Request) -> set[int]:
    """Errnos the spec allows for a bad request; empty when the request may run."""
    if req.type not in SPEC_FLAGS:
        return {Errno.EINVAL}
    errors: set[int] = set()
    allowed = int(SPEC_FLAGS[Cmd(req.type)])
    if not state.structured:
        allowed &= ~int(CmdFlag.DF)
    if req.flags & ~allowed:
        errors.add(Errno.EINVAL)
    if req.type in (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES) and state.read_only:
        errors.add(Errno.EPERM)
    if req.type in (Cmd.READ, Cmd.WRITE) and req.length > MAX_BLOCK_SIZE:
        errors.add(Errno.EINVAL)
    if req.type in (Cmd.FLUSH, Cmd.DISC):
        if req.offset or req.length:
            errors.add(Errno.EINVAL)
        return errors
    if req.offset + req.length > state.size:
        errors.add(Errno.ENOSPC if req.type in (Cmd.WRITE, Cmd.WRITE_ZEROES) else Errno.EINVAL)
    if req.type == Cmd.BLOCK_STATUS and not (state.structured and state.contexts):
        errors.add(Errno.EINVAL)
    return errors


def check_message(raw: bytes) -> None:
    assert len(raw) <= MAX_STRING, "error message longer than 4096 bytes"
    raw.decode("utf-8")


def check_error_reply(structured: bool, cookie: int, errno: int, message: str) -> None:
    reply = error_reply(structured, cookie, errno, message)
    if not structured:
        parsed = wire.simple_reply.parse(reply)
        assert (parsed.error, parsed.cookie) == (errno, cookie) and errno != 0
        return
    chunks = split_chunks(reply, cookie)
    assert len(chunks) == 1
    type_, payload = chunks[0]
    assert type_ == ReplyType.ERROR
    parsed = wire.error_payload.parse(payload)
    assert parsed.error == errno != 0
    check_message(parsed.message)


def split_chunks(data: bytes, cookie: int) -> list[tuple[int, bytes]]:
    """Structured reply chunks of one request; DONE on the last one only."""
    hsize = wire.STRUCTURED_REPLY_HEADER.size
    chunks: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(data):
        assert not chunks or not chunks[-1][0] & 0x10000, "chunk after DONE"
        header = wire.structured_reply_header.parse(data[pos : pos + hsize])
        assert header.magic == STRUCTURED_REPLY_MAGIC and header.cookie == cookie
        payload = data[pos + hsize : pos + hsize + header.length]
        assert len(payload) == header.length
        done = bool(header.flags & ReplyFlag.DONE)
        assert header.flags & ~int(ReplyFlag.DONE) == 0
        chunks.append((header.type | (0x10000 if done else 0), payload))
        pos += hsize + header.length
    assert chunks and chunks[-1][0] & 0x10000, "no DONE chunk"
    return [(t & 0xFFFF, p) for t, p in chunks]


def check_read(structured: bool, req: Request, params: Params, sendfile: bool) -> None:
    n = min(req.length, MAX_READ_DATA, len(params.data) - params.pos)
    segments: list[tuple[int, int, bool]] = []
    data = bytearray(params.take(n))
    start = 0
    while start < len(data):
        length = min(params.byte() * 64 + 1, len(data) - start)
        zero = bool(params.byte() & 1)
        if zero:
            data[start : start + length] = bytes(length)
        segments.append((start, length, zero))
        start += length
    view = memoryview(bytes(data))
    parts = read_reply(structured, req.cookie, req.offset, view, segments if segments else None,
                       headers_only=sendfile and structured)
    if not structured:
        assert bytes(parts[0]) == wire.SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, req.cookie)
        assert bytes(b"".join(parts[1:])) == bytes(data)
        return
    if sendfile:
        # One header per segment; the data of each OFFSET_DATA chunk follows it.
        assert len(parts) == (len(segments) if data else 1)
        wire_bytes = b""
        for header, seg in zip(parts, segments or [(0, 0, False)], strict=True):
            wire_bytes += bytes(header)
            if data and not seg[2]:
                wire_bytes += bytes(data[seg[0] : seg[0] + seg[1]])
    else:
        wire_bytes = b"".join(bytes(p) for p in parts)
    chunks = split_chunks(wire_bytes, req.cookie)
    if not data:
        assert chunks == [(ReplyType.NONE, b"")]
        return
    rebuilt = bytearray()
    for type_, payload in chunks:
        if type_ == ReplyType.OFFSET_DATA:
            (offset,) = struct.unpack_from(">Q", payload)
            body = payload[8:]
            assert body, "empty OFFSET_DATA chunk"
        else:
            assert type_ == ReplyType.OFFSET_HOLE, type_
            offset, length = wire.OFFSET_HOLE.unpack(payload)
            assert length, "empty OFFSET_HOLE chunk"
            body = bytes(length)
        assert offset == req.offset + len(rebuilt), "chunks out of order or overlapping"
        rebuilt += body
    assert rebuilt == data


def check_block_status(state: ExportState, req: Request, params: Params) -> None:
    raw = []
    for _ in range(1 + params.byte() % 16):
        length = params.u32() >> (params.byte() % 32)
        raw.append((length, params.u32()))
    if not any(length for length, _ in raw):
        raw.append((1, 0))  # a node always reports something
    req_one = bool(req.flags & CmdFlag.REQ_ONE)
    shaped = shape_extents(raw, req.length, req_one=req_one)
    total = sum(length for length, _ in shaped)
    assert shaped and all(0 < length <= 0xFFFFFFFF for length, _ in shaped)
    assert total <= req.length
    if sum(length for length, _ in raw) >= req.length:
        assert total == req.length or req_one
    assert all(a[1] != b[1] for a, b in itertools.pairwise(shaped)), "unmerged"
    if req_one:
        assert len(shaped) == 1
    items = sorted(state.contexts.items())
    reply = b"".join(
        block_status_reply(req.cookie, cid, shaped, i == len(items) - 1)
        for i, (cid, _) in enumerate(items)
    )
    chunks = split_chunks(reply, req.cookie)
    assert [t for t, _ in chunks] == [ReplyType.BLOCK_STATUS] * len(items)
    for (cid, _), (_, payload) in zip(items, chunks, strict=True):
        parsed = wire.block_status_payload.parse(payload)
        assert parsed.context_id == cid
        assert [(e.length, e.flags) for e in parsed.extents] == shaped


def check(data: bytes) -> None:
    if not data:
        return
    # The reader judges the magic on any prefix it has.
    header = data[HEADER_START:HEADER_END]
    magic_ok = header[:4] == REQUEST_MAGIC.to_bytes(4, "big")
    for n in range(min(len(header), 4) + 1):
        try:
            check_magic(header[:n])
        except ProtocolError:
            assert n < 4 or not magic_ok
        else:
            assert n == 4 and magic_ok
    data = data.ljust(HEADER_END, b"\0")
    header = data[HEADER_START:HEADER_END]
    bits = data[0]
    (size,) = struct.unpack_from(">Q", data, 1)
    state = ExportState(size, bool(bits & 1), bool(bits & 2), CONTEXTS if bits & 4 else {})
    params = Params(data[HEADER_END:])

    try:
        req = parse_request(header)
    except ProtocolError:
        assert header[:4] != REQUEST_MAGIC.to_bytes(4, "big")
        return
    fields = wire.request_header.parse(header)
    assert (fields.flags, fields.type, fields.cookie, fields.offset, fields.length) == (
        req.flags, req.type, req.cookie, req.offset, req.length)
    assert req.payload_length == (req.length if req.type == Cmd.WRITE else 0)

    expected = spec_errors(state, req)
    try:
        validate(state, req)
    except RequestError as exc:
        assert exc.errno in expected, (exc.errno, expected, req, state)
        assert exc.message
        check_error_reply(state.structured, req.cookie, exc.errno, exc.message)
        return
    assert not expected, (expected, req, state)

    # The request may run: the builders its task would use.
    # Messages of up to 16 K characters from a short unit: lone surrogates or
    # U+FFFD (3 bytes) for undecodable bytes, so the 4096-byte limit falls anywhere.
    errors = "surrogateescape" if params.byte() & 1 else "replace"
    unit = params.take(params.byte()).decode("utf-8", errors) or "x"
    length = params.byte() * 64 + params.byte()
    message = (unit * (length // len(unit) + 1))[:length]
    check_error_reply(state.structured, req.cookie, Errno.EIO, message)
    done = done_reply(state.structured, req.cookie)
    if state.structured:
        assert split_chunks(done, req.cookie) == [(ReplyType.NONE, b"")]
    else:
        assert done == wire.SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, req.cookie)
    if req.type == Cmd.READ:
        check_read(state.structured, req, params, bool(bits & 16))
    elif req.type == Cmd.BLOCK_STATUS and req.length:
        check_block_status(state, req, params)


MAX_LEN = 8192
"""libFuzzer's -max_len unless given."""


def TestOneInput(data: bytes) -> None:
    check(data)


def main() -> None:
    fuzz(TestOneInput, MAX_LEN)


if __name__ == "__main__":
    main()
